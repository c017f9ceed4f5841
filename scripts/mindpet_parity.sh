#!/usr/bin/env bash
# Parity lane: compare deltatune's MindPet shells against the REAL MindPet 1.0.4 on MindSpore 2.10 (CPU).
#
# Builds (once) a separate virtual environment for MindSpore/MindPet, cached under
# ${DELTATUNE_CI_CACHE:-$HOME/.cache/deltatune-ci}/mindpet-venv and keyed by a marker file naming the
# pinned versions; the project's own environment is never touched. pip's download cache is reused.
# Then: the MindSpore side writes weights, inputs, outputs and gradients to .npz files, the deltatune
# side (the project's python, $PYTHON or python3) loads them, computes the same things, prints a table
# and exits non-zero if any row differs by more than 1e-5.
#
# Usage: scripts/mindpet_parity.sh [--install-only] [--record DIR]
#   --record DIR   also copy MindPet's recorded outputs to DIR (the fixtures of tests/compat).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
CACHE="${DELTATUNE_CI_CACHE:-$HOME/.cache/deltatune-ci}"
VENV="$CACHE/mindpet-venv"
PYTHON="${PYTHON:-python3}"
# the pins: MindSpore 2.10 extensions are built against NumPy 1.x; mindformers 2.1.0 pins mindspore 2.11
# but imports under 2.10, hence --no-deps for it
PINS="mindspore==2.10.0 mindpet==1.0.4 numpy<2 pandas<3 pyarrow<21"
NODEPS_PINS="mindformers==2.1.0"
# what mindformers' import chain (mindpet.delta falls back to mindformers.modules.layers) needs on top,
# found by importing until nothing was missing; versions as tested
IMPORT_DEPS="deprecated==1.3.1 requests==2.34.2 rouge-chinese==1.0.3 datasets==4.0.0 tiktoken==0.14.0
tensorboardX==2.6.5 sentencepiece==0.2.3 tokenizers==0.23.3 jieba==0.42.1 regex==2026.12.2 ftfy==6.3.1"
MARKER="$VENV/.deltatune-pins"
WANT="$PINS | $NODEPS_PINS | $(echo $IMPORT_DEPS) | harness-2"

install_only=0
record=""
while [ $# -gt 0 ]; do
  case "$1" in
    --install-only) install_only=1 ;;
    --record) record="$2"; shift ;;
    *) echo "mindpet_parity.sh: unknown argument '$1' (expected --install-only or --record DIR)" >&2; exit 2 ;;
  esac
  shift
done

if [ ! -f "$MARKER" ] || [ "$(cat "$MARKER")" != "$WANT" ]; then
  echo "[mindpet-parity] building $VENV (pins: $WANT)"
  if [ -e "$VENV" ]; then
    # only ever remove a venv this script built (or began to build)
    if [ ! -f "$MARKER" ] && [ ! -f "$VENV/.deltatune-building" ]; then
      echo "mindpet_parity.sh: $VENV exists but was not built by this script; remove it or set DELTATUNE_CI_CACHE" >&2
      exit 2
    fi
    rm -rf "$VENV"
  fi
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  touch "$VENV/.deltatune-building"
  "$VENV/bin/pip" install -q --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q $PINS
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q --no-deps $NODEPS_PINS
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q $IMPORT_DEPS $PINS
  "$VENV/bin/python" -c "import mindspore, mindpet.delta, mindpet.graph; print('[mindpet-parity] mindspore', mindspore.__version__)"
  echo "$WANT" > "$MARKER"
  rm -f "$VENV/.deltatune-building"
else
  echo "[mindpet-parity] reusing $VENV"
fi
[ "$install_only" = 1 ] && exit 0

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# run from the scratch folder: mindformers writes its logs to ./output/log of the working directory
(cd "$WORK" && "$VENV/bin/python" "$HERE/mindpet_parity/mindspore_side.py" "$WORK")
PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$HERE/mindpet_parity/deltatune_side.py" "$WORK"
if [ -n "$record" ]; then
  mkdir -p "$record"
  cp "$WORK"/*.npz "$record"/
  echo "[mindpet-parity] recorded MindPet outputs copied to $record"
fi
