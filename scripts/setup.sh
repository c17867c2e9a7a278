#!/usr/bin/env bash
# Installs solo-megatron and everything it needs into the current Python (3.10+).
# On a machine without a GPU the CPU build of torch is pinned first, so that no multi-GB CUDA
# build is pulled in; on a GPU machine an existing CUDA torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1; then
    # PyPI's Linux torch is the CUDA build (GBs); PyTorch's CPU index holds 2.13.0+cpu, which pip
    # prefers over 2.13.0 when both are offered. Offline machines with a local wheel
    # (pip find-links) skip the unreachable index after one retry.
    $PY -m pip install -q "torch==2.13.0" --retries 1 --timeout 30 \
        --extra-index-url "${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
    $PY -m pip install -q -c constraints.txt -e ".[test]"
else
    # keep the CUDA torch that is there; pin everything else
    grep -v '^torch==' constraints.txt > /tmp/solo-constraints.txt
    $PY -m pip install -q -c /tmp/solo-constraints.txt -e ".[test]"
fi
PYTHONWARNINGS=ignore $PY -c "import solo, megatron.core, solo.preprocess"
echo "solo-megatron installed: $(PYTHONWARNINGS=ignore $PY -c 'import solo; print(solo.__version__)')"
