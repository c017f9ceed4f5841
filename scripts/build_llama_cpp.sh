#!/usr/bin/env bash
# Build llama-cpp-python (llama.cpp, CPU only) ONCE into a wheel cached under
# ${DELTATUNE_CI_CACHE:-$HOME/.cache/deltatune-ci}/wheels, then install that wheel.
# Idempotent: a second run finds the cached wheel and only installs it (seconds).
# Used by the slow tests of tests/test_export_gguf.py that run exported GGUF files in llama.cpp.
set -euo pipefail
PY=${PYTHON:-python3}
VERSION=0.3.36
CACHE=${DELTATUNE_CI_CACHE:-$HOME/.cache/deltatune-ci}/wheels
mkdir -p "$CACHE"
if $PY -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $VERSION already installed"
  exit 0
fi
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $VERSION (CPU only; a few minutes on 2 cores)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # CPU only, no OpenMP, no multimodal (llava/mtmd) library, no tools/examples/tests:
  # the library alone. AVX2/FMA/F16C without -march=native so the wheel runs on any x86-64 CPU
  # with those (every CI machine here).
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    $PY -m pip wheel -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$tmp"
  built=$(ls "$tmp"/llama_cpp_python-"$VERSION"-*.whl)
  # atomic: a half-copied wheel is never taken for a cached one
  cp "$built" "$CACHE/.partial.whl"
  mv "$CACHE/.partial.whl" "$CACHE/$(basename "$built")"
  wheel="$CACHE/$(basename "$built")"
fi
# its pure-Python requirements (no torch among them)
$PY -m pip install -q "$wheel"
$PY -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
