"""Reflow inside the real ComfyUI host (v0.33): D2FReflowPairs, D2FLoadReflowPairs, D2FTrain on couplings.

Nodes run the way the executor runs them (``Host.run``); D2FReflowPairs and D2FTrain are list-input nodes,
so every input is handed over as a list. The model is the tiny SD1.5-layout UNet from ``conftest``, latents
8×8 (64 px), a few solver steps, fp32 on the CPU.

The reference for a pair's x̂0 is the host's own stock path on the flow-patched model: SamplerCustomAdvanced
with the stock ``euler`` (KSamplerSelect), the stock CFGGuider node, D2FFlowScheduler's sigmas and the pair's
stored noise; compared ``max|a-b| / max|b|`` in model space (process_in of the sampler outputs), fp32
round-off: ≤ 1e-5.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

import comfy_host

_LOCATION = comfy_host.find_host()
if not _LOCATION:
    pytest.skip(f"no ComfyUI host: {_LOCATION.how}", allow_module_level=True)

torch = pytest.importorskip("torch")

EXACT = 1e-5
CFG = 5.0
SIZE = 8  # latent side (64 px)
SHAPE = (4, SIZE, SIZE)


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max())


def cond(seed: int, **extras):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=g), dict(extras)]]


class FixedNoise:
    """A NOISE for SamplerCustomAdvanced that hands over given noise (the pairs' own)."""

    def __init__(self, noise, seed=0):
        self.noise, self.seed = noise, seed

    def generate_noise(self, input_latent):
        assert tuple(input_latent["samples"].shape) == tuple(self.noise.shape)
        return self.noise.clone()


@pytest.fixture(scope="module")
def mods(host):
    reflow = sys.modules[host.node_class("D2FReflowPairs").__module__]
    train_node = sys.modules[host.node_class("D2FTrain").__module__]
    couplings = sys.modules[reflow.load_couplings.__module__]
    return reflow, train_node, couplings


@pytest.fixture(scope="module")
def prompts():
    return {"a": cond(1), "b": cond(2), "neg": cond(3)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared CPU, spinning OpenMP threads made these runs ~5× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _clean_host_state(host):
    import comfy.utils
    yield
    comfy.utils.set_progress_bar_global_hook(None)
    host.mm.interrupt_current_processing(False)
    host.mm.unload_all_models()


def make_pairs(host, model, positive, negative, name, count=5, steps=3, batch_size=2, shift=1.0, cfg=CFG, seed=3,
               width=8 * SIZE, height=8 * SIZE):
    """D2FReflowPairs as the executor calls a list-input node: every input a list."""
    out = host.run("D2FReflowPairs", model=[model], positive=list(positive), negative=[negative], count=[count],
                   width=[width], height=[height], steps=[steps], cfg=[cfg], seed=[seed],
                   batch_size=[batch_size], shift=[shift], name=[name])
    return out[0], out[1]


def stock_x0(host, flow, positive, negative, noise, steps, shift, cfg=CFG):
    """Stock sampling of the flow-patched model, in model space."""
    sigmas = host.run1("D2FFlowScheduler", model=flow, steps=steps, shift=shift, denoise=1.0)
    guider = host.run1("CFGGuider", model=flow, positive=positive, negative=negative, cfg=cfg)
    sampler = host.run1("KSamplerSelect", sampler_name="euler")
    latent = {"samples": torch.zeros(noise.shape)}
    out = host.run("SamplerCustomAdvanced", noise=FixedNoise(noise), guider=guider, sampler=sampler, sigmas=sigmas,
                   latent_image=latent)[0]
    return flow.get_model_object("latent_format").process_in(out["samples"].float())


def folder_bytes(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


# ---------------------------------------------------------------------------------------------
# the pairs are the host's own flow-Euler samples
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["plain", "patched-shift-separate"])
def test_pairs_equal_stock_euler(host, sd15_model, prompts, mods, variant, record_measure):
    """count 5, batch 2, prompts a/b cycling: every chunk mixes prompts. ``plain``: an unpatched model, the
    chunk's prompts stacked into one sampler call. ``patched-shift-separate``: a D2FFlowPatch'ed model, shift 2,
    prompts whose settings differ (sampled one prompt at a time)."""
    reflow, _, couplings_mod = mods
    flow = host.run1("D2FFlowPatch", model=sd15_model, prediction="auto", label_offset=0)
    if variant == "plain":
        model, shift, pos = sd15_model, 1.0, [prompts["a"], prompts["b"]]
    else:
        model, shift = flow, 2.0
        pos = [[[prompts["a"][0][0], {"d2f_note": "a"}]], [[prompts["b"][0][0], {"d2f_note": "b"}]]]
    entries = [p[0] for p in pos]
    sampling = sys.modules[reflow.make_pairs.__module__]  # the pack's pairs_sampling, as the host imported it
    assert (sampling.batched_positive(entries) is None) == (variant != "plain")

    steps = 3
    c, n = make_pairs(host, model, pos, prompts["neg"], f"eq-{variant}", count=5, steps=steps, shift=shift)
    assert n == len(c) == 5 and c.shape == SHAPE
    assert c.noise.dtype == c.x0.dtype == torch.float32
    assert torch.equal(c.noise, couplings_mod.pair_noise(3, 0, 5, SHAPE))
    assert c.prompt_index.tolist() == [0, 1, 0, 1, 0]
    assert c.prompts["context"].shape == (2, 77, 768)
    assert torch.equal(c.prompts["context"][1], pos[1][0][0][0])
    assert c.meta["latent_format"] == "SD15" and c.meta["prediction"] == "eps" and c.meta["steps"] == steps
    assert c.meta["cfg"] == CFG and c.meta["shift"] == shift and c.meta["seed"] == 3

    worst = 0.0
    for p in (0, 1):
        rows = [i for i in range(5) if i % 2 == p]
        ref = stock_x0(host, flow, pos[p], prompts["neg"], c.noise[rows], steps, shift)
        worst = max(worst, rel(c.x0[rows], ref))
        # teeth: the other prompt gives visibly different samples from the same noise
        other = stock_x0(host, flow, pos[1 - p], prompts["neg"], c.noise[rows], steps, shift)
        assert rel(other, ref) > 100 * EXACT
    record_measure(f"{variant}: pairs' x̂0 vs stock euler (SamplerCustomAdvanced)", worst, f"≤ {EXACT:g}")
    assert worst <= EXACT


# ---------------------------------------------------------------------------------------------
# interruption, resume, identity
# ---------------------------------------------------------------------------------------------
def test_interrupt_keeps_chunks_and_resume_is_identical(host, sd15_model, prompts, mods, monkeypatch):
    import comfy.utils
    reflow, _, couplings_mod = mods
    pos, neg = [prompts["a"], prompts["b"]], prompts["neg"]
    make_pairs(host, sd15_model, pos, neg, "straight", count=6, steps=3)
    straight = reflow.couplings_folder("straight")

    # The UI's stop button, as the server's progress hook delivers it: during the second chunk.
    monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0)
    monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_PERCENT", 0.0)
    seen = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        seen.append(value)
        if value > 6:  # chunk 1 covers pair-steps 1…6 (2 pairs × 3 steps)
            host.mm.interrupt_current_processing(True)
        host.mm.throw_exception_if_processing_interrupted()
    comfy.utils.set_progress_bar_global_hook(hook)
    before = reflow.D2FReflowPairs.fingerprint_inputs(name=["resumed"])
    c, n = make_pairs(host, sd15_model, pos, neg, "resumed", count=6, steps=3)
    comfy.utils.set_progress_bar_global_hook(None)
    assert n == len(c) == 2, seen  # the finished chunk, returned
    assert not host.mm.processing_interrupted()
    resumed = reflow.couplings_folder("resumed")
    first = couplings_mod.chunk_name(0, 2)
    assert sorted(f for f in os.listdir(resumed) if f.startswith("chunk")) == [first]
    assert reflow.D2FReflowPairs.fingerprint_inputs(name=["resumed"]) != before  # the executor re-runs it
    first_chunk = os.stat(os.path.join(resumed, first)).st_mtime_ns

    c, n = make_pairs(host, sd15_model, pos, neg, "resumed", count=6, steps=3)
    assert n == 6
    assert os.stat(os.path.join(resumed, first)).st_mtime_ns == first_chunk  # not redone
    assert folder_bytes(resumed) == folder_bytes(straight)


def test_nothing_finished_means_the_stop_propagates(host, sd15_model, prompts):
    import comfy.utils

    def hook(value, total, preview, prompt_id=None, node_id=None):
        host.mm.interrupt_current_processing(True)
        host.mm.throw_exception_if_processing_interrupted()
    comfy.utils.set_progress_bar_global_hook(hook)
    with pytest.raises(host.mm.InterruptProcessingException):
        make_pairs(host, sd15_model, [prompts["a"]], prompts["neg"], "never", count=2)


@pytest.mark.parametrize("change,match", [("cfg", "cfg"), ("prompt", "prompts"), ("negative", "negative"),
                                          ("steps", "steps"), ("model", "model"), ("size", "shape")])
def test_other_settings_are_refused(host, sd15_model, prompts, change, match):
    pos, neg = [prompts["a"], prompts["b"]], prompts["neg"]
    make_pairs(host, sd15_model, pos, neg, "identity", count=2, steps=2)
    kwargs = dict(count=4, steps=2)
    model = sd15_model
    if change == "cfg":
        kwargs["cfg"] = CFG + 1
    elif change == "prompt":
        pos = [prompts["a"], cond(9)]
    elif change == "negative":
        neg = cond(10)
    elif change == "steps":
        kwargs["steps"] = 3
    elif change == "model":  # a LoRA-like weight patch: same base file, other ODE
        model = sd15_model.clone()
        key = "diffusion_model.out.2.bias"
        model.add_patches({key: ("diff", (torch.full((4,), 0.1),))}, 1.0)
    elif change == "size":
        kwargs["width"] = 128
    with pytest.raises(ValueError, match=match):
        make_pairs(host, model, pos, neg, "identity", **kwargs)


def test_model_fingerprint_ignores_what_is_loaded(host, sd15_model, mods):
    """While a patched clone is loaded the host merges its patches into the shared weights: the base model's
    fingerprint must not see them, and the patched clone's must differ."""
    reflow = mods[0]
    base = reflow.model_fingerprint(sd15_model)
    lora_like = sd15_model.clone()
    lora_like.add_patches({"diffusion_model.out.2.bias": ("diff", (torch.full((4,), 0.1),))}, 1.0)
    host.mm.load_models_gpu([lora_like])
    assert reflow.model_fingerprint(sd15_model) == base
    assert reflow.model_fingerprint(lora_like) != base
    assert reflow.model_fingerprint(sd15_model.clone()) == base


# ---------------------------------------------------------------------------------------------
# loading, and training on couplings
# ---------------------------------------------------------------------------------------------
def test_load_node(host, sd15_model, prompts, mods):
    c, _ = make_pairs(host, sd15_model, [prompts["a"]], prompts["neg"], "to-load", count=3)
    schema = host.node_class("D2FLoadReflowPairs").GET_SCHEMA()
    assert "to-load" in schema.inputs[0].options
    loaded, n = host.run("D2FLoadReflowPairs", name="to-load")
    assert n == 3 and loaded.digest() == c.digest()
    head, n = host.run("D2FLoadReflowPairs", name="to-load", limit=2)
    assert n == 2 and torch.equal(head.x0, c.x0[:2])
    by_path, _ = host.run("D2FLoadReflowPairs", name="to-load", path=mods[0].couplings_folder("to-load"))
    assert by_path.digest() == c.digest()
    # the node shows how the pairs were made (the folder's recorded settings), read by the web extension
    _, ui = host.run_output_node("D2FLoadReflowPairs", name="to-load")
    info = ui["d2f_couplings"][0]
    assert (info["pairs"], info["folder"], info["prompts"], info["steps"], info["cfg"], info["seed"]) == \
        (3, "to-load", 1, 3, CFG, 3), info
    assert info["model_type"] == type(sd15_model.model).__name__ and info["prediction"] == "eps"
    assert info["model"] == mods[0].model_fingerprint(sd15_model) and info["latent"] == [4, SIZE, SIZE]
    json.dumps(info)  # it travels to the browser as JSON
    with pytest.raises(ValueError, match="no Diff2Flow couplings"):
        host.run("D2FLoadReflowPairs", name="to-load", path="does-not-exist")
    with pytest.raises(ValueError, match="inside output"):
        mods[0].couplings_folder("../escape")


TRAIN = dict(mode="lora", steps=3, batch_size=2, grad_accumulation=1, learning_rate=1e-3, rank=4, alpha=0.0,
             lora_targets="attention", gradient_checkpointing=False, training_dtype="fp32", cuda_graphs=False, seed=0,
             save_every=0, preview_every=0, run_name="reflow_test")


def train(host, model, **inputs):
    schema = host.node_class("D2FTrain").GET_SCHEMA()
    opts = {i.id: i.default for i in schema.inputs if not i.optional and getattr(i, "default", None) is not None}
    opts.update(TRAIN)
    opts.update(inputs)
    return host.run("D2FTrain", model=[model], **{k: v if k == "couplings" else [v]
                                                  for k, v in comfy_host.d2f_train_inputs(host, opts).items()})


def test_train_on_couplings_uses_each_pairs_noise_through_its_start(host, sd15_model, prompts, mods, monkeypatch):
    _, train_node, _ = mods
    c, _ = make_pairs(host, sd15_model, [prompts["a"], prompts["b"]], prompts["neg"], "train", count=4, steps=2)
    seen = []

    class SpyTrainer(train_node.Trainer):
        def loss(self, x0, cond, generator, noise=None, *args):
            seen.append((x0.detach().cpu().clone(), None if noise is None else noise.detach().cpu().clone(),
                         cond["context"].detach().cpu().clone()))
            return super().loss(x0, cond, generator, noise, *args)
    monkeypatch.setattr(train_node, "Trainer", SpyTrainer)

    model, lora, loss, steps = train(host, sd15_model, couplings=[c])  # no latents, no positive
    assert steps == 3 and len(loss["loss"]) == 3 and all(torch.isfinite(torch.tensor(loss["loss"])))
    assert lora and len(seen) == 3
    # D2FReflowPairs records σ_max, where its sampler started (from D(σ_max)·ε): training reads ε' whose line
    # (1-σ)·x̂0 + σ·ε' passes through that start
    flow = host.run1("D2FFlowPatch", model=sd15_model, prediction="auto", label_offset=0)
    assert c.start_sigma == pytest.approx(float(flow.get_model_object("model_sampling").sigma_max), rel=1e-6)
    through = c.line_noise()
    start = torch.full((len(c), 1, 1, 1), c.start_sigma)
    d0 = ((1 - start) ** 2 + start ** 2).sqrt()
    torch.testing.assert_close((1 - start) * c.x0 + start * through, d0 * c.noise, rtol=0, atol=1e-5)
    assert not torch.equal(through, c.noise)
    for x0, noise, context in seen:
        assert noise is not None
        for row in range(x0.shape[0]):
            match = [i for i in range(len(c)) if torch.equal(c.x0[i], x0[row])]
            assert len(match) == 1, "a trained x0 is not one of the couplings' samples"
            i = match[0]
            assert torch.equal(through[i], noise[row]), "the loss did not use the pair's own noise through its start"
            assert torch.equal(c.conditioning(i)["context"], context[row]), "the pair's prompt was not used"


def test_train_refuses_couplings_of_another_latent_space(host, sd15_model, prompts, mods):
    _, _, couplings_mod = mods
    c, _ = make_pairs(host, sd15_model, [prompts["a"]], prompts["neg"], "train-sdxl", count=2, steps=2)
    sdxl = couplings_mod.Couplings(c.noise, c.x0, c.prompts, c.prompt_index, dict(c.meta, latent_format="SDXL"))
    with pytest.raises(ValueError, match="SDXL latents"):
        train(host, sd15_model, couplings=[sdxl])
    with pytest.raises(ValueError, match="empty"):
        train(host, sd15_model)
