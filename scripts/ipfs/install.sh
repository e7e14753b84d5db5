#!/usr/bin/env bash
# Install the real IPFS daemon the content-store tests run (npm ipfs@0.66.1, js-ipfs, with the overrides in
# package.json) into scripts/ipfs/node_modules from the committed package-lock.json.
# Safe to run again: it does nothing when node_modules was installed from the same package.json and lockfile.
# npm ci --omit=optional: js-ipfs's optional WebRTC dependencies (electron-webrtc, wrtc) download binaries from
# GitHub in their install scripts; the daemon the tests need (TCP only) does not use them. ~30 s with a cold npm
# cache on 2 cores. The "headless" override in package.json only pins a GitHub-tarball dependency of that optional
# tree to its registry release, so that the lockfile resolves from the npm registry alone.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "node and npm are needed for the IPFS test daemon (Debian: apt-get install nodejs npm)" >&2
  exit 1
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 16 ]; then
  echo "js-ipfs 0.66.1 needs Node.js >= 16; node is $(node --version)" >&2
  exit 1
fi

stamp=node_modules/.mirador-installed
want=$(cat package.json package-lock.json | sha256sum | cut -d' ' -f1)
if [ -f node_modules/ipfs/src/cli.js ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "==> js-ipfs: already installed (scripts/ipfs/node_modules)"
  exit 0
fi
echo "==> js-ipfs 0.66.1 for the content-store tests: npm ci (~30 s)"
npm ci --omit=optional --no-audit --no-fund --loglevel=error
echo "$want" > "$stamp"
echo "==> js-ipfs: installed in scripts/ipfs/node_modules"
