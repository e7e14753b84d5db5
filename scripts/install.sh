#!/usr/bin/env bash
# Install Mirador into ./.venv on a Debian machine: apt packages, the CPU build of torch, the project itself,
# with --test (first argument) the test tools, and with --bench (any position) what bench/ needs beyond that: Debian's
# fortunes package (the text corpus of bench/federated_quality.py) and matplotlib (its plot). Safe to run again: it only installs what is
# missing.
# The first run builds llama.cpp from source (llama-cpp-python): about 5-10 minutes on 2 cores. pip caches the
# built wheel, so later installs on the same machine take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

tests=""
[ "${1:-}" = "--test" ] && tests=1
bench=""
for arg in "$@"; do
  case "$arg" in --bench) bench=1 ;; esac
done
groups=()
[ -n "$tests" ] && groups+=(test)
[ -n "$bench" ] && groups+=(bench)
extras=""
[ ${#groups[@]} -gt 0 ] && extras="[$(IFS=,; echo "${groups[*]}")]"

# bubblewrap: the sandbox for untrusted code (node/tools/sandbox), needed at run time, not only by the tests
apt_packages=(build-essential cmake pkg-config git python3-dev python3-venv libgmp-dev bubblewrap)
# the tests also start a real IPFS daemon (js-ipfs, from npm): Node.js and npm, unless already on the machine
if [ -n "$tests" ] && ! { command -v node >/dev/null && command -v npm >/dev/null; }; then
  apt_packages+=(nodejs npm)
fi
# bench/federated_quality.py trains on categories of fortune cookies (/usr/share/games/fortunes)
if [ -n "$bench" ]; then
  apt_packages+=(fortunes)
fi
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "==> apt: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "Mirador needs Python 3.11; $python is $("$python" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
[ -x .venv/bin/python ] || { echo "==> creating .venv"; "$python" -m venv .venv; }
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q -U pip wheel setuptools

echo "==> torch 2.13.0 (CPU build)"
"${pip[@]}" install -q torch==2.13.0

if ! .venv/bin/python -c 'import llama_cpp' 2>/dev/null; then
  echo "==> llama-cpp-python: building llama.cpp from source if pip has no cached wheel (5-10 min on 2 cores)"
fi
# LLAVA_BUILD=OFF skips the multimodal library (halves the build); BLAS stays off (it slows prompt processing).
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
echo "==> mirador${extras} and its pinned dependencies"
"${pip[@]}" install -q -e ".${extras}"
echo "==> installed: $(.venv/bin/mirador --version)"
if [ -n "$tests" ]; then
  bash scripts/ipfs/install.sh
fi
