# Sourced by the launchers: put the harness's virtual environment first on PATH, so that
# python, torchrun and accelerate are the ones launch/setup.sh installed. An active
# virtual environment ($VIRTUAL_ENV), or a Python that already imports the harness, is
# used as it is.
_harness_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$_harness_root/.venv/bin/python" ]; then
  export PATH="$_harness_root/.venv/bin:$PATH"
else
  # Looked up, not imported (torch takes seconds): `import harness` alone passed for any
  # Python run from the checkout, whose harness/ folder it finds, and the launcher then
  # failed with a traceback for want of torch.
  _harness_missing=$(cd "$_harness_root" && python3 -c 'import importlib.util as u
print(" ".join(m for m in ("torch", "numpy", "webdataset", "harness") if u.find_spec(m) is None))' 2>/dev/null) || _harness_missing=python3
  if [ -n "$_harness_missing" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then
      echo "error: the active virtual environment $VIRTUAL_ENV lacks $_harness_missing: deactivate it (the checkout's .venv is then used), or run launch/setup.sh to install into it" >&2
    else
      echo "error: no Python with the harness installed (python3 lacks $_harness_missing): run launch/setup.sh first" >&2
    fi
    exit 1
  fi
  unset _harness_missing
fi
unset _harness_root
