#!/usr/bin/env bash
# Install the harness and its dependencies into a virtual environment.
#   launch/setup.sh
# Uses the active virtual environment ($VIRTUAL_ENV) if there is one, else creates .venv
# here with python3 (Debian and Ubuntu: `apt install python3-venv` first; their system
# Python refuses pip installs, PEP 668). torch is pinned first: a bare `torch`
# requirement with nothing installed pulls a multi-GB CUDA build, and the package itself
# asks only for a range. Running it again only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ -n "${VIRTUAL_ENV:-}" ]; then
  PYTHON="$VIRTUAL_ENV/bin/python"
  [ -x "$PYTHON" ] || { echo "error: VIRTUAL_ENV=$VIRTUAL_ENV has no bin/python: deactivate it (or unset VIRTUAL_ENV), then run again" >&2; exit 1; }
else
  if [ ! -x .venv/bin/python ]; then
    if [ -e .venv ] && [ ! -d .venv ]; then  # a file of its own (some shell plugins keep one)
      echo "error: .venv exists and is not a directory: move it or remove it, then run again" >&2
      exit 1
    fi
    command -v python3 >/dev/null || { echo "error: python3 not found: install Python 3.11 or newer" >&2; exit 1; }
    made_here=$([ -e .venv ] && echo no || echo yes)  # a broken environment is repaired in place, and kept if that fails
    python3 -m venv .venv || {
      [ "$made_here" = no ] || rm -rf .venv  # what the failed command made
      echo "error: python3 -m venv failed: install the venv module (Debian/Ubuntu: apt install python3-venv)" >&2
      exit 1
    }
  fi
  PYTHON=.venv/bin/python
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  { echo "error: $("$PYTHON" --version) is too old: the harness needs Python 3.11 or newer" >&2; exit 1; }
pip=("$PYTHON" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==${TORCH_VERSION}"
"${pip[@]}" -e '.[dev]'
