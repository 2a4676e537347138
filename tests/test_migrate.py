"""Workflows saved before issue 12 moved D2FTrain's rarely changed settings to option nodes still run the same
(``d2f_host.migrate``, with ``web/legacy_widgets.json``; the frontend's side is ``tests/test_browser.py``).

An old D2FTrain's positional ``widgets_values`` (the layout of the previous version, written here from its widget
order) converted to an API prompt gives D2FTrain its everyday values and option nodes holding the moved ones;
run through the real nodes (the option nodes' ``execute`` and D2FTrain's ``merged_options``) they give exactly the
flat settings the old node had. Groups left at their defaults need no node.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_host  # noqa: E402

from d2f_host import migrate  # noqa: E402
from d2f_host import workflow as wf  # noqa: E402

_LOCATION = comfy_host.find_host()
if not _LOCATION:
    pytest.skip(f"no ComfyUI host: {_LOCATION.how}", allow_module_level=True)

# D2FTrain's widget defaults in the previous version (main before issue 12 part 1), by name.
OLD_DEFAULTS = dict(
    mode="lora", steps=500, batch_size=1, grad_accumulation=1, learning_rate=1e-4, rank=16, lora_targets="attention",
    alpha=16.0, loss="diff2flow", time_sampling="uniform", time_shift=1.0, warmup_steps=0, lr_schedule="constant",
    optimizer="adamw", gradient_checkpointing="auto", training_dtype="bf16", cuda_graphs=True, caption_dropout=0.0,
    ss_probability=0.0, ss_ramp="linear", ss_max_offset=0, ss_strategy="uniform", ss_solver_steps=25, seed=0,
    control_after_generate="fixed", save_every=0, preview_every=0, run_name="d2f_lora", resume_from="",
    compile=False, gpus="1")
# A run that changed settings of both moved groups, and some everyday ones.
CHANGED = dict(mode="full", steps=123, learning_rate=2e-5, rank=8, seed=7, run_name="old_run", save_every=50,
               time_shift=3.0, optimizer="sgd", lora_targets="all", training_dtype="fp32", compile=True,
               caption_dropout=0.1, ss_probability=0.5, ss_ramp="cosine", ss_max_offset=3, ss_strategy="late")
LAYOUTS = migrate.table()["D2FTrain"]["layouts"]
MOVED = migrate.table()["D2FTrain"]["moved"]


@pytest.fixture(scope="module")
def defs(host):
    from d2f_host import host as dh

    dh.boot()
    return dh.object_info()


@pytest.fixture(scope="module")
def train_node(host):
    return sys.modules[host.node_class("D2FTrain").__module__]


def old_workflow(values: dict, layout: list[str]) -> dict:
    """A UI-format workflow as the previous version saved it: a checkpoint loader feeding a D2FTrain whose
    widgets_values follow ``layout``."""
    b = wf.WorkflowBuilder({})
    loader = {"id": 1, "type": "CheckpointLoaderSimple", "pos": [0, 0], "size": [315, 98], "flags": {}, "order": 0,
              "mode": 0, "inputs": [], "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]},
                                                   {"name": "CLIP", "type": "CLIP", "links": []},
                                                   {"name": "VAE", "type": "VAE", "links": []}],
              "properties": {}, "widgets_values": ["sd15.safetensors"]}
    inputs = [{"name": "model", "type": "MODEL", "link": 1}] + [
        {"name": n, "type": t, "shape": 7, "link": None} for n, t in
        (("latents", "LATENT"), ("positive", "CONDITIONING"), ("empty_conditioning", "CONDITIONING"),
         ("couplings", "D2F_COUPLINGS"))]
    train = {"id": 2, "type": "D2FTrain", "pos": [400, 0], "size": [400, 1160], "flags": {}, "order": 1, "mode": 0,
             "inputs": inputs, "outputs": [{"name": n, "type": t, "links": []} for n, t in
                                           (("model", "MODEL"), ("lora", "LORA_MODEL"), ("loss", "LOSS_MAP"),
                                            ("steps", "INT"))],
             "properties": {"Node name for S&R": "D2FTrain"}, "widgets_values": [values[n] for n in layout]}
    b.nodes += [loader, train]
    b.links.append([1, 1, 0, 2, 0, "MODEL"])
    return b.to_json()


def run_options(host, train_node, prompt: dict) -> dict:
    """D2FTrain's flat settings for the prompt's D2FTrain entry, through the real option nodes and merge."""
    train = next(e for e in prompt.values() if e["class_type"] == "D2FTrain")
    own = {k: v for k, v in train["inputs"].items() if not isinstance(v, list)}
    fed = {}
    for name in ("advanced", "scheduled_sampling"):
        if name in train["inputs"]:
            source = prompt[train["inputs"][name][0]]
            fed[name] = host.run1(source["class_type"], **source["inputs"])
    return train_node.merged_options(own, fed.get("advanced"), fed.get("scheduled_sampling"))


def test_the_table_knows_where_every_old_setting_went(defs):
    current = [w.name for w in wf.widget_specs(defs["D2FTrain"])]
    assert len(current) not in {len(l["widgets"]) for l in LAYOUTS}, "the current layout must not look like an old one"
    assert len({len(l["widgets"]) for l in LAYOUTS}) == len(LAYOUTS), "old layouts are told apart by length"
    newest = LAYOUTS[0]["widgets"]
    assert set(newest) == set(OLD_DEFAULTS)
    moved = {old: (typ, new) for typ, spec in MOVED.items() for old, new in spec["widgets"].items()}
    added = set(current) - set(newest)
    assert not added, f"new D2FTrain widgets {sorted(added)}: settings go to option nodes (old workflows lack them)"
    assert set(newest) == (set(current) - added) | set(moved), "every old widget is either kept or moved"
    for old, (typ, new) in moved.items():
        spec = next(w for w in wf.widget_specs(defs[typ]) if w.name == new)
        # an unconnected option input means the option node's defaults: the old D2FTrain's defaults
        assert wf.default_widget_value(spec) == OLD_DEFAULTS[old], (old, typ, new)
    for typ, spec in MOVED.items():
        assert spec["input"] in {s.name for s in wf.input_specs(defs["D2FTrain"])}
        assert wf.output_types(defs[typ])[0] == next(s.type for s in wf.input_specs(defs["D2FTrain"])
                                                    if s.name == spec["input"])


@pytest.mark.parametrize("layout", LAYOUTS, ids=[str(len(l["widgets"])) for l in LAYOUTS])
def test_an_old_workflow_runs_with_the_same_settings(host, defs, train_node, layout):
    names = layout["widgets"]
    values = dict(OLD_DEFAULTS, **{k: v for k, v in CHANGED.items() if k in names})
    old = old_workflow(values, names)
    migrated = migrate.migrate_workflow(old, defs)
    problems = wf.validate(migrated, defs, check_combos=False)  # no checkpoint files here
    assert not problems, problems
    prompt = wf.to_api(old, defs)
    assert prompt == wf.to_api(migrated, defs)
    types = sorted(e["class_type"] for e in prompt.values())
    assert types == sorted(["CheckpointLoaderSimple", "D2FTrain", "D2FTrainAdvanced"]
                           + (["D2FScheduledSampling"] if "ss_probability" in names else []))
    train = next(e for e in prompt.values() if e["class_type"] == "D2FTrain")
    assert train["inputs"]["model"] == ["1", 0]
    opts = run_options(host, train_node, prompt)
    expected = {k: v for k, v in values.items() if k != "control_after_generate"}
    expected = dict(train_node.merged_options({}, None, None), **expected)  # settings an older layout lacked
    assert {k: opts[k] for k in expected} == expected
    assert opts["sharding"] == "auto"  # newer than every old layout: D2FTrainAdvanced's default
    assert set(opts) == set(expected)


def test_settings_at_their_defaults_need_no_option_node(host, defs, train_node):
    values = dict(OLD_DEFAULTS, steps=42, run_name="plain")
    prompt = wf.to_api(old_workflow(values, LAYOUTS[0]["widgets"]), defs)
    assert sorted(e["class_type"] for e in prompt.values()) == ["CheckpointLoaderSimple", "D2FTrain"]
    opts = run_options(host, train_node, prompt)
    assert {k: opts[k] for k in values if k != "control_after_generate"} == \
        {k: v for k, v in values.items() if k != "control_after_generate"}


def test_an_old_api_prompt_moves_its_settings_too(host, defs, train_node):
    values = dict(OLD_DEFAULTS, **CHANGED)
    flat = {k: v for k, v in values.items() if k != "control_after_generate"}
    old = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
           "2": {"class_type": "D2FTrain", "inputs": dict(flat, model=["1", 0])}}
    prompt = wf.to_api(old, defs)
    assert sorted(e["class_type"] for e in prompt.values()) == sorted(
        ["CheckpointLoaderSimple", "D2FTrain", "D2FTrainAdvanced", "D2FScheduledSampling"])
    assert run_options(host, train_node, prompt) == dict(flat, sharding="auto")  # newer than the old layouts


def test_overrides_reach_moved_settings(defs, host, train_node):
    prompt = wf.to_api(old_workflow(dict(OLD_DEFAULTS), LAYOUTS[0]["widgets"]), defs)
    wf.apply_overrides(prompt, ["D2FTrain.training_dtype=fp32", ("D2FTrain", "alpha", 4.0),
                                ("D2FTrain", "ss_probability", 0.3), ("D2FTrain", "max_offset", 2),
                                ("D2FTrain", "sharding", "ddp")], defs)  # sharding: newer than every old layout
    opts = run_options(host, train_node, prompt)
    assert (opts["training_dtype"], opts["alpha"], opts["ss_probability"], opts["ss_max_offset"], opts["sharding"]) == \
        ("fp32", 4.0, 0.3, 2, "ddp")
    assert sum(e["class_type"] == "D2FTrainAdvanced" for e in prompt.values()) == 1  # the second one reuses it
    with pytest.raises(wf.WorkflowError, match="no node matched"):
        wf.apply_overrides(prompt, ["D2FTrain.training_dtype=fp32"])  # without definitions: not routed


def test_a_moved_setting_given_flat_is_refused(train_node):
    with pytest.raises(TypeError, match="D2FTrainAdvanced"):
        train_node.merged_options({"steps": 1, "optimizer": "sgd"}, None, None)
