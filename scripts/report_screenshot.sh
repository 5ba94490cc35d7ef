#!/usr/bin/env bash
# Look at an HTML report as a browser shows it: a headless Chromium screenshot (PNG).
#
#   scripts/report_screenshot.sh REPORT.html [OUT.png] [WIDTHxHEIGHT]
#
# Needs Chromium (Debian: apt-get install -y chromium). Writes OUT.png (default: the report's
# name with .png) at 1200x2400 by default. Used to check the report's layout by eye after a
# change to dynopool_convert/report/{html,figures}.py: captions under the figures, site names
# in the tables, FLOPs as 5.04M, x labels on every panel, no blank band under a title.
#
# Example (the README's quick start first):
#   dynopool report runs/demo/best.pt --format html --out runs/demo/report.html
#   scripts/report_screenshot.sh runs/demo/report.html runs/demo/report.png
set -euo pipefail

html=${1:?usage: $0 REPORT.html [OUT.png] [WIDTHxHEIGHT]}
out=${2:-${html%.*}.png}
size=${3:-1200x2400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$browser" ]]; then
    echo "error: no chromium found (Debian: apt-get install -y chromium)" >&2
    exit 2
fi
[[ -f "$html" ]] || { echo "error: $html does not exist" >&2; exit 2; }

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# offline and quiet: no network, no first-run, a throw-away profile
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --hide-scrollbars --screenshot="$(realpath -m "$out")" \
    --window-size="${size/x/,}" "file://$(realpath "$html")" >/dev/null 2>&1
[[ -s "$out" ]] || { echo "error: chromium wrote no screenshot" >&2; exit 1; }
echo "$out"
