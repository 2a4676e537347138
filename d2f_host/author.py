"""Write the pack's ``workflows/*.json`` as ComfyUI's frontend saves them, with thumbnails.

``python -m d2f_host.author [--comfyui PATH] [--out DIR]``: starts the host's server (CPU, scratch
base directory), builds each example (``d2f_host.examples``) against the server's ``/object_info``,
loads it into the real frontend in headless Chromium, grows nodes to the size the frontend computes
for them, and saves what the frontend serializes (``graphToPrompt().workflow``) plus a JPEG
thumbnail of the canvas (``NAME.jpg``, which the template browser shows). It also checks that this
package's converter gives the same API prompt as the frontend.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile

from . import examples, frontend
from .host import find_comfyui, pack_dir
from .workflow import dump, to_api

FIT_AND_SAVE_JS = """
async ([workflow, name]) => {
  await window.app.loadGraphData(workflow, true, true, name);
  const graph = window.app.rootGraph || window.app.graph;
  for (const node of graph._nodes) {
    if (node.type === 'Note' || node.type === 'MarkdownNote') continue;
    const s = node.computeSize();
    node.setSize([Math.max(node.size[0], s[0]), Math.max(node.size[1], s[1])]);
  }
  window.app.canvas.setDirty(true, true);
  const p = await window.app.graphToPrompt();
  return JSON.stringify({workflow: p.workflow, output: p.output});
}
"""


HIDE_OVERLAYS_CSS = ("body > *:not(#vue-app), .p-toast, .p-toast-message, .side-tool-bar-container, .comfyui-menu, "
                     ".graph-canvas-menu, .minimap-main-container, .workflow-tabs-container, .actionbar, "
                     "[class*='minimap'], [class*='toast'], [class*='Toast'] { visibility: hidden !important; }")


def thumbnail(page, path: str, size=(800, 450)):
    """A JPEG of the whole graph (no UI chrome), at a zoom where the frontend draws text."""
    from PIL import Image

    page.add_style_tag(content=HIDE_OVERLAYS_CSS)
    frontend.frame(page)
    page.wait_for_timeout(500)
    png = page.locator("canvas#graph-canvas").screenshot()
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img.thumbnail(size)
    img.save(path, "JPEG", quality=88)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m d2f_host.author", description=__doc__)
    ap.add_argument("--comfyui", default=None)
    ap.add_argument("--out", default=os.path.join(pack_dir() or ".", "workflows"))
    ap.add_argument("--no-thumbnails", action="store_true")
    args = ap.parse_args(argv)
    comfyui, _ = find_comfyui(args.comfyui)
    base = tempfile.mkdtemp(prefix="d2f_author_")
    server = frontend.ComfyServer(comfyui, base, pack_dir()).prepare()
    # the files the examples name, as empty stand-ins, so the frontend shows no "missing model" marks
    for _, models, inputs in examples.EXAMPLES.values():
        for folder, names in models.items():
            for name in names:
                os.makedirs(os.path.join(server.models_dir, folder), exist_ok=True)
                open(os.path.join(server.models_dir, folder, name), "wb").close()
        if "folder" in inputs:
            os.makedirs(os.path.join(server.input_dir, inputs["folder"]), exist_ok=True)
        if "image" in inputs:
            src = os.path.join(comfyui, "input", inputs["image"])
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(server.input_dir, inputs["image"]))
    with server:
        server.quiet_ui()  # no template browser on first load, no minimap
        defs = server.get_json("/object_info", timeout=60)
        built = examples.build_all(defs)
        with frontend.browser(viewport=(2400, 1350)) as page:
            frontend.open_app(page, server.url)
            frontend.close_dialogs(page)
            for name, wf in built.items():
                saved = json.loads(page.evaluate(FIT_AND_SAVE_JS, [wf, name]))
                ours = to_api(saved["workflow"], defs)
                if ours != saved["output"]:
                    print(f"{name}: converter differs from the frontend:\n  ours {ours}\n  frontend {saved['output']}",
                          file=sys.stderr)
                    return 1
                dump(saved["workflow"], os.path.join(args.out, f"{name}.json"))
                if not args.no_thumbnails:
                    frontend.close_dialogs(page)
                    thumbnail(page, os.path.join(args.out, f"{name}.jpg"))
                print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
