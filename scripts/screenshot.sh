#!/usr/bin/env bash
# Screenshot an HTML report in headless Chromium (Debian's chromium package), to look at it.
#   scripts/screenshot.sh runs/demo/report.html runs/demo/report.png
set -euo pipefail
page=$(realpath "$1"); out=${2:-${1%.html}.png}
command -v chromium >/dev/null || { echo "chromium missing: apt-get install -y chromium" >&2; exit 1; }
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --window-size=1280,2600 \
  --screenshot="$out" "file://$page" 2>/dev/null
rm -rf "$profile"
echo "wrote $out"
