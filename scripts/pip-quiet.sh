# Sourced by the set-up scripts. pip_ runs the pip of "$VENV". This machine's pip config lists local indexes
# that lack most packages, so their per-package "is ignored" warnings are dropped.
pip_() {
    "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
        | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}
