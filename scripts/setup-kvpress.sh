#!/usr/bin/env bash
# A side venv, .venv-kvpress, holding NVIDIA kvpress (the external oracle of tests/policies/test_kvpress_oracle.py).
# kvpress 0.5.5 pins transformers<5.3 while the project runs transformers 5.19.0, so it cannot share .venv.
# torch is the same local CPU wheel (2.13.0+cpu) and is pinned with a local-version constraint, so pip can
# never replace it with a PyPI (CUDA) build. Idempotent: a second run with unchanged inputs only compares a
# hash. Works from any cwd. Env: PYTHON (default python3.11), TORCH_WHEELS (default /opt/wheels).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS

VENV=.venv-kvpress
PYTHON=${PYTHON:-python3.11}
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
KVPRESS_VERSION=0.5.5
# The newest transformers kvpress 0.5.5 accepts (<5.3); pinned so the oracle does not drift.
TRANSFORMERS_VERSION=5.2.0
STAMP=$VENV/.setup-stamp

hash=$(cat scripts/setup-kvpress.sh scripts/pip-quiet.sh | sha256sum | cut -d' ' -f1)
if [[ -x $VENV/bin/python && -f $STAMP && "$(cat "$STAMP")" == "$hash" ]]; then
    echo "setup-kvpress: $VENV is up to date ($((SECONDS - start)) s)"
    exit 0
fi

source scripts/pip-quiet.sh

[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
rm -f "$STAMP"
# Keep the venv out of `git status` without touching the repository's .gitignore.
echo '*' > "$VENV/.gitignore"

# 1. torch from the local CPU wheel only (a PyPI torch is the CUDA build, GBs).
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__ != "2.13.0+cpu")' 2>/dev/null; then
    pip_ install -q --no-deps --no-index --find-links "$TORCH_WHEELS" torch==2.13.0
fi

# 2. kvpress with its dependencies; the constraint names the local build, so a resolver that wanted another
#    torch fails here instead of downloading one.
constraints=$VENV/constraints.txt
printf 'torch==2.13.0+cpu\ntransformers==%s\nkvpress==%s\n' "$TRANSFORMERS_VERSION" "$KVPRESS_VERSION" > "$constraints"
pip_ install -q -c "$constraints" "kvpress==$KVPRESS_VERSION" "transformers==$TRANSFORMERS_VERSION"

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.__version__ == "2.13.0+cpu" and torch.version.cuda is None, torch.__version__
versions = {name: md.version(name) for name in ("torch", "transformers", "kvpress")}
print("setup-kvpress:", ", ".join(f"{name} {version}" for name, version in versions.items()))
EOF
echo "$hash" > "$STAMP"
echo "setup-kvpress: done in $((SECONDS - start)) s; $(du -sh "$VENV" | cut -f1) in $VENV"
