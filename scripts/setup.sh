#!/usr/bin/env bash
# Installs solo-megatron and everything it needs into the current Python (3.10+).
# On a machine without a GPU the CPU build of torch is pinned first, so that no multi-GB CUDA
# build is pulled in; on a GPU machine an existing CUDA torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Installing again changes nothing when this Python already has this checkout's pinned set (pip
# still takes ~40 s to find that out): the stamp records what the last successful install was for.
STAMP=.setup-stamp
KEY="$($PY -c 'import sys; print(sys.executable)') $(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
# (run from / so that the import finds the installed package, not the current folder)
INSTALLED_HERE="import importlib.util as u, pathlib, sys, solo
sys.exit(not (pathlib.Path(solo.__file__).parent == pathlib.Path(sys.argv[1], 'solo') and u.find_spec('megatron.core') and u.find_spec('torch')))"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && (REPO=$PWD && cd / && $PY -c "$INSTALLED_HERE" "$REPO") 2>/dev/null; then
    echo "solo-megatron already installed for $KEY (remove $STAMP to reinstall)"
    exit 0
fi
rm -f "$STAMP"
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
echo "$KEY" > "$STAMP"
