#!/usr/bin/env bash
# CI's heavy lanes (run by .ci/run inside the main job's venv, after the main suite). Each lane
# caches what it builds under $DELTATUNE_CI_CACHE (default ~/.cache/deltatune-ci) and pip's cache, so a
# warm run is short. Exit status: non-zero if any lane failed; every lane runs either way.
set -uo pipefail
cd "$(dirname "$0")/.."
export DELTATUNE_CI_CACHE=${DELTATUNE_CI_CACHE:-$HOME/.cache/deltatune-ci}
rc=0
lane() {  # lane NAME COMMAND...
  local name=$1; shift
  local t0=$SECONDS
  echo "--- lane $name: $*"
  if "$@"; then echo "--- lane $name: ok, $((SECONDS - t0)) s"
  else echo "--- lane $name: FAILED, $((SECONDS - t0)) s"; rc=1; fi
}
# deltatune's MindPet shells against the real MindPet 1.0.4 on MindSpore 2.10, in a venv of its own
lane mindpet env PYTHON=python3 bash scripts/mindpet_parity.sh
# llama.cpp (llama-cpp-python, built once into a cached wheel) runs the GGUF exports: logits, greedy
# decoding and perplexity against PyTorch
lane llama.cpp bash -c "bash scripts/build_llama_cpp.sh \
  && python3 -m pytest -q -p no:xdist -p no:cacheprovider tests/test_export_gguf.py -k llama_cpp"
# Jittor vs PyTorch (deltatune align): operators compile once into ~/.cache/jittor; first with Jittor's
# own matmuls (use_mkl=0), then with Debian's oneDNN as deltatune.jittor sets it up when it is installed
lane jittor env use_mkl=0 nvcc_path= python3 -m pytest -q -n 2 --dist loadgroup --timeout 2400 -p no:cacheprovider tests/jittor
lane jittor-onednn bash -c "bash scripts/install_onednn.sh && env -u use_mkl -u nvcc_path python3 -m pytest -q -n 2 \
  --dist loadgroup --timeout 2400 -p no:cacheprovider tests/jittor/test_jittor.py"
exit $rc
