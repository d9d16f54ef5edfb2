#!/usr/bin/env bash
# A stand-in for `ssh HOST LINE` in the launcher tests: drops the host and runs the line here, as the remote
# shell would (`exec`, so this process becomes the line's own).
set -euo pipefail
shift
exec bash -c "$*"
