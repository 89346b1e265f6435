#!/usr/bin/env bash
# docs/serve.png: the `ddim serve` page on the built-in model, after a run and an inverted
# drawing, in headless Chromium (Debian: apt-get install chromium chromium-driver).
# Usage: tools/serve_screenshot.sh [OUT.png]   (from the repository root; builds the release
# binary unless DDIM_BIN names one)
set -euo pipefail
out=${1:-docs/serve.png}
bin=${DDIM_BIN:-target/release/ddim}
[ -n "${DDIM_BIN:-}" ] || cargo build --release -q -p ddim-cli
port=7877 wd=9517
"$bin" serve --port $port 2>/dev/null &
server=$!
chromedriver --port=$wd >/dev/null 2>&1 &
driver=$!
trap 'kill $server $driver 2>/dev/null || true' EXIT
sleep 2
W=http://127.0.0.1:$wd
post() { curl -sf -X POST "$W/session$sid$1" -H 'Content-Type: application/json' -d "$2"; }
js() { post /execute/sync "{\"script\": \"$1\", \"args\": []}"; }
sid=$(curl -sf -X POST $W/session -H 'Content-Type: application/json' -d '{"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1180,1250"]}}}}' | grep -o '"sessionId":"[^"]*"' | cut -d'"' -f4)
sid=/$sid
post /url "{\"url\": \"http://127.0.0.1:$port/\"}" >/dev/null
sleep 1
js "document.getElementById('n').value = 8; document.getElementById('steps').value = 50; document.getElementById('go').click(); return 1" >/dev/null
until js "return document.body.dataset.done === '1'" | grep -q true; do sleep 0.2; done
# a "7" on the pad, then its inversion
js "const c = document.getElementById('pad').getContext('2d'); c.strokeStyle = '#fff'; c.lineWidth = 16; c.lineCap = 'round'; c.beginPath(); c.moveTo(45, 40); c.lineTo(125, 40); c.lineTo(70, 140); c.stroke(); document.getElementById('invert').click(); return 1" >/dev/null
until js "return !document.getElementById('inverted').hidden" | grep -q true; do sleep 0.2; done
curl -sf "$W/session$sid/screenshot" | grep -o '"value":"[^"]*"' | cut -d'"' -f4 | base64 -d > "$out"
curl -sf -X DELETE "$W/session$sid" >/dev/null
echo "wrote $out"
