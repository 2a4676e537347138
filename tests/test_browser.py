"""The pack in a real browser: a real ComfyUI server (``main.py --cpu``) with the pack installed through
a symlink in its ``custom_nodes/``, its real frontend in headless Chromium (Debian's ``chromium``,
driven by Playwright; no browser is downloaded).

- every example workflow loads in the frontend, which saves it back unchanged and queues exactly the
  API prompt that ``d2f_host.workflow.to_api`` makes (the converter ``d2f run`` and the tests use);
- the training workflow is found in the template browser (Extensions → diff2flow_bridge), loaded
  from there, set to tiny CPU settings, queued with the Run button; the D2FTrain node's live loss
  chart draws while it trains, the status line ends at "done", the flow patch shows its read-out,
  and the run finishes with the LoRA written.

Screenshots go to the test's tmp folder and, when set, to $D2F_SCREENSHOT_DIR. Skips, saying why,
only when there is no host, no Chromium or no Playwright.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_host  # noqa: E402

from d2f_host import examples, frontend, migrate  # noqa: E402
from d2f_host import workflow as wf  # noqa: E402

PACK_DIR = comfy_host.PACK_DIR
WORKFLOW_DIR = os.path.join(PACK_DIR, "workflows")
NAMES = sorted(examples.EXAMPLES)
TRAIN = "d2f_sd15_train_lora"

# what the browser test changes on the loaded training workflow, through the widgets
TINY_WIDGETS = {
    "D2FTrain": {"steps": 6, "save_every": 3, "preview_every": 0, "rank": 4, "gradient_checkpointing": "off"},
    "D2FTrainAdvanced": {"training_dtype": "fp32", "alpha": 4},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
}


def _missing() -> str | None:
    location = comfy_host.find_host()
    if not location:
        return location.how
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        return ("the host's frontend (comfyui_frontend_package) is not installed in this Python: "
                f"pip install it from {location.path}/requirements.txt")
    if importlib.util.find_spec("playwright") is None:
        return "the Python package 'playwright' is not installed (pip install playwright; no browser download needed)"
    if frontend.chromium_path() is None:
        return "no Chromium (apt-get install chromium)"
    return None


MISSING = _missing()
if MISSING:
    print(f"test_browser: SKIPPED — {MISSING}")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING or "")


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    target = os.environ.get("D2F_SCREENSHOT_DIR")
    if target:
        os.makedirs(target, exist_ok=True)
        for p in folder.iterdir():
            shutil.copy(p, os.path.join(target, p.name))


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):
    """ComfyUI on a free loopback port, base directory in tmp, the pack symlinked into its
    custom_nodes/, a tiny SD1.5 checkpoint and the training folder under the names the workflows use."""
    base = tmp_path_factory.mktemp("comfyui_base")
    srv = frontend.ComfyServer(host.path, str(base), PACK_DIR, startup_timeout=180).prepare()
    ckpt = os.path.join(srv.models_dir, "checkpoints", examples.SD15_CKPT)
    written = os.path.join(host.checkpoint_dir, examples.SD15_CKPT)  # test_workflows' copy, if it ran
    if os.path.exists(written):
        os.symlink(written, ckpt)
    else:
        unet = comfy_host.tiny_unet_state_dict(comfy_host.SD15_UNET_CONFIG, "SD15", seed=0)
        comfy_host.write_sd15_checkpoint(ckpt, unet)
    comfy_host.write_training_folder(os.path.join(srv.input_dir, examples.TRAIN_FOLDER))
    comfy_host.write_pattern_png(os.path.join(srv.input_dir, examples.IMG2IMG_IMAGE), (40, 90, 160))
    srv.start()
    try:
        srv.quiet_ui()  # no template browser popping up by itself, no minimap over the nodes
        yield srv
    finally:
        srv.stop()
        print(f"\nComfyUI server log (tail):\n{srv.log_tail(15)}")


@pytest.fixture(scope="module")
def page(server):
    with frontend.browser(viewport=(1600, 1100)) as page:
        frontend.open_app(page, server.url)
        yield page
        errors = [m for m in page.console_log if m.startswith("pageerror") or ("d2f" in m and "error" in m)]
        assert not errors, errors


def _find_d2f_errors(page):
    return [m for m in page.console_log if "pageerror" in m or ("d2f.js" in m and m.startswith("error"))]


def test_extension_is_registered_once(server, page):
    urls = [u for u in server.get_json("/extensions") if "d2f.js" in u]
    assert urls, "the server does not list web/d2f.js"
    count = page.evaluate("() => window.app.extensions.filter(e => e.name === 'diff2flow.bridge').length")
    assert count == 1, f"extension registered {count} times (served as {urls})"


def test_couplings_nodes_show_how_their_pairs_were_made(server, page):
    """After D2FLoadReflowPairs (or D2FReflowPairs) ran, the node shows the folder's recorded settings: the executed
    message's ``d2f_couplings`` entry (tests/test_host_reflow.py checks what the node sends) through the node's own
    onExecuted hook."""
    info = {"pairs": 64, "folder": "d2f_reflow_demo", "model_type": "BaseModel", "prediction": "eps",
            "model": "0123456789abcdef", "latent": [4, 64, 64], "sampler": "euler_flow", "steps": 25, "cfg": 7.0,
            "shift": 1.0, "seed": 0, "prompts": 1, "pack_version": "9.9.9"}
    text = page.evaluate("""(info) => {
      const g = window.app.rootGraph || window.app.graph;
      const node = window.LiteGraph.createNode('D2FLoadReflowPairs');
      g.add(node);
      node.onExecuted({d2f_couplings: [info]});
      const el = node.d2fCouplings;
      const shown = el ? el.textContent : null;
      g.remove(node);
      return shown;
    }""", info)
    assert text is not None, "no read-out on D2FLoadReflowPairs"
    lines = text.splitlines()
    assert lines[0] == "64 pairs · 1 prompt · d2f_reflow_demo", lines
    assert lines[1] == "BaseModel (ε) · latent 4×64×64", lines
    assert lines[2] == "euler_flow 25 steps · cfg 7 · shift 1 · seed 0", lines
    assert "0123456789abcdef" in lines[3] and "9.9.9" in lines[3], lines
    assert not _find_d2f_errors(page)


def test_frontend_loads_saves_and_queues_every_workflow_as_the_converter_does(server, page):
    defs = server.get_json("/object_info", timeout=60)
    for name in NAMES:
        data = wf.load(os.path.join(WORKFLOW_DIR, f"{name}.json"))
        saved = frontend.load_and_serialize(page, data, name)
        assert saved["output"] == wf.to_api(data, defs), f"{name}: the frontend queues a different prompt"
        assert saved["workflow"]["links"] == data["links"], f"{name}: links changed on load/save"
        before = {n["id"]: n.get("widgets_values") for n in data["nodes"]}
        after = {n["id"]: n.get("widgets_values") for n in saved["workflow"]["nodes"]}
        assert after == before, f"{name}: widget values changed on load/save"
    assert not _find_d2f_errors(page)


def _option_nodes_of(workflow: dict, train_id: int) -> dict:
    """option node type → its widgets_values, for the nodes linked into D2FTrain ``train_id``."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    out = {}
    for link in wf.links_of(workflow).values():
        if link.target_id == train_id and nodes[link.origin_id]["type"] in ("D2FTrainAdvanced", "D2FScheduledSampling"):
            out[nodes[link.origin_id]["type"]] = nodes[link.origin_id]["widgets_values"]
    return out


@pytest.mark.parametrize("changed", [True, False], ids=["moved-settings-changed", "all-at-defaults"])
def test_frontend_migrates_a_workflow_of_the_previous_version(server, page, changed):
    """An old D2FTrain (the previous version's 31 positional widget values, moved settings changed) loads with
    its values on the right widgets and option nodes holding the moved ones, linked to its inputs; the prompt
    the frontend queues is the one ``d2f run`` makes of the same file (``d2f_host.migrate``). Left at their
    defaults, the moved settings need no option node."""
    from test_migrate import CHANGED, LAYOUTS, OLD_DEFAULTS, old_workflow

    defs = server.get_json("/object_info", timeout=60)
    layout = LAYOUTS[0]["widgets"]
    values = dict(OLD_DEFAULTS, **(CHANGED if changed else {"steps": 42}))
    old = old_workflow(values, layout)
    old["nodes"][0]["widgets_values"] = [examples.SD15_CKPT]
    saved = frontend.load_and_serialize(page, old, "old_d2f_train")
    assert saved["output"] == wf.to_api(old, defs), "the frontend queues another prompt than d2f run"
    train = next(n for n in saved["workflow"]["nodes"] if n["type"] == "D2FTrain")
    # Widgets added after the old layouts (e.g. sharding) come with their defaults.
    current = wf.widget_specs(defs["D2FTrain"])
    assert train["widgets_values"] == [values[w.name] if w.name in values else wf.default_widget_value(w)
                                       for w in current]
    options = _option_nodes_of(saved["workflow"], train["id"])
    if not changed:
        assert options == {}
        return
    moved = migrate.table()["D2FTrain"]["moved"]
    for typ, spec in moved.items():
        by_new = {new: values[old] for old, new in spec["widgets"].items()}
        # a setting the option node gained after the old layouts (sharding) comes with its default
        assert options[typ] == [by_new.get(w.name, wf.default_widget_value(w)) for w in wf.widget_specs(defs[typ])], typ
    # saved again, the migrated workflow loads as it is (nothing left to migrate)
    again = frontend.load_and_serialize(page, saved["workflow"], "old_d2f_train_again")
    assert again["output"] == saved["output"]
    assert not _find_d2f_errors(page)


def _set_widgets_js():
    return """
    (settings) => {
      const g = window.app.rootGraph || window.app.graph;
      const done = [];
      for (const node of g._nodes) {
        const want = settings[node.type];
        if (!want) continue;
        for (const [name, value] of Object.entries(want)) {
          const w = (node.widgets || []).find(w => w.name === name);
          if (!w) throw new Error(`${node.type} has no widget ${name}`);
          w.value = value;
          w.callback?.(value);
          done.push(`${node.type}.${name}`);
        }
      }
      window.app.canvas.setDirty(true, true);
      return done;
    }
    """


def _history_status(server, before: set):
    hist = server.get_json("/history")
    new = {k: v for k, v in hist.items() if k not in before}
    return next(iter(new.values()), None)


def test_training_workflow_from_template_browser_draws_live_loss_chart(server, page, shots):
    t0 = time.monotonic()
    # the template browser lists the pack's workflows under Extensions → diff2flow_bridge
    page.locator(".templates-tab-button").click()
    page.get_by_text("diff2flow_bridge", exact=True).click()
    cards = page.locator("[data-testid^='template-workflow-d2f_']")
    cards.first.wait_for(timeout=30_000)
    listed = sorted(page.evaluate("() => Array.from(document.querySelectorAll(\"[data-testid^='template-workflow-d2f_']\"))"
                                  ".map(e => e.getAttribute('data-testid').slice('template-workflow-'.length))"))
    assert listed == NAMES, listed
    page.wait_for_timeout(800)  # thumbnails
    page.screenshot(path=str(shots / "01_template_browser.png"))

    page.locator(f"[data-testid='template-workflow-{TRAIN}']").click()
    page.wait_for_function("() => (window.app.rootGraph || window.app.graph)._nodes.some(n => n.type === 'D2FTrain')",
                           timeout=30_000)
    page.wait_for_timeout(500)
    frontend.close_dialogs(page)
    types = page.evaluate("() => (window.app.rootGraph || window.app.graph)._nodes.map(n => n.type)")
    for needed in ("LoadImageTextDataSetFromFolder", "MakeTrainingDataset", "D2FTrain", "SaveLoRA", "LossGraphNode",
                   "KSampler", "D2FFlowPatch", "Note"):
        assert needed in types, f"the template loaded without {needed}: {types}"
    changed = page.evaluate(_set_widgets_js(), TINY_WIDGETS)
    assert len(changed) == sum(len(v) for v in TINY_WIDGETS.values()), changed
    frontend.frame(page)
    page.screenshot(path=str(shots / "02_training_workflow_loaded.png"))
    assert page.locator(".d2f-loss-chart").count() == 1, "no loss chart on the D2FTrain node"

    before = set(server.get_json("/history"))
    page.get_by_role("button", name="Run", exact=True).first.click()

    # the chart draws while training runs
    chart = page.locator(".d2f-loss-chart")
    page.wait_for_function("() => { const c = document.querySelector('.d2f-loss-chart'); "
                           "return c && Number(c.dataset.points || 0) >= 2; }", timeout=240_000)
    frontend.frame(page, ["D2FTrain", "MakeTrainingDataset", "SaveLoRA", "LossGraphNode", "D2FFlowPatch"])
    page.wait_for_timeout(300)
    page.screenshot(path=str(shots / "03_training_live_chart.png"))
    status = page.locator(".d2f-train-status").inner_text()
    assert "step" in status and "/6" in status, status
    assert int(chart.get_attribute("data-points")) >= 2

    # ... and the run finishes
    deadline = time.monotonic() + 300
    entry = None
    while time.monotonic() < deadline:
        entry = _history_status(server, before)
        if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
            break
        time.sleep(1.0)
    assert entry, f"the prompt did not finish; server log:\n{server.log_tail(40)}"
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], default=str)[:3000]
    page.wait_for_function("() => document.querySelector('.d2f-train-panel')?.dataset.status === 'done'", timeout=30_000)
    page.wait_for_function("() => !!document.querySelector('.d2f-patch-readout')", timeout=30_000)
    page.wait_for_timeout(800)
    frontend.frame(page)
    page.screenshot(path=str(shots / "04_training_done.png"))
    frontend.frame(page, ["D2FTrain", "D2FFlowPatch", "MakeTrainingDataset", "LoadImageTextDataSetFromFolder"])
    page.screenshot(path=str(shots / "05_chart_and_patch_readout.png"))

    status = page.locator(".d2f-train-status").inner_text()
    assert status.startswith("done") and "step 6/6" in status and "saved" in status, status
    assert int(chart.get_attribute("data-points")) == 6
    readout = page.locator(".d2f-patch-readout").inner_text()
    assert "ε-prediction" in readout and "0.9360" in readout, readout
    loras = os.listdir(os.path.join(server.output_dir, "loras"))
    assert any(f.startswith("d2f_sd15_lora") and f.endswith(".safetensors") for f in loras), loras
    outputs = entry.get("outputs", {})
    assert any(img.get("type") == "output" for out in outputs.values() for img in out.get("images", [])), outputs
    assert not _find_d2f_errors(page)
    print(f"browser training test: {time.monotonic() - t0:.1f} s; screenshots in {shots}")


VALIDATION_WIDGETS = {"every_n_steps": 3, "loss_times": 2, "grid_steps": "1,2,4", "images": 2, "cfg": 3.0,
                      "max_seconds": 0.0}
DOCS_SHOT = os.path.join(PACK_DIR, "docs", "validation_chart_and_grid.png")

ADD_VALIDATION_JS = """
(widgets) => {
  const g = window.app.rootGraph || window.app.graph;
  const train = g._nodes.find(n => n.type === 'D2FTrain');
  // the example workflow carries one: set that one; else add one next to D2FTrain
  let node = g._nodes.find(n => n.type === 'D2FValidation');
  if (!node) {
    node = window.LiteGraph.createNode('D2FValidation');
    node.pos = [train.pos[0] - node.size[0] - 40, train.pos[1] + train.size[1] - node.size[1]];
    g.add(node);
  }
  for (const [name, value] of Object.entries(widgets)) {
    const w = node.widgets.find(w => w.name === name);
    if (!w) throw new Error(`D2FValidation has no widget ${name}`);
    w.value = value;
  }
  const control = node.widgets.find(w => w.name === 'control_after_generate');
  if (control && control.value !== 'fixed') throw new Error(`D2FValidation's seed is set to change: ${control.value}`);
  const slot = train.findInputSlot('validation');
  if (slot < 0) throw new Error('D2FTrain has no validation input');
  node.connect(0, train, slot);
  window.app.canvas.setDirty(true, true);
  return train.inputs[slot].link !== null;
}
"""


def test_validation_draws_second_series_and_grid_on_the_node(server, page, shots):
    """D2FValidation on the training workflow (one of its two images held out): the held-out loss appears as a
    second chart series at steps 3 and 6, the status line reports validation seconds apart from samples/s, and
    the latest validation grid (rows: images, columns: 1, 2, 4 steps) is shown on the node, loaded from the
    PNG the run saved. The screenshot goes to docs/validation_chart_and_grid.png for the README."""
    data = wf.load(os.path.join(WORKFLOW_DIR, f"{TRAIN}.json"))
    page.evaluate("async ([w, n]) => { await window.app.loadGraphData(w, true, true, n); }", [data, TRAIN])
    frontend.close_dialogs(page)
    page.evaluate(_set_widgets_js(), TINY_WIDGETS)
    assert page.evaluate(ADD_VALIDATION_JS, VALIDATION_WIDGETS), "D2FValidation could not be connected"

    before = set(server.get_json("/history"))
    page.get_by_role("button", name="Run", exact=True).first.click()
    deadline = time.monotonic() + 360
    entry = None
    while time.monotonic() < deadline:
        entry = _history_status(server, before)
        if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
            break
        time.sleep(1.0)
    assert entry, f"the prompt did not finish; server log:\n{server.log_tail(40)}"
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], default=str)[:3000]
    page.wait_for_function("() => document.querySelector('.d2f-train-panel')?.dataset.status === 'done'", timeout=30_000)
    page.wait_for_function("() => { const i = document.querySelector('.d2f-validation-grid'); "
                           "return i && i.complete && i.naturalWidth > 0 && "
                           "document.querySelector('.d2f-validation-panel')?.dataset.step === '6'; }", timeout=30_000)
    chart = page.locator(".d2f-loss-chart")
    assert chart.get_attribute("data-val-points") == "2", chart.get_attribute("data-val-points")
    assert int(chart.get_attribute("data-points")) == 6
    runs = page.evaluate("() => Array.from(window.__d2fBridge.runs.values()).map(r => r.val.map(p => p.step))")
    assert [3, 6] in runs, runs
    status = page.locator(".d2f-train-status").inner_text()
    assert "held-out" in status and "validation" in status and " s" in status, status
    caption = page.locator(".d2f-validation-caption").inner_text()
    assert "step 6" in caption and "1, 2, 4" in caption, caption
    size = page.evaluate("() => { const i = document.querySelector('.d2f-validation-grid'); "
                         "return [i.naturalWidth, i.naturalHeight]; }")
    assert size[0] == 3 * size[1], size  # 3 columns × 1 row (one of the two images is held out) of square cells

    states = os.path.join(server.output_dir, "d2f_states")
    pngs = sorted(f for d in os.listdir(states) for f in os.listdir(os.path.join(states, d)) if f.endswith(".png"))
    assert "validation_000003_steps.png" in pngs and "validation_000006_steps.png" in pngs, pngs

    frontend.frame(page, ["D2FTrain", "D2FValidation"])
    page.wait_for_timeout(800)
    page.screenshot(path=str(shots / "06_validation_chart_and_grid.png"))
    os.makedirs(os.path.dirname(DOCS_SHOT), exist_ok=True)
    shutil.copy(shots / "06_validation_chart_and_grid.png", DOCS_SHOT)
    assert not _find_d2f_errors(page)
