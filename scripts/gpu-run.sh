#!/usr/bin/env bash
# The GPU checks, run on a machine lent by the device tool: one command per call, steps in the order given.
#
#   scripts/gpu-run.sh tests      # pytest -m gpu over the kernel tests (Triton, FlashInfer, packing) vs torch
#   scripts/gpu-run.sh kernels    # python benchmarks/kernels.py   -> $OUT/kernels.json
#   scripts/gpu-run.sh latency    # python -m benchmarks.latency   -> $OUT/latency.json
#   scripts/gpu-run.sh latency:llava-1.5-7b   # one model shape -> $OUT/latency-llava-1.5-7b.json (if one call
#                                             # cannot hold both; names from benchmarks/latency.py SHAPES)
#
# The call must carry .gpu-deps (made here by scripts/pack-gpu-deps.sh: FlashInfer, its runtime, transformers
# 5.19), e.g. the device tool's run with command "scripts/gpu-run.sh tests kernels" and carry [".gpu-deps"].
# Each call has 10 minutes: tests + kernels fit in one (FlashInfer's first JIT build takes minutes), latency
# in another. Logs and JSON go to $OUT (the device tool brings them back) or ./gpu-out elsewhere.
# Every step runs even if an earlier one failed; the exit status is the number of failed steps.
set -uo pipefail

cd "$(dirname "$0")/.."
[ "$#" -gt 0 ] || { echo "usage: scripts/gpu-run.sh STEP... (tests, kernels, latency)" >&2; exit 2; }
OUT="${OUT:-$PWD/gpu-out}"
SITE=/tmp/madakv-gpu-site
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

[ -f .gpu-deps/site.tar.xz ] || { echo "gpu-run: no .gpu-deps/site.tar.xz; run scripts/pack-gpu-deps.sh and carry .gpu-deps" >&2; exit 100; }
# A warm machine keeps /tmp between calls: unpack again only when the carried pack changed.
pack_sum="$(sha256sum .gpu-deps/site.tar.xz | cut -d' ' -f1)"
if [ "$(cat "$SITE/.ready" 2>/dev/null)" != "$pack_sum" ]; then
    rm -rf "$SITE" && mkdir -p "$SITE" && tar -xJf .gpu-deps/site.tar.xz -C "$SITE" || exit 100
    echo "$pack_sum" > "$SITE/.ready"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Editable, as on the development machine: kernels/ is installed as madakv_sglang.kernels by the package's finder.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log" >&2; exit 100; }

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import torch, triton, flashinfer, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| triton', triton.__version__, '| flashinfer', flashinfer.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
# The gpu tests skip without CUDA and FlashInfer JIT-compiles with nvcc: without either, every step would be hollow.
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu-run: torch sees no CUDA device; nothing here would test a GPU" >&2; exit 100; }
command -v nvcc > /dev/null || { echo "gpu-run: no nvcc on PATH; FlashInfer cannot JIT-compile its kernels" >&2; exit 100; }

failed=0
run_step() {  # name, command...
    local name="$1"
    shift
    echo "== gpu-run: $name: $*"
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== gpu-run: $name exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

for step in "$@"; do
    case "$step" in
        tests) run_step tests python3 -m pytest -m gpu -q -rs tests/kernels/test_kernels_triton.py \
                   tests/kernels/test_kernels_flashinfer.py tests/kernels/test_kernels_layout.py ;;
        kernels) run_step kernels python3 benchmarks/kernels.py --out "$OUT/kernels.json" ;;
        latency) run_step latency python3 -m benchmarks.latency --out "$OUT/latency.json" ;;
        latency:*) shape="${step#latency:}"
                   run_step "latency-$shape" python3 -m benchmarks.latency --shapes "$shape" \
                       --out "$OUT/latency-$shape.json" ;;
        *) echo "gpu-run: unknown step '$step' (tests, kernels, latency, latency:SHAPE)" >&2
           failed=$((failed + 1)) ;;
    esac
done
exit "$failed"
