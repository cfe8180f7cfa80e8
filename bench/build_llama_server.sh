#!/usr/bin/env bash
# Build the anchor llama-server that bench/side_by_side.py compares parallama against: the llama.cpp
# vendored in the sdist of the llama-cpp-python version installed in .venv, so both servers run the
# same ggml kernels.
#
#     bench/build_llama_server.sh DIR      # run from the repository root; DIR outside the repository
#
# Downloads the llama-cpp-python sdist into DIR (pip download --no-binary :all:), unpacks it, configures
# vendor/llama.cpp with cmake (server on, no curl, -march=native, Release) and builds only the
# llama-server target. DIR/llama-server is a link to the binary in the build tree (it loads libllama and
# libggml from there, so keep DIR). LLAMA_CPP_PYTHON_VERSION=X.Y.Z overrides the installed version.
# About 4-5 minutes on 2 cores; needs cmake, a C++ compiler and network access to PyPI.
#
# A manual tool for benchmarks: never run it in CI (it refuses when $CI is set).
set -euo pipefail

if [[ -n "${CI:-}" ]]; then
    echo "build_llama_server.sh: not run in CI (a manual benchmark tool)" >&2
    exit 1
fi
if [[ $# -ne 1 ]]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p "$1"
DIR="$(cd "$1" && pwd)"
JOBS="${JOBS:-$(nproc)}"

VERSION="${LLAMA_CPP_PYTHON_VERSION:-$("$PY" -m pip show llama-cpp-python | sed -n 's/^Version: //p')}"
[[ -n "$VERSION" ]] || { echo "llama-cpp-python is not installed for $PY" >&2; exit 1; }
echo "llama-cpp-python $VERSION -> $DIR" >&2

SDIST="$DIR/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR"
fi
SRC="$DIR/llama_cpp_python-$VERSION"
[[ -d "$SRC" ]] || tar -xzf "$SDIST" -C "$DIR"

cd "$SRC/vendor/llama.cpp"
cmake -B build -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release
cmake --build build --target llama-server -j"$JOBS"

ln -sfn "$PWD/build/bin/llama-server" "$DIR/llama-server"  # a link: the binary finds its libs in build/bin
"$DIR/llama-server" --version >&2 || true
echo "$DIR/llama-server"
