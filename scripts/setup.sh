#!/usr/bin/env bash
# Installs solo-megatron and everything it needs into the current Python (3.10+).
# On a machine without a GPU the CPU build of torch is pinned first, so that no multi-GB CUDA
# build is pulled in; on a GPU machine an existing CUDA torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1; then
    $PY -m pip install -q "torch==2.13.0"
    $PY -m pip install -q -c constraints.txt -e ".[test]"
else
    # keep the CUDA torch that is there; pin everything else
    grep -v '^torch==' constraints.txt > /tmp/solo-constraints.txt
    $PY -m pip install -q -c /tmp/solo-constraints.txt -e ".[test]"
fi
PYTHONWARNINGS=ignore $PY -c "import solo, megatron.core, solo_preprocess"
echo "solo-megatron installed: $(PYTHONWARNINGS=ignore $PY -c 'import solo; print(solo.__version__)')"
