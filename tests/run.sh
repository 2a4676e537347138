#!/usr/bin/env bash
# The test command. Finds the ComfyUI host (COMFYUI_PATH, else ~/ComfyUI) and runs pytest in the host's venv.
# Where there is no host but a ComfyUI mirror is named (COMFYUI_MIRROR) and a layout script sits beside
# the clone (../shared/tools/setup-host.sh, as on the project's CI machines), it lays one out first.
# Without any host it runs in a venv of its own: the host-free tests run, the host tests skip and say why.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
host=${COMFYUI_PATH:-$HOME/ComfyUI}
mirror=${COMFYUI_MIRROR:-}
setup=$repo/../shared/tools/setup-host.sh
if [ ! -x "$host/.venv/bin/python" ] && [ -n "$mirror" ] && [ -d "$mirror" ] && [ -f "$setup" ]; then
    echo "== laying out the ComfyUI host at $host from $mirror"
    bash "$setup" "$mirror" "$host"
fi
if [ -x "$host/.venv/bin/python" ] && [ -f "$host/comfy/model_sampling.py" ]; then
    py=$host/.venv/bin/python
    export COMFYUI_PATH=$host
else
    echo "== no ComfyUI host found: host tests will skip"
    [ -x "$repo/.venv-test/bin/python" ] || python3 -m venv "$repo/.venv-test"
    py=$repo/.venv-test/bin/python
fi
"$py" -m pip install -q torch numpy safetensors einops pillow tqdm pytest 2>&1 | grep -v "is ignored" || true
# browser tests (tests/test_browser.py): Debian's Chromium + the Playwright driver; never downloads a browser
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "== installing chromium for the browser tests"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
        || echo "== chromium could not be installed: browser tests will skip"
fi
"$py" -m pip install -q playwright 2>&1 | grep -v "is ignored" || true
"$py" -c "import comfyui_frontend_package" 2>/dev/null || { [ -f "$host/requirements.txt" ] && \
    "$py" -m pip install -q "$(grep -E '^comfyui-frontend-package==' "$host/requirements.txt")"; } || true
cd "$repo"
exec "$py" -m pytest "$@"
