#!/usr/bin/env bash
# Fresh-machine set-up for CPU: .venv (python3.11) with torch 2.13.0+cpu, SGLang 0.5.23 without its CUDA
# stack, this project (editable) and the CPU import shims. Idempotent: a second run with unchanged inputs
# only compares a hash. Works from any cwd. Env: PYTHON (default python3.11), TORCH_WHEELS (default /opt/wheels).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS

VENV=.venv
PYTHON=${PYTHON:-python3.11}
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
CONSTRAINTS=scripts/constraints-cpu.txt
REQUIREMENTS=scripts/requirements-cpu.txt
STAMP=$VENV/.setup-stamp

hash=$(cat scripts/setup.sh scripts/pip-quiet.sh "$CONSTRAINTS" "$REQUIREMENTS" pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -x $VENV/bin/python && -f $STAMP && "$(cat "$STAMP")" == "$hash" ]]; then
    echo "setup: $VENV is up to date ($((SECONDS - start)) s)"
    exit 0
fi

source scripts/pip-quiet.sh

[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
rm -f "$STAMP"

# 1. torch from the local CPU wheel only: a torch from PyPI is the CUDA build (GBs). Fail here rather than pull it.
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__ != "2.13.0+cpu")' 2>/dev/null; then
    pip_ install -q --no-deps --no-index --find-links "$TORCH_WHEELS" torch==2.13.0
fi

# 2. SGLang's pure-Python runtime deps + the project's, all pinned; torch==2.13.0 is already satisfied.
pip_ install -q -c "$CONSTRAINTS" -r "$REQUIREMENTS"

# 3. SGLang without its metadata deps (torch==2.14.1 and the CUDA kernels), then the project.
pip_ install -q --no-deps sglang==0.5.23
pip_ install -q --no-deps -e .

# 4. CPU shims: one .pth line, run at every interpreter start (also in SGLang's scheduler processes).
#    The env check keeps MADAKV_DISABLE_CPU_SHIMS=1 from importing anything at all.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo 'import os; os.environ.get("MADAKV_DISABLE_CPU_SHIMS") == "1" or __import__("madakv_sglang._cpu_shims._activate")' \
    > "$site/madakv_cpu_shims.pth"

"$VENV/bin/python" -c 'import torch; assert torch.version.cuda is None, torch.__version__; print("setup: torch", torch.__version__)'
echo "$hash" > "$STAMP"
echo "setup: done in $((SECONDS - start)) s; $(du -sh "$VENV" | cut -f1) in $VENV"
