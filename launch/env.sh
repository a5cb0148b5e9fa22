# Sourced by the launchers: put the harness's virtual environment first on PATH, so that
# python, torchrun and accelerate are the ones launch/setup.sh installed. An active
# virtual environment ($VIRTUAL_ENV), or a Python that already imports the harness, is
# used as it is.
_harness_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$_harness_root/.venv/bin/python" ]; then
  export PATH="$_harness_root/.venv/bin:$PATH"
elif ! python3 -c 'import harness' 2>/dev/null; then
  echo "error: no Python with the harness installed: run launch/setup.sh first" >&2
  exit 1
fi
unset _harness_root
