#!/usr/bin/env bash
# The test command. Finds the ComfyUI host (COMFYUI_PATH, else ~/ComfyUI), lays one out from a local
# mirror when there is none and one is at hand (COMFYUI_MIRROR), and runs pytest in the host's venv.
# Without any host it runs in a venv of its own: the host-free tests run, the host tests skip and say why.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
host=${COMFYUI_PATH:-$HOME/ComfyUI}
mirror=${COMFYUI_MIRROR:-/work/.mirror/yzkee+ComfyUI/repo}
setup=$repo/../shared/tools/setup-host.sh
if [ ! -x "$host/.venv/bin/python" ] && [ -d "$mirror" ] && [ -f "$setup" ]; then
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
"$py" -m pip install -q torch numpy safetensors einops pytest 2>&1 | grep -v "is ignored" || true
cd "$repo"
exec "$py" -m pytest "$@"
