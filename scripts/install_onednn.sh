#!/usr/bin/env bash
# Debian's oneDNN (libdnnl-dev) for Jittor's CPU matmuls: deltatune.jittor points Jittor's oneDNN folder at
# it (use_mkl=1, nothing downloaded), about 20x faster than Jittor's own loops. Optional: without it (no
# apt, not root, offline) Jittor runs its own matmuls (use_mkl=0) and this script says so and exits 0.
set -uo pipefail
if dpkg -s libdnnl-dev >/dev/null 2>&1; then echo "oneDNN: libdnnl-dev already installed"; exit 0; fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
if command -v apt-get >/dev/null 2>&1 && { $SUDO apt-get install -y -q libdnnl-dev >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q libdnnl-dev >/dev/null 2>&1; }; }; then
  echo "oneDNN: installed libdnnl-dev $(dpkg-query -W -f='${Version}' libdnnl-dev)"
else
  echo "oneDNN: libdnnl-dev could not be installed; Jittor will run its own matmuls (use_mkl=0)"
fi
exit 0
