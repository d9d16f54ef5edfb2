#!/usr/bin/env bash
# Pack the Python packages a lent GPU machine lacks into .gpu-deps/site.tar.xz, for scripts/gpu-run.sh.
#
# The device tool's machines have torch, triton, pytest and hypothesis but no internet. Everything a call needs
# must travel with the working tree, which is limited to 64 MiB. The flashinfer-python 0.7.2 wheel alone is 65 MB
# (zip), but its 460 MB of Python and of the C++/CUDA sources it JIT-compiles on first use shrink to ~17 MB with
# xz, so the whole of it travels, nothing trimmed: a missing header would only show on the GPU. With it:
#   - apache-tvm-ffi, FlashInfer's runtime;
#   - transformers 5.19: the image has 5.17, and the HF path (benchmarks/latency.py) needs >= 5.19.
# FlashInfer's other imports (nvidia-ml-py, einops, tabulate, click, ninja) are in the image (device tool's
# KINDS.md); `import flashinfer` needs nothing else (checked with a Python 3.11 pack here). Its optional
# extras (cuDNN frontend, CUTLASS DSL, NCCL) serve kernels we never call.
#
# Usage (on the development machine, where pip reaches the registry):
#   scripts/pack-gpu-deps.sh [PYTHON_VERSION]   # default 3.12, the GPU image's python3
# Output: .gpu-deps/site.tar.xz (listed in .git/info/exclude so it never lands in a commit).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYVER="${1:-3.12}"
OUT_DIR="$ROOT/.gpu-deps"
LIMIT_BYTES=$((48 * 1024 * 1024))  # leaves ~16 MiB of the 64 MiB carry for the working tree itself
PY="${PYTHON:-$ROOT/.venv/bin/python}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$work/wheels" \
    flashinfer-python==0.7.2 "apache-tvm-ffi>=0.1.11,<0.2" transformers==5.19.0
"$PY" -m pip install -q --no-deps --no-compile --no-index --target "$work/site" \
    --python-version "$PYVER" --implementation cp --only-binary=:all: "$work"/wheels/*.whl

[ -d "$work/site/flashinfer/data/csrc" ] || { echo "pack-gpu-deps: the FlashInfer wheel has no JIT sources" >&2; exit 1; }
rm -rf "$work/site/bin"

mkdir -p "$OUT_DIR"
exclude="$(git -C "$ROOT" rev-parse --git-path info/exclude)"  # also right in a worktree, where .git is a file
case "$exclude" in /*) ;; *) exclude="$ROOT/$exclude" ;; esac
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu-deps/' "$exclude" 2>/dev/null || echo '/.gpu-deps/' >> "$exclude"
tar -C "$work/site" -cf - . | xz -6 -T2 > "$OUT_DIR/site.tar.xz"
size=$(stat -c %s "$OUT_DIR/site.tar.xz")
echo "pack-gpu-deps: $OUT_DIR/site.tar.xz is $((size / 1024 / 1024)) MiB (python $PYVER)"
if [ "$size" -gt "$LIMIT_BYTES" ]; then
    echo "pack-gpu-deps: over $((LIMIT_BYTES / 1024 / 1024)) MiB, too much to carry beside the working tree" >&2
    exit 1
fi
