"""The pack's example workflows (``workflows/*.json``) against the real host.

- every file is a UI-format workflow that the host's template browser lists (the host scans a
  custom node's ``workflows/`` folder), with a thumbnail and a Note;
- every file validates against the host's node definitions (node types exist, widget value count,
  types, ranges and combo options as the frontend lays widgets out, link types, required inputs);
- every file runs end to end on CPU, converted to API format the way the frontend does
  (``d2f_host.workflow.to_api``), through the host's own ``execution.validate_prompt`` and
  ``execution.PromptExecutor``, against tiny checkpoints written under the names the workflows use
  (the training workflow with a folder of 2 tiny captioned images, the Reflow workflow making and
  training on 2 tiny pairs);
- ``d2f run`` runs the txt2img workflow in a separate process.

Sizes are shrunk for CPU with overrides (64×64, 2 steps), the graphs themselves are run as saved.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_host  # noqa: E402

from d2f_host import examples  # noqa: E402
from d2f_host import workflow as wf  # noqa: E402

PACK_DIR = comfy_host.PACK_DIR
WORKFLOW_DIR = os.path.join(PACK_DIR, "workflows")
WORKFLOW_FILES = sorted(glob.glob(os.path.join(WORKFLOW_DIR, "*.json")))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in WORKFLOW_FILES]
PACK_NODE_TYPES = {"D2FFlowPatch", "D2FFlowScheduler", "D2FEulerFlowSampler", "D2FRescaleCFG", "D2FTrain",
                   "D2FTrainAdvanced", "D2FScheduledSampling", "D2FEMA", "D2FValidation", "D2FReflowPairs",
                   "D2FLoadReflowPairs"}

# Per workflow, on top of TINY: the v-pred workflow runs on the same tiny SDXL file as the ε one (its
# v-prediction comes from ModelSamplingDiscrete, not from the file), so the shared executor's cache
# spares a second CLIP-G load and encode, as it would in the server.
EXTRA = {"d2f_sdxl_vpred_txt2img": [("CheckpointLoaderSimple", "ckpt_name", examples.SDXL_CKPT)]}

# CPU-sized settings; each applies where the workflow has such a node. (D2FTrain previews are off:
# one costs ~30 s of CPU here.)
TINY = [("EmptyLatentImage", "width", 64), ("EmptyLatentImage", "height", 64), ("KSampler", "steps", 2),
        ("D2FFlowScheduler", "steps", 2), ("D2FTrain", "steps", 2), ("D2FTrainAdvanced", "training_dtype", "fp32"),
        ("D2FTrain", "rank", 4), ("D2FTrainAdvanced", "alpha", 4.0), ("D2FTrain", "save_every", 2),
        ("D2FTrain", "preview_every", 0), ("D2FTrain", "gradient_checkpointing", False), ("D2FTrain", "batch_size", 1),
        ("D2FReflowPairs", "count", 2), ("D2FReflowPairs", "steps", 2), ("D2FReflowPairs", "batch_size", 2),
        ("D2FReflowPairs", "width", 64), ("D2FReflowPairs", "height", 64), ("D2FValidation", "grid_steps", "1,2"),
        ("D2FValidation", "loss_times", 2), ("D2FValidation", "images", 1)]


def tiny_overrides(prompt: dict) -> list:
    types = {e["class_type"] for e in prompt.values()}
    return [t for t in TINY if t[0] in types]


def path_of(name: str) -> str:
    return os.path.join(WORKFLOW_DIR, f"{name}.json")


# ---------------------------------------------------------------------------------------------
# host-free: the files and the converter
# ---------------------------------------------------------------------------------------------
def test_every_example_is_shipped_with_a_thumbnail():
    assert sorted(NAMES) == sorted(examples.EXAMPLES), "workflows/ and d2f_host.examples.EXAMPLES disagree"
    for name in NAMES:
        assert os.path.isfile(os.path.join(WORKFLOW_DIR, f"{name}.jpg")), f"{name}.jpg (template thumbnail) missing"
        data = wf.load(path_of(name))
        assert data.get("version") == 0.4 and isinstance(data.get("links"), list) and "groups" in data
        notes = [n for n in data["nodes"] if n["type"] in ("Note", "MarkdownNote")]
        assert notes and all(len(n["widgets_values"][0]) > 200 for n in notes), f"{name}: needs an explanatory Note"
        assert PACK_NODE_TYPES & {n["type"] for n in data["nodes"]}, f"{name} uses none of the pack's nodes"


@pytest.mark.parametrize("name", NAMES)
def test_every_node_sits_inside_its_group_and_on_no_other_node(name):
    """As the frontend draws the file: each node (title bar included, at least as tall as its widget and
    socket rows make it, whatever size was saved) lies inside exactly one group's body, below the group's
    title, touches no other group, and overlaps no other node. Groups overlap no other group."""
    data = wf.load(path_of(name))
    groups = {g["title"]: wf.group_body(g) for g in data["groups"]}
    assert groups, f"{name}: no groups"
    titles = list(groups)
    for i, a in enumerate(titles):
        for b in titles[i + 1:]:
            assert not wf.rects_overlap(groups[a], groups[b]), f"{name}: groups {a!r} and {b!r} overlap"
    rects = {f"{n['id']} {n.get('title') or n['type']}": wf.node_rect(n) for n in data["nodes"]}
    for label, rect in rects.items():
        inside = [t for t, body in groups.items() if wf.rect_inside(rect, body)]
        touched = [t for t, body in groups.items() if wf.rects_overlap(rect, body)]
        assert len(inside) == 1 and touched == inside, (
            f"{name}: node {label} at {rect} is inside {inside}, touches {touched}; groups: {groups}")
    labels = list(rects)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            assert not wf.rects_overlap(rects[a], rects[b]), f"{name}: nodes {a} {rects[a]} and {b} {rects[b]} overlap"


def test_drawn_height_counts_widget_and_socket_rows():
    """A D2FTrain saved 720 px tall is drawn at least 35 rows tall (30 widgets, 5 input sockets); a Note
    keeps its saved size."""
    train = {"pos": [0, 100], "size": [400, 720], "widgets_values": [0] * 30,
             "inputs": [{"name": f"i{k}", "link": None} for k in range(5)] + [{"name": "steps", "widget": {}}],
             "outputs": [{"name": f"o{k}"} for k in range(4)]}
    left, top, right, bottom = wf.node_rect(train)
    assert (left, top, right) == (0, 100 - wf.NODE_TITLE_HEIGHT, 400) and bottom - 100 >= 35 * 24
    note = {"pos": [0, 0], "size": [360, 560], "widgets_values": ["text"], "inputs": [], "outputs": []}
    assert wf.node_rect(note)[3] == 560


def _tiny_graph():
    """A hand-made UI graph with a Reroute, a bypassed node, a muted node, a PrimitiveNode and a Note."""
    defs = {
        "Src": {"input": {"required": {"n": ["INT", {"default": 1}]}}, "output": ["MODEL"], "output_name": ["MODEL"]},
        "Mid": {"input": {"required": {"model": ["MODEL"], "strength": ["FLOAT", {"default": 1.0}]}},
                "output": ["MODEL"], "output_name": ["MODEL"]},
        "Sink": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {"default": 0}],
                                        "mode": [["a", "b"]], "text": ["STRING", {"multiline": True}]}},
                 "input_order": {"required": ["model", "seed", "mode", "text"]}, "output": [], "output_node": True},
    }
    nodes = [
        {"id": 1, "type": "Src", "mode": 0, "inputs": [], "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}],
         "widgets_values": [7], "pos": [0, 0], "size": [1, 1]},
        {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}],
         "outputs": [{"name": "", "type": "MODEL", "links": [2]}], "pos": [0, 0], "size": [1, 1]},
        {"id": 3, "type": "Mid", "mode": 4, "inputs": [{"name": "model", "type": "MODEL", "link": 2}],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [3]}], "widgets_values": [0.5], "pos": [0, 0], "size": [1, 1]},
        {"id": 4, "type": "Sink", "mode": 0, "inputs": [{"name": "model", "type": "MODEL", "link": 3},
                                                        {"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": 4}],
         "outputs": [], "widgets_values": [5, "fixed", "b", "ignored"], "pos": [0, 0], "size": [1, 1], "title": "My sink"},
        {"id": 5, "type": "PrimitiveNode", "mode": 0, "inputs": [],
         "outputs": [{"name": "STRING", "type": "STRING", "links": [4], "widget": {"name": "text"}}],
         "widgets_values": ["from primitive"], "pos": [0, 0], "size": [1, 1]},
        {"id": 6, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["hi"], "pos": [0, 0], "size": [1, 1]},
        {"id": 7, "type": "Sink", "mode": 2, "inputs": [{"name": "model", "type": "MODEL", "link": None}], "outputs": [],
         "widgets_values": [1, "fixed", "a", ""], "pos": [0, 0], "size": [1, 1]},
    ]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 3, 0, 4, 0, "MODEL"], [4, 5, 0, 4, 1, "STRING"]]
    return {"nodes": nodes, "links": links, "version": 0.4, "groups": []}, defs


def test_converter_follows_the_frontend_rules():
    graph, defs = _tiny_graph()
    prompt = wf.to_api(graph, defs)
    # Reroute, Note and PrimitiveNode are virtual; the bypassed Mid passes its input through; the
    # muted Sink is left out; the seed's control_after_generate value is UI-only.
    assert set(prompt) == {"1", "4"}
    assert prompt["1"] == {"inputs": {"n": 7}, "class_type": "Src", "_meta": {"title": "Src"}}
    assert prompt["4"]["inputs"] == {"model": ["1", 0], "seed": 5, "mode": "b", "text": "from primitive"}
    assert prompt["4"]["_meta"] == {"title": "My sink"}
    wf.apply_overrides(prompt, ["My sink.seed=9", ("Sink", "mode", "a")])
    assert prompt["4"]["inputs"]["seed"] == 9 and prompt["4"]["inputs"]["mode"] == "a"
    with pytest.raises(wf.WorkflowError):
        wf.apply_overrides(prompt, ["Sink.model=3"])  # a link, not a widget
    with pytest.raises(wf.WorkflowError):
        wf.apply_overrides(prompt, ["Nope.seed=1"])


def test_validator_reports_what_is_wrong():
    graph, defs = _tiny_graph()
    graph["nodes"][3]["widgets_values"] = [5, "b", "x"]  # control value dropped
    graph["links"][2][5] = "CLIP"
    graph["nodes"].append({"id": 8, "type": "Missing", "inputs": [], "outputs": [], "pos": [0, 0], "size": [1, 1]})
    problems = "\n".join(wf.validate(graph, defs))
    assert "3 widget values saved, the node has 4 widgets" in problems
    assert "does not exist in this host" in problems
    assert "link 3 of type CLIP" in problems


# ---------------------------------------------------------------------------------------------
# the host: node definitions, files under the names the workflows use
# ---------------------------------------------------------------------------------------------
def test_host_template_browser_scans_workflows_folder(host_location):
    """What v0.33.0's template browser lists: ``custom_nodes/*/<folder>/*.json`` for the folder names in
    app/custom_node_manager.py; ``workflows`` is one of them (``example_workflows`` is preferred, the
    others only log a debug hint), so the product card's ``workflows/`` is discovered as is."""
    if not host_location:
        pytest.skip(host_location.how)
    src = open(os.path.join(host_location.path, "app", "custom_node_manager.py"), encoding="utf-8").read()
    line = next(line for line in src.splitlines() if "example_workflow_folder_names =" in line)
    folders = json.loads(line.split("=", 1)[1].strip().replace("'", '"'))
    assert "workflows" in folders, folders


@pytest.fixture(scope="module")
def d2f(host):
    """The session host, completed as the server completes itself: every built-in node, the pack, a
    PromptServer stand-in."""
    from d2f_host import host as dh

    return dh.boot()


def _fast_random_layout(shapes: dict, seed: int, dtype) -> dict:
    """Random-looking weights quickly (CLIP-G alone has 695 M parameters): each tensor is filled with
    copies of one 4 M-value Gaussian pool from a per-tensor offset, scaled like
    ``comfy_host._random_like_layout`` (N(0, 1/fan_in) matrices, norms ≈ 1, small biases)."""
    import torch

    pool = torch.randn((1 << 22) * 2, generator=torch.Generator().manual_seed(seed)).to(dtype)
    half = pool.numel() // 2
    out = {}
    for i, key in enumerate(sorted(shapes)):
        shape = tuple(shapes[key])
        n = math.prod(shape)
        t = torch.empty(n, dtype=dtype)
        start = (i * 104729) % half
        for a in range(0, n, half):
            b = min(n, a + half)
            t[a:b] = pool[start:start + b - a]
        t = t.view(shape)
        if len(shape) >= 2:
            t.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
        elif key.endswith("weight") and ("norm" in key or "ln_" in key):
            t.mul_(0.1).add_(1.0)
        else:
            t.mul_(0.05)
        out[key] = t
    return out


def write_sdxl_checkpoint(path: str, unet_sd: dict) -> str:
    """A full SDXL checkpoint: the tiny SDXL UNet + real-layout CLIP-L, CLIP-G and VAE (random, fp16)."""
    import comfy.sdxl_clip
    import torch

    shapes = {"conditioner.embedders.0." + k[len("cond_stage_model."):]: s for k, s in comfy_host.clip_l_layout().items()}
    clip_g = comfy.sdxl_clip.SDXLClipG(device="meta", dtype=torch.float16)
    shapes.update({"conditioner.embedders.1.model." + k: tuple(v.shape) for k, v in clip_g.state_dict().items()})
    shapes.update(comfy_host.vae_layout())
    sd = _fast_random_layout(shapes, 5, torch.float16)
    for key in [k for k in sd if k.endswith("position_ids")]:
        sd[key] = torch.arange(sd[key].shape[-1]).reshape(sd[key].shape)
    sd.update({"model.diffusion_model." + k: v for k, v in unet_sd.items()})
    return comfy_host.save_safetensors(sd, path)


def _write_png(path: str, rgb, size=64):
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([(xx * 4 + rgb[0]) % 256, (yy * 4 + rgb[1]) % 256, np.full_like(xx, rgb[2])], -1).astype("uint8")
    Image.fromarray(img).save(path)


@pytest.fixture(scope="module")
def example_files(d2f, host):
    """Stand-ins for every file the workflows name: tiny SD1.5 and SDXL checkpoints (the v-pred name
    links to the SDXL file), the img2img input image, a training folder of 2 captioned images."""
    import folder_paths

    ckpt_dir = host.checkpoint_dir
    sd15 = os.path.join(ckpt_dir, examples.SD15_CKPT)
    if not os.path.exists(sd15):
        unet = comfy_host.tiny_unet_state_dict(comfy_host.SD15_UNET_CONFIG, "SD15", seed=0)
        comfy_host.write_sd15_checkpoint(sd15, unet)
    sdxl = os.path.join(ckpt_dir, examples.SDXL_CKPT)
    if not os.path.exists(sdxl):
        import torch

        unet = comfy_host.tiny_unet_state_dict(comfy_host.SDXL_UNET_CONFIG, "SDXL", seed=2, dtype=torch.float16)
        write_sdxl_checkpoint(sdxl, unet)
    vpred = os.path.join(ckpt_dir, examples.SDXL_VPRED_CKPT)
    if not os.path.lexists(vpred):
        os.symlink(sdxl, vpred)
    input_dir = folder_paths.get_input_directory()
    _write_png(os.path.join(input_dir, examples.IMG2IMG_IMAGE), (40, 90, 160))
    data_dir = os.path.join(input_dir, examples.TRAIN_FOLDER)
    os.makedirs(data_dir, exist_ok=True)
    for i, (rgb, caption) in enumerate((((200, 40, 40), "a red square pattern"), ((30, 160, 60), "a green square pattern"))):
        _write_png(os.path.join(data_dir, f"img{i}.png"), rgb)
        with open(os.path.join(data_dir, f"img{i}.txt"), "w") as f:
            f.write(caption)
    folder_paths.filename_list_cache.clear()
    return {"checkpoints": ckpt_dir, "input": input_dir}


@pytest.fixture(scope="module")
def defs(d2f, example_files):
    from d2f_host.host import object_info

    return object_info()


@pytest.mark.parametrize("name", NAMES)
def test_workflow_validates_against_host_definitions(name, defs):
    data = wf.load(path_of(name))
    problems = wf.validate(data, defs)
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)
    # the named-value map the frontend also saves agrees with the positional list
    for node in data["nodes"]:
        named = node.get("widgets_values_named")
        if named and node["type"] in defs:
            by_name = wf.widget_values_by_name(node, defs[node["type"]])
            assert all(named[k] == v for k, v in by_name.items() if k in named), node["type"]


@pytest.mark.parametrize("name", NAMES)
def test_workflow_converts_to_a_prompt_the_host_accepts(name, defs, d2f):
    import asyncio

    import execution

    prompt = wf.to_api(wf.load(path_of(name)), defs)
    assert all(e["class_type"] in defs for e in prompt.values())
    valid = asyncio.run(execution.validate_prompt("check", prompt, None))
    assert valid[0], f"{name}: {valid[1]} {valid[3]}"


def _outputs_of(result, key):
    return [item for out in result.outputs.values() for item in (out.get(key) or [])]


def _image_path(item):
    import folder_paths

    return os.path.join(folder_paths.get_directory_by_type(item["type"]), item.get("subfolder", ""), item["filename"])


@pytest.mark.parametrize("name", NAMES)
def test_workflow_executes_end_to_end(name, d2f, defs, example_files):
    """The saved graph, as the frontend would queue it (tiny sizes), run by the host's executor."""
    import numpy as np
    from PIL import Image

    from d2f_host import runner

    prompt = wf.to_api(wf.load(path_of(name)), defs)
    wf.apply_overrides(prompt, tiny_overrides(prompt) + EXTRA.get(name, []))
    result = runner.run_prompt(prompt, host=d2f)  # the host's one executor, as in the server
    assert result.success, f"{name} failed: {json.dumps(result.error, default=str)[:3000]}"

    images = _outputs_of(result, "images")
    saved = [i for i in images if i["type"] == "output"]
    assert saved, f"{name} saved no image"
    for item in saved:
        arr = np.asarray(Image.open(_image_path(item)))
        assert arr.shape[:2] == (64, 64) and arr.std() > 0, f"{name}: {item} is not a 64×64 picture"

    readouts = [d["output"]["d2f_flow_patch"][0] for d in result.events("executed")
                if (d.get("output") or {}).get("d2f_flow_patch")]
    assert readouts, f"{name}: the flow patch sent no read-out to the UI"
    expected = "v_prediction" if "vpred" in name else "eps"
    assert readouts[0]["prediction"] == expected
    assert 0.9 < readouts[0]["sigma_max"] < 1.0 and 0.0 < readouts[0]["sigma_min"] < 0.05
    if "sd15" in name:
        assert abs(readouts[0]["sigma_max"] - 0.935958) < 1e-4, readouts[0]

    if name in ("d2f_sd15_train_lora", "d2f_sd15_reflow"):
        run_name = "d2f_sd15_lora" if name == "d2f_sd15_train_lora" else "d2f_sd15_reflow"
        events = result.events("d2f.train")
        kinds = [e["kind"] for e in events]
        assert kinds[0] == "start" and kinds[-1] == "done" and "progress" in kinds and "saved" in kinds, kinds
        losses = [v for e in events if e["kind"] == "progress" for v in e["losses"]]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
        progress = [e for e in events if e["kind"] == "progress"]
        assert all(k in progress[-1] for k in ("step", "total", "samples_per_second", "eta_seconds", "last_save"))
        loras = [f for f in result.files if f.endswith(".safetensors") and run_name in f]
        assert any(os.sep + "loras" + os.sep in f for f in loras), result.files
        assert any(i["type"] == "temp" for i in images), "Plot Loss Graph showed no graph"
        train_id = next(k for k, e in prompt.items() if e["class_type"] == "D2FTrain")
        assert all(str(e["node"]) == train_id for e in events)

    if name == "d2f_sd15_reflow":
        # the pairs were made (2 of them, in output/d2f_couplings/<name>) and fed to D2FTrain's couplings input;
        # the sample comes from the trained model at 4 euler steps
        import folder_paths

        from d2f_core.training.couplings import load_couplings

        pairs_id, pairs = next((k, e) for k, e in prompt.items() if e["class_type"] == "D2FReflowPairs")
        train = next(e for e in prompt.values() if e["class_type"] == "D2FTrain")
        assert train["inputs"]["couplings"] == [pairs_id, 0]
        assert "latents" not in train["inputs"] and "positive" not in train["inputs"]
        folder = os.path.join(folder_paths.get_output_directory(), "d2f_couplings", pairs["inputs"]["name"])
        assert any(f.startswith(folder + os.sep) for f in result.files), result.files
        couplings = load_couplings(folder)
        assert len(couplings) == 2
        saved_ks = wf.to_api(wf.load(path_of(name)), defs)[next(k for k, e in prompt.items() if e["class_type"] == "KSampler")]
        assert (saved_ks["inputs"]["steps"], saved_ks["inputs"]["sampler_name"]) == (4, "euler")
        assert saved_ks["inputs"]["model"] == [next(k for k, e in prompt.items() if e["class_type"] == "D2FTrain"), 0]


# ---------------------------------------------------------------------------------------------
# d2f run
# ---------------------------------------------------------------------------------------------
def test_d2f_run_executes_the_txt2img_workflow(host, example_files, tmp_path):
    """``d2f run`` in a fresh process: finds the host, boots it headless, converts, validates, runs
    with a progress display, writes the image into --output."""
    yaml_path = tmp_path / "models.yaml"
    yaml_path.write_text(json.dumps({"d2f_test": {"base_path": os.path.dirname(example_files["checkpoints"]),
                                                  "checkpoints": "checkpoints"}}))
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "d2f_app", "run", path_of("d2f_sd15_txt2img"), "--comfyui", host.path,
           "--output", str(out_dir), "--extra-model-paths", str(yaml_path), "--cpu", "--no-custom-nodes",
           "--set", "EmptyLatentImage.width=64", "--set", "EmptyLatentImage.height=64", "--set", "KSampler.steps=2"]
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    proc = subprocess.run(cmd, cwd=PACK_DIR, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, f"d2f run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    written = sorted(str(p) for p in out_dir.rglob("*.png"))
    assert written, proc.stdout
    assert "wrote " + written[0] in proc.stdout
    assert "[1/" in proc.stderr and "|" in proc.stderr and "2/2" in proc.stderr, proc.stderr[-2000:]


# A sitecustomize that makes the modules in $D2F_TEST_BLOCK unimportable, as in the venv `pip install .`
# makes for `d2f demo` (it has torch but none of ComfyUI's own packages), except in the process `d2f run`
# re-executes under the host's Python (it sets D2F_RUN_REEXEC there).
BLOCKER = """
import os, sys

class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in os.environ.get("D2F_TEST_BLOCK", "").split(","):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

if not os.environ.get("D2F_RUN_REEXEC"):
    sys.meta_path.insert(0, _Block())
"""


def _d2f_run(args, tmp_path, block="psutil", cwd=PACK_DIR, **env):
    """``python -m d2f_app run ARGS`` in a fresh process whose Python cannot import ``block``."""
    (tmp_path / "blocker").mkdir(exist_ok=True)
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    base = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "D2F_RUN_REEXEC")}
    env = {**base, "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), PACK_DIR]), "D2F_TEST_BLOCK": block, **env}
    return subprocess.run([sys.executable, "-m", "d2f_app", "run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def test_d2f_run_reexecutes_under_the_host_python(host, example_files, tmp_path):
    """From a Python that lacks ComfyUI's packages (psutil blocked), ``d2f run`` finds the host's venv
    and runs there: the dry run converts and validates the workflow in the host."""
    from d2f_host.host import host_python

    python = host_python(host.path)
    if python is None:
        pytest.skip(f"{host.path} has no .venv/ or venv/ for d2f run to re-execute under")
    yaml_path = tmp_path / "models.yaml"
    yaml_path.write_text(json.dumps({"d2f_test": {"base_path": os.path.dirname(example_files["checkpoints"]),
                                                  "checkpoints": "checkpoints"}}))
    proc = _d2f_run([path_of("d2f_sd15_txt2img"), "--comfyui", host.path, "--extra-model-paths", str(yaml_path),
                     "--cpu", "--no-custom-nodes", "--dry-run"], tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert f"lacks ComfyUI's packages (psutil); running under {python}" in proc.stderr, proc.stderr[-3000:]
    prompt = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert {e["class_type"] for e in prompt.values()} >= {"D2FFlowPatch", "KSampler"}


@pytest.mark.parametrize("case", ["no host", "host without a venv"])
def test_d2f_run_says_what_to_do_in_one_line(case, tmp_path):
    """No traceback: without a host, or with a host whose Python cannot be found, one line says what to do."""
    home = tmp_path / "home"
    home.mkdir()
    args = [path_of("d2f_sd15_txt2img")]
    if case == "host without a venv":
        fake = tmp_path / "ComfyUI"
        fake.mkdir()
        for f in ("main.py", "nodes.py", "execution.py", "folder_paths.py"):
            (fake / f).write_text("")
        (fake / "requirements.txt").write_text("torch\npsutil\n")
        args += ["--comfyui", str(fake)]
    proc = _d2f_run(args, tmp_path, cwd=str(tmp_path), HOME=str(home))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("d2f run: "), proc.stderr
    if case == "no host":
        assert "no ComfyUI found" in lines[0] and "COMFYUI_PATH" in lines[0] and "--comfyui" in lines[0]
        assert "git clone" in lines[0] and "requirements.txt" in lines[0]
    else:
        assert "cannot import ComfyUI's packages (psutil)" in lines[0] and "pass --python" in lines[0]


def test_d2f_run_reports_a_bad_override(host, example_files, tmp_path):
    from d2f_app.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", path_of("d2f_sd15_txt2img"), "--set", "NoSuchNode.steps=2", "--dry-run"])
    assert exc.value.code == 2
