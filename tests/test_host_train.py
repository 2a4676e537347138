"""D2FTrain inside the real ComfyUI host (v0.33), through the real node classes.

Every node runs the way ComfyUI's executor runs it (``Host.run``). D2FTrain has ``is_input_list=True``:
the executor hands it every input as a list, so the helpers below do the same. Models are the tiny
random UNets in the real key layouts, loaded by the real loaders (see ``comfy_host``); training runs in
fp32 on the CPU (bf16, the node default, where that is the point), rank 4, a handful of steps on 8×8
latents.

What is compared, and how tight:

* the trainer's loss vs the Diff2Flow loss computed independently through the D2FFlowPatch output's own
  ``model_sampling`` and a direct UNet call: fp32 round-off (≤ 1e-5 relative);
* sampling a trained model through core nodes vs through D2FTrain's returned MODEL: ≤ 1e-4 relative
  (``max|a-b| / max|b|`` on KSampler outputs), each paired with a check that training changed the samples
  by far more than that (so equality is not the trivial "nothing was trained");
* resume vs straight: ≤ 1e-6 on every LoRA tensor.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import pytest

import comfy_host

_LOCATION = comfy_host.find_host()
if not _LOCATION:
    pytest.skip(f"no ComfyUI host: {_LOCATION.how}", allow_module_level=True)

torch = pytest.importorskip("torch")

EXACT = 1e-5        # fp32 round-off, same computation on two paths
SAMPLE_TOL = 1e-4   # sampler outputs, brief: ≤ 1e-4 relative
RESUME_TOL = 1e-6
SD15_SCALE = 0.18215  # SD1.5 latent_format.scale_factor (DESIGN §3)
CFG = 3.0

# Defaults for the tests (on top of the node's own schema defaults): CPU-sized runs.
TEST_OPTIONS = dict(mode="lora", steps=2, batch_size=1, grad_accumulation=1, learning_rate=1e-3, rank=4, alpha=0.0,
                    lora_targets="attention", gradient_checkpointing=False, training_dtype="fp32", cuda_graphs=False,
                    seed=0, save_every=0, preview_every=0)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def rel(a, b) -> float:
    """max|a-b| / max|b| (scalars: |a-b|/|b|)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max())


def max_tensor_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@dataclass
class Trained:
    model: object
    lora: dict
    loss: dict
    steps: int

    @property
    def losses(self) -> list[float]:
        return list(self.loss["loss"])


@dataclass
class Pack:
    """The pack's modules as the host loaded them (for spies and monkeypatches)."""
    train_node: object
    training: object
    state: object


@pytest.fixture(scope="module")
def pack(host):
    comfy_host.load_core_extras(host, "nodes_train.py", "nodes_dataset.py", "nodes_model_merging.py")
    train_node = sys.modules[host.node_class("D2FTrain").__module__]
    training = sys.modules[train_node.Trainer.__module__]
    state = sys.modules[train_node.save_state.__module__]
    return Pack(train_node, training, state)


@pytest.fixture(scope="module")
def lora_dir(host):
    """output/loras, where D2FTrain and SaveLoRA write, registered as a loras folder (as a user would
    point extra_model_paths.yaml at it) so LoraLoaderModelOnly finds their files."""
    return comfy_host.add_model_folder(host, "loras", os.path.join(host.folder_paths.get_output_directory(), "loras"))


@pytest.fixture(autouse=True)
def _clean_host_state(host):
    """No test leaves the stop flag set or a model loaded (patches merged) for the next one."""
    yield
    host.mm.interrupt_current_processing(False)
    host.mm.unload_all_models()


def train_options(host, **overrides) -> dict:
    """Every required D2FTrain input: the node's schema defaults, then TEST_OPTIONS, then overrides
    (so inputs added to the node later keep their defaults here)."""
    schema = host.node_class("D2FTrain").GET_SCHEMA()
    opts = {i.id: i.default for i in schema.inputs
            if not i.optional and getattr(i, "default", None) is not None}
    opts.update(TEST_OPTIONS)
    opts.update(overrides)
    return opts


def train(host, model, latents, positive, empty=None, resume_from=None, **overrides) -> Trained:
    """Run D2FTrain as the executor does for an is_input_list node: every input a list."""
    inputs = {k: [v] for k, v in comfy_host.d2f_train_inputs(host, train_options(host, **overrides)).items()}
    inputs.update(model=[model], latents=list(latents), positive=list(positive))
    if empty is not None:
        inputs["empty_conditioning"] = [empty]
    if resume_from is not None:
        inputs["resume_from"] = [resume_from]
    out = host.run("D2FTrain", **inputs)
    assert len(out) == 4
    return Trained(*out)


def dataset(n: int, size=(8, 8), seed=0, dim=768, pooled: int | None = None):
    """MakeTrainingDataset's output format without a VAE/CLIP: a list of LATENTs (one VAE-scale image
    each) and a list of CONDITIONINGs (one random 77-token caption each)."""
    gen = torch.Generator().manual_seed(seed)
    latents, positive = [], []
    for _ in range(n):
        latents.append({"samples": 4.0 * torch.randn((1, 4) + tuple(size), generator=gen)})
        extra = {"pooled_output": torch.randn(1, pooled, generator=gen)} if pooled else {}
        positive.append([[torch.randn(1, 77, dim, generator=gen), extra]])
    return latents, positive


def prompt_pair(dim=768, seed=100):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, dim, generator=gen), {}]], [[torch.randn(1, 77, dim, generator=gen), {}]]


def patch(host, model):
    return host.run1("D2FFlowPatch", model=model, prediction="auto", label_offset=0)


def ksample(host, model, conds, size=8, steps=4, seed=7):
    pos, neg = conds
    latent = host.run1("EmptyLatentImage", width=8 * size, height=8 * size, batch_size=1)
    out = host.run1("KSampler", model=model, seed=seed, steps=steps, cfg=CFG, sampler_name="euler",
                    scheduler="simple", positive=pos, negative=neg, latent_image=latent, denoise=1.0)
    return out["samples"]


def unet_digest(model) -> str:
    """sha256 over the bytes of the model's shared UNet state dict."""
    h = hashlib.sha256()
    for k, v in sorted(model.model.diffusion_model.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def eval_flow_loss(host, model, x0, context, sigma, noise) -> float:
    """The Diff2Flow loss ‖v̂ - (ε - x0)‖² of a flow-patched MODEL at fixed (σ, ε), through the host's own
    model call (``BaseModel.apply_model`` with the loaded patches and the patched model_sampling)."""
    host.mm.load_models_gpu([model])
    s = sigma.reshape(-1, 1, 1, 1)
    x = (1 - s) * x0 + s * noise
    with torch.no_grad():
        x0_hat = model.model.apply_model(x, sigma, c_crossattn=context).float()
    v_hat = (x - x0_hat) / s
    return float(((v_hat - (noise - x0)) ** 2).mean())


def saved_lora(path) -> dict:
    import safetensors.torch
    return safetensors.torch.load_file(path)


# Where D2FTrain's files go (nodes/run_files.py): every run takes a new counter NNNNN,
# output/loras/<run_name>_<NNNNN>_<step:06d>_steps.safetensors and output/d2f_states/<run_name>_<NNNNN>/state.safetensors.
def run_counters(host, run_name) -> list[int]:
    """Counters of the runs named ``run_name`` that saved (their state folders), oldest first."""
    states = os.path.join(host.folder_paths.get_output_directory(), "d2f_states")
    found = [re.fullmatch(re.escape(run_name) + r"_(\d{5})", n) for n in os.listdir(states)] if os.path.isdir(states) else []
    return sorted(int(m.group(1)) for m in found if m)


def state_file(host, run_name, counter=None, relative=False) -> str:
    """The state of run ``<run_name>_<counter>`` (default: the newest); ``relative``: as resume_from takes it."""
    counter = run_counters(host, run_name)[-1] if counter is None else counter
    rel_path = os.path.join("d2f_states", f"{run_name}_{counter:05d}", "state.safetensors")
    return rel_path if relative else os.path.join(host.folder_paths.get_output_directory(), rel_path)


def lora_file(host, run_name, step, counter=None) -> str:
    """The LoRA file run ``<run_name>_<counter>`` (default: the newest) saved at ``step``."""
    counter = run_counters(host, run_name)[-1] if counter is None else counter
    return os.path.join(host.folder_paths.get_output_directory(), "loras", f"{run_name}_{counter:05d}_{step:06d}_steps.safetensors")


# ---------------------------------------------------------------------------------------------
# 1. the loss is DESIGN §2's objective, through the patched model's own model_sampling
# ---------------------------------------------------------------------------------------------
FORCED_SIGMAS = (0.05, 0.5, 0.9)


def test_loss_is_the_diff2flow_objective(host, pack, sd15_model, monkeypatch, record_measure):
    """Step 1's loss (LoRA up = 0, so the bare UNet) at forced σ ∈ {0.05, 0.5, 0.9} and the trainer's own
    noise equals ‖v̂ - (ε - x0)‖² with x_in = F.calculate_input(σ, x), t = F.timestep(σ),
    x̂0 = F.calculate_denoised(σ, UNet(x_in, t, ctx), x), v̂ = (x - x̂0)/σ, F = D2FFlowPatch's model_sampling;
    the native objective equals MSE(ε̂, ε)."""
    latents, positive = dataset(3, seed=1)
    fixed = torch.tensor(FORCED_SIGMAS)
    monkeypatch.setattr(pack.training, "sample_sigmas", lambda n, *a, **k: fixed[:n].clone())
    seen = []
    real_interpolate = pack.training.interpolate

    def spy(x0, noise, sigma):
        seen.append((x0.detach().clone(), noise.detach().clone()))
        return real_interpolate(x0, noise, sigma)

    monkeypatch.setattr(pack.training, "interpolate", spy)
    trainer = {}
    for objective in ("diff2flow", "native"):
        seen.clear()
        out = train(host, sd15_model, latents, positive, steps=1, batch_size=3, loss=objective,
                    gradient_checkpointing=True, run_name=f"loss_{objective}")
        assert out.steps == 1 and len(out.losses) == 1 and len(seen) == 1
        trainer[objective] = (out.losses[0],) + seen[0]
    monkeypatch.undo()

    # Independently: the host's latent scale, the captions paired by hand, F's methods, the UNet itself.
    host.mm.unload_all_models()
    assert sd15_model.get_model_object("latent_format").scale_factor == pytest.approx(SD15_SCALE)
    images = SD15_SCALE * torch.cat([l["samples"] for l in latents])
    contexts = torch.cat([p[0][0] for p in positive])
    F = patch(host, sd15_model).get_model_object("model_sampling")
    unet = sd15_model.model.diffusion_model
    sigma = fixed.clone()
    s = sigma.reshape(-1, 1, 1, 1)

    def independent(x0_used, noise):
        # which image is in which row (the trainer shuffles): match the rows the trainer used
        order = [int(torch.cdist(row.reshape(1, -1), images.reshape(3, -1)).argmin()) for row in x0_used]
        assert sorted(order) == [0, 1, 2]
        x0 = images[order]
        assert rel(x0_used, x0) <= 1e-6, "the trainer's x0 is not process_in(latent) (×0.18215)"
        x = (1 - s) * x0 + s * noise
        with torch.no_grad():
            x_in = F.calculate_input(sigma, x)
            t = F.timestep(sigma)
            out = unet(x_in, t, context=contexts[order]).float()
            x0_hat = F.calculate_denoised(sigma, out, x)
            wrong = {"integer labels (ComfyUI's rounding)": unet(x_in, t.round(), context=contexts[order]).float(),
                     "labels off by one (official code)": unet(x_in, t + 1, context=contexts[order]).float()}
        v_hat = (x - x0_hat) / s
        d2f = ((v_hat - (noise - x0)) ** 2).flatten(1).mean(1)
        native = ((out - noise) ** 2).flatten(1).mean(1)
        wrong_losses = {k: (((x - F.calculate_denoised(sigma, o, x)) / s - (noise - x0)) ** 2).mean()
                        for k, o in wrong.items()}
        wrong_losses["x0-MSE σ²‖v̂-v‖² (TrainLoraNode's)"] = (s.flatten() ** 2 * d2f).mean()
        return d2f, native, t, wrong_losses

    d2f, _, t, wrong_losses = independent(*trainer["diff2flow"][1:])
    _, native, _, _ = independent(*trainer["native"][1:])

    # the label F feeds the UNet is the fractional inverse of the base schedule (log-linear), not rounded
    base = sd15_model.get_model_object("model_sampling")
    log_ve = (sigma.double() / (1 - sigma.double())).log()
    expected_t = torch.from_numpy(np.interp(log_ve.numpy(), base.log_sigmas.double().numpy(),
                                            np.arange(len(base.log_sigmas))))
    assert torch.allclose(t.double(), expected_t, atol=1e-3), (t, expected_t)
    assert float((t - t.round()).abs().max()) > 0.05, "the forced σ happen to sit on integer labels"

    d_d2f = rel(trainer["diff2flow"][0], d2f.mean())
    d_native = rel(trainer["native"][0], native.mean())
    record_measure("trainer diff2flow loss vs F-computed ‖v̂-(ε-x0)‖²", d_d2f, f"≤ {EXACT:g}")
    record_measure("trainer native loss vs MSE(ε̂, ε)", d_native, f"≤ {EXACT:g}")
    # DESIGN §2: for ε-models the Diff2Flow loss is the native loss reweighted by 1/(1-σ)²
    assert torch.allclose(d2f, native / (1 - sigma) ** 2, rtol=1e-4)
    assert d_d2f <= EXACT, (trainer["diff2flow"][0], float(d2f.mean()))
    assert d_native <= EXACT, (trainer["native"][0], float(native.mean()))

    # teeth: the loss computed with a plausible mistake lands outside the bound (the match above is exact)
    for what, wrong_loss in wrong_losses.items():
        d_wrong = rel(wrong_loss, d2f.mean())
        record_measure(f"loss with {what} vs correct (must be > bound)", d_wrong, f"> {3 * EXACT:g}")
        assert d_wrong > 3 * EXACT, what


# ---------------------------------------------------------------------------------------------
# 2 + 3. a LoRA run: loss goes down; its LoRA round-trips through the core LoRA nodes
# ---------------------------------------------------------------------------------------------
LORA_STEPS = 16
LORA_LR = 1e-2  # high for a LoRA, so that 16 CPU steps visibly change a random UNet (measured: loss ×0.66)
LORA_ALPHA = 8.0  # ≠ rank 4: the exported .alpha must carry the scale 2 the trainer used


@pytest.fixture(scope="module")
def lora_run(host, pack, sd15_model, lora_dir):
    latents, positive = dataset(3, seed=2)
    out = train(host, sd15_model, latents, positive, steps=LORA_STEPS, batch_size=3, learning_rate=LORA_LR,
                alpha=LORA_ALPHA, lora_targets="all", save_every=LORA_STEPS, run_name="interop")
    return latents, positive, out


def test_training_lowers_the_loss(host, sd15_model, lora_run, record_measure):
    """A fixed evaluation batch (the 3 training images × σ ∈ {0.2,…,0.8} × fixed noise), evaluated
    through the host's model call: lower with the returned MODEL than with the untrained patched model."""
    latents, positive, out = lora_run
    assert out.steps == LORA_STEPS and len(out.losses) == LORA_STEPS
    assert all(math.isfinite(v) for v in out.losses)
    host.run_output_node("LossGraphNode", loss=out.loss, filename_prefix="d2f_test_loss")  # the core plot accepts LOSS_MAP

    gen = torch.Generator().manual_seed(99)
    x0 = SD15_SCALE * torch.cat([l["samples"] for l in latents]).repeat(4, 1, 1, 1)
    context = torch.cat([p[0][0] for p in positive]).repeat(4, 1, 1)
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.8]).repeat_interleave(3)
    noise = torch.randn(x0.shape, generator=gen)
    before = eval_flow_loss(host, patch(host, sd15_model), x0, context, sigma, noise)
    after = eval_flow_loss(host, out.model, x0, context, sigma, noise)
    record_measure("held-out Diff2Flow loss after/before training", after / before, "< 0.85")
    first, last = sum(out.losses[:4]) / 4, sum(out.losses[-4:]) / 4
    record_measure("LOSS_MAP mean(last 4)/mean(first 4) (reported only)", last / first, "")
    assert after < 0.85 * before, (before, after)


def test_lora_interop_with_core_nodes(host, pack, sd15_model, lora_run, lora_dir, caplog, record_measure):
    """D2FTrain's LORA_MODEL → core SaveLoRA → file → core LoraLoaderModelOnly (+ D2FFlowPatch), and core
    LoraModelLoader on the LORA_MODEL directly (merged and bypass): KSampler outputs equal sampling
    D2FTrain's own MODEL. And the trainer's forward (bypass hooks) equals the host's merged LoRA."""
    latents, positive, out = lora_run
    conds = prompt_pair()

    before = set(glob.glob(os.path.join(lora_dir, "d2f_test_interop_*.safetensors")))
    host.run_output_node("SaveLoRA", lora=out.lora, prefix="loras/d2f_test_interop", steps=out.steps)
    written = sorted(set(glob.glob(os.path.join(lora_dir, "d2f_test_interop_*.safetensors"))) - before)
    assert len(written) == 1, written
    on_disk = saved_lora(written[0])
    assert max_tensor_diff(on_disk, out.lora) == 0.0
    own = lora_file(host, "interop", LORA_STEPS)  # D2FTrain's save_every file
    assert os.path.exists(own) and max_tensor_diff(saved_lora(own), out.lora) == 0.0

    with caplog.at_level(logging.WARNING):
        from_file = host.run1("LoraLoaderModelOnly", model=sd15_model, lora_name=os.path.basename(written[0]),
                              strength_model=1.0)
    not_loaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage()]
    assert not not_loaded, f"the core loader ignored keys of our LoRA: {not_loaded[:3]}"
    n_patched = len(from_file.patches)
    n_pairs = sum(1 for k in out.lora if k.endswith(".lora_up.weight"))
    assert n_patched == n_pairs > 0, (n_patched, n_pairs)

    ours = ksample(host, out.model, conds)
    untrained = ksample(host, patch(host, sd15_model), conds)
    via_file = ksample(host, patch(host, from_file), conds)
    via_loader = ksample(host, patch(host, host.run1("LoraModelLoader", model=sd15_model, lora=out.lora,
                                                     strength_model=1.0, bypass=False)), conds)
    via_bypass = ksample(host, patch(host, host.run1("LoraModelLoader", model=sd15_model, lora=out.lora,
                                                     strength_model=1.0, bypass=True)), conds)
    assert torch.isfinite(ours).all()
    effect = rel(ours, untrained)
    d_file, d_loader, d_bypass = rel(via_file, ours), rel(via_loader, ours), rel(via_bypass, ours)
    record_measure("trained vs untrained samples (the effect, must be large)", effect, f"> {100 * SAMPLE_TOL:g}")
    record_measure("SaveLoRA→LoraLoaderModelOnly→patch vs D2FTrain MODEL", d_file, f"≤ {SAMPLE_TOL:g}")
    record_measure("LoraModelLoader(LORA_MODEL)→patch vs D2FTrain MODEL", d_loader, f"≤ {SAMPLE_TOL:g}")
    record_measure("LoraModelLoader(bypass)→patch vs D2FTrain MODEL", d_bypass, f"≤ {SAMPLE_TOL:g}")
    assert effect > 100 * SAMPLE_TOL, "training barely changed the samples; the comparisons prove nothing"
    assert d_file <= SAMPLE_TOL and d_loader <= SAMPLE_TOL and d_bypass <= SAMPLE_TOL, (d_file, d_loader, d_bypass)

    # The trainer's own forward with these weights (bypass hooks on its private copy) equals the host's
    # merged LoRA: resume one step from the saved state; step 17's loss uses the step-16 weights.
    fixed = torch.tensor(FORCED_SIGMAS)
    seen = []
    real_interpolate = pack.training.interpolate

    def spy(x0, noise, sigma):
        seen.append((x0.detach().clone(), noise.detach().clone()))
        return real_interpolate(x0, noise, sigma)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pack.training, "sample_sigmas", lambda n, *a, **k: fixed[:n].clone())
        mp.setattr(pack.training, "interpolate", spy)
        again = train(host, sd15_model, latents, positive, steps=LORA_STEPS + 1, batch_size=3, learning_rate=LORA_LR,
                      alpha=LORA_ALPHA, lora_targets="all", run_name="interop_check", resume_from=state_file(host, "interop", relative=True))
    assert again.steps == LORA_STEPS + 1 and len(again.losses) == 1 and len(seen) == 1
    x0_used, noise = seen[0]
    images = SD15_SCALE * torch.cat([l["samples"] for l in latents])
    order = [int(torch.cdist(row.reshape(1, -1), images.reshape(3, -1)).argmin()) for row in x0_used]
    context = torch.cat([p[0][0] for p in positive])[order]
    host_loss = eval_flow_loss(host, patch(host, from_file), x0_used, context, fixed.clone(), noise)
    d = rel(again.losses[0], host_loss)
    record_measure("trainer loss with trained LoRA vs host-merged LoRA loss", d, f"≤ {10 * EXACT:g}")
    assert d <= 10 * EXACT, (again.losses[0], host_loss)


# ---------------------------------------------------------------------------------------------
# 4. full fine-tune → CheckpointSave → CheckpointLoaderSimple
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd15_full(host, pack):
    """A full tiny SD1.5 checkpoint (tiny UNet + real-layout CLIP-L and VAE) through CheckpointLoaderSimple."""
    name = "d2f_test_train_full.safetensors"
    path = os.path.join(host.checkpoint_dir, name)
    unet = comfy_host.tiny_unet_state_dict(comfy_host.SD15_UNET_CONFIG, "SD15", seed=0)
    comfy_host.write_sd15_checkpoint(path, unet)
    model, clip, vae = host.run("CheckpointLoaderSimple", ckpt_name=name)
    yield model, clip, vae
    del model, clip, vae
    host.mm.unload_all_models()
    os.remove(path)


def test_full_mode_checkpoint_save_round_trip(host, pack, sd15_full, record_measure):
    model, clip, vae = sd15_full
    host.mm.unload_all_models()
    digest = unet_digest(model)
    latents, positive = dataset(2, seed=4)
    out = train(host, model, latents, positive, mode="full", steps=3, batch_size=2, learning_rate=2e-4,
                gradient_checkpointing=True, run_name="full")
    assert out.steps == 3 and all(math.isfinite(v) for v in out.losses)
    n_params = sum(1 for _ in model.model.diffusion_model.parameters())
    assert len(out.model.patches) == n_params, "the full fine-tune's diffs did not all land as patches"
    assert all(k.endswith(".diff") or k.endswith(".diff_b") for k in out.lora)

    out_dir = comfy_host.add_model_folder(host, "checkpoints",
                                          os.path.join(host.folder_paths.get_output_directory(), "checkpoints"))
    before = set(glob.glob(os.path.join(out_dir, "d2f_test_full_*.safetensors")))
    host.run_output_node("CheckpointSave", model=out.model, clip=clip, vae=vae, filename_prefix="checkpoints/d2f_test_full")
    written = sorted(set(glob.glob(os.path.join(out_dir, "d2f_test_full_*.safetensors"))) - before)
    assert len(written) == 1, written
    try:
        reloaded, _, _ = host.run("CheckpointLoaderSimple", ckpt_name=os.path.basename(written[0]))
        assert reloaded.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.float32
        conds = prompt_pair()
        ours = ksample(host, out.model, conds)
        untrained = ksample(host, patch(host, model), conds)
        again = ksample(host, patch(host, reloaded), conds)
        effect, d = rel(ours, untrained), rel(again, ours)
        record_measure("full: trained vs untrained samples (the effect)", effect, f"> {100 * SAMPLE_TOL:g}")
        record_measure("full: CheckpointSave→CheckpointLoaderSimple→patch vs D2FTrain MODEL", d, f"≤ {SAMPLE_TOL:g}")
        assert effect > 100 * SAMPLE_TOL
        assert d <= SAMPLE_TOL, d
        del reloaded
    finally:
        host.mm.unload_all_models()
        os.remove(written[0])  # 0.5 GB
    assert unet_digest(model) == digest, "training / CheckpointSave changed the loader's shared weights"


# ---------------------------------------------------------------------------------------------
# 5. the loader's weights are never changed
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_base_weights_unchanged(host, pack, sd15_model, sd15_unet_name, mode):
    """bf16 (the node's default) so that training on the shared module instead of a private copy would
    show (the fp32 weights would be cast); the input patcher keeps its patches/object patches."""
    import safetensors.torch

    host.mm.unload_all_models()
    unet = sd15_model.model.diffusion_model
    digest = unet_digest(sd15_model)
    flags = {k: p.requires_grad for k, p in unet.named_parameters()}
    sampling = sd15_model.get_model_object("model_sampling")
    patches, object_patches = dict(sd15_model.patches), dict(sd15_model.object_patches)
    latents, positive = dataset(2, seed=5, size=(4, 4))
    out = train(host, sd15_model, latents, positive, mode=mode, steps=2, batch_size=2, training_dtype="bf16",
                learning_rate=1e-3 if mode == "lora" else 1e-4, lora_targets="all", run_name=f"base_{mode}")
    assert all(math.isfinite(v) for v in out.losses)
    assert dict(sd15_model.patches) == patches and dict(sd15_model.object_patches) == object_patches
    # right after training (nothing else loaded since): the shared module was never touched
    assert unet_digest(sd15_model) == digest, f"{mode}: D2FTrain changed the shared weights"
    # using the result merges its patches into the shared weights while loaded; unloading restores them
    ksample(host, out.model, prompt_pair(), size=4, steps=2)
    host.mm.unload_all_models()
    assert unet_digest(sd15_model) == digest, f"{mode}: weights differ after sampling the trained model"
    on_disk = safetensors.torch.load_file(os.path.join(host.unet_dir, sd15_unet_name))
    live = unet.state_dict()
    assert [k for k in on_disk if not torch.equal(live[k].cpu(), on_disk[k])] == []
    assert {k: p.requires_grad for k, p in unet.named_parameters()} == flags
    assert all(p.grad is None for p in unet.parameters())
    hooked = [n for n, m in unet.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == [], f"hooks left on the shared module: {hooked[:5]}"
    assert sd15_model.get_model_object("model_sampling") is sampling
    assert not isinstance(sampling, host.comfy.model_sampling.CONST)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_run_is_freed_when_the_node_returns(host, pack, sd15_model, mode, monkeypatch):
    """The run's closures hold it in reference cycles (its net, its snapshot function), and with it the trainer,
    the optimizer state and (on a GPU) the CUDA graphs' pools. With the automatic collector off, only the node's
    own collection can free them: after it returns, no TrainingRun, Trainer or optimizer of the run is alive."""
    import gc
    import weakref

    runs = []
    init = pack.train_node.TrainingRun.__init__

    def tracked(self, *a, **k):
        init(self, *a, **k)
        runs.append(weakref.ref(self))
    monkeypatch.setattr(pack.train_node.TrainingRun, "__init__", tracked)
    latents, positive = dataset(2, seed=5, size=(4, 4))
    gc.collect()
    gc.disable()
    try:
        out = train(host, sd15_model, latents, positive, mode=mode, steps=2, batch_size=2, run_name=f"freed_{mode}")
        alive = [type(o).__name__ for o in gc.get_objects()
                 if isinstance(o, (pack.train_node.Trainer, torch.optim.Optimizer))]
    finally:
        gc.enable()
    assert len(runs) == 1 and runs[0]() is None, "the TrainingRun outlived the node"
    assert not alive, f"still alive after the node returned: {alive}"
    assert out.lora  # what the node returned is kept


# ---------------------------------------------------------------------------------------------
# 6. resume continues exactly
# ---------------------------------------------------------------------------------------------
def test_resume_equals_straight_run(host, pack, sd15_model, lora_dir, record_measure):
    latents, positive = dataset(3, seed=6)
    common = dict(batch_size=2, learning_rate=2e-3, lora_targets="all", save_every=2)
    straight = train(host, sd15_model, latents, positive, steps=4, run_name="resume_straight", **common)
    first = train(host, sd15_model, latents, positive, steps=2, run_name="resume_split", **common)
    state_path = state_file(host, "resume_split")
    assert os.path.exists(state_path) and pack.state.read_metadata(state_path)["step"] == "2"
    # for the teeth below: the same step-2 state without the optimizer's moments (weights and step only)
    import safetensors.torch
    no_moments_path = os.path.join(os.path.dirname(state_path), "weights_only_step2.state.safetensors")
    safetensors.torch.save_file({k: v for k, v in safetensors.torch.load_file(state_path).items()
                                 if not k.startswith("optim.")}, no_moments_path,
                                metadata=pack.state.read_metadata(state_path))
    second = train(host, sd15_model, latents, positive, steps=4, run_name="resume_split",
                   resume_from=state_file(host, "resume_split", relative=True), **common)
    assert (first.steps, second.steps, straight.steps) == (2, 4, 4)
    d = max_tensor_diff(second.lora, straight.lora)
    record_measure("resumed 2+2 vs straight 4 steps: max |ΔLoRA|", d, f"≤ {RESUME_TOL:g}")
    assert d <= RESUME_TOL
    assert rel(first.losses + second.losses, straight.losses) <= RESUME_TOL
    assert max_tensor_diff(saved_lora(lora_file(host, "resume_split", 4)),
                           straight.lora) <= RESUME_TOL

    # teeth: resuming the weights without the optimizer's moments ends elsewhere
    no_moments = train(host, sd15_model, latents, positive, steps=4, run_name="resume_no_moments",
                       resume_from=no_moments_path, **common)
    d_teeth = max_tensor_diff(no_moments.lora, straight.lora)
    record_measure("resume without optimizer state vs straight (must be large)", d_teeth, f"> {100 * RESUME_TOL:g}")
    assert d_teeth > 100 * RESUME_TOL


def test_compiled_training_follows_eager_training(host, pack, sd15_model, monkeypatch, record_measure):
    """compile=True runs the real UNet through torch.compile (inductor on the CPU here) and trains what
    eager training trains, to compiler round-off."""
    made = []

    class Recorded(pack.train_node.CompiledNet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr(pack.train_node, "CompiledNet", Recorded)
    latents, positive = dataset(3, seed=8)
    # SGD, not Adam: Adam divides by √v, which turns round-off in near-zero gradients into lr-sized steps.
    common = dict(steps=3, batch_size=2, learning_rate=0.05, optimizer="sgd", run_name="compiled")
    eager = train(host, sd15_model, latents, positive, compile=False, **common)
    assert not made
    compiled = train(host, sd15_model, latents, positive, compile=True, **common)
    assert len(made) == 1 and made[0].fallback_reason is None and made[0].tried
    d = max_tensor_diff(compiled.lora, eager.lora)
    up = {k: v for k, v in eager.lora.items() if "lora_up" in k}  # zero before training
    trained = max_tensor_diff(up, {k: v * 0 for k, v in up.items()})
    record_measure("compiled vs eager D2FTrain, 3 steps: max |ΔLoRA|", d, f"≤ 1e-3 × trained change {trained:.2g}")
    assert trained > 1e-5 and d <= 1e-3 * trained
    assert rel(compiled.losses, eager.losses) <= 1e-4


@pytest.mark.parametrize("device, opts, ddp, expected", [
    ("cuda", dict(mode="lora", cuda_graphs=True), False, (False, True, False)),                      # checked
    ("cuda", dict(mode="lora", cuda_graphs=True, gradient_checkpointing=True), False, (False, False, True)),
    ("cuda", dict(mode="full", cuda_graphs=True), False, (False, False, True)),
    ("cuda", dict(mode="lora", cuda_graphs=True, compile=True), False, (True, False, True)),
    ("cuda", dict(mode="lora", cuda_graphs=True, compile=True), True, (False, False, True)),         # DDP
    ("cuda", dict(mode="lora", cuda_graphs=False, compile=True), False, (True, False, False)),
    ("cpu", dict(mode="full", cuda_graphs=True, gradient_checkpointing=True), False, (False, False, False)),
])
def test_fast_paths_are_off_where_they_were_found_wrong(pack, device, opts, ddp, expected):
    compile_, graphs, why = pack.train_node.fast_paths(device, opts, ddp)
    assert (compile_, graphs, why is not None) == expected


def test_compile_is_off_under_ddp_with_one_logged_line(host, pack, sd15_model, monkeypatch, caplog, tmp_path):
    """In a process group (here one gloo rank, so the step goes through DDP), compile=True is refused with one
    logged line and the run trains eagerly: the weights equal an eager run's exactly."""
    import torch.distributed as dist
    made = []
    monkeypatch.setattr(pack.train_node, "CompiledNet", lambda *a, **k: made.append(1) or a[0])
    latents, positive = dataset(3, seed=8)
    common = dict(steps=2, batch_size=2, learning_rate=0.05, optimizer="sgd", run_name="ddp_compile")
    eager = train(host, sd15_model, latents, positive, compile=False, **common)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with caplog.at_level(logging.INFO):
            ddp = train(host, sd15_model, latents, positive, compile=True, **common)
    finally:
        dist.destroy_process_group()
    lines = [r for r in caplog.records if "CUDA graphs and torch.compile are off" in r.getMessage()]
    assert not made and len(lines) == 1
    assert max_tensor_diff(ddp.lora, eager.lora) == 0.0


# ---------------------------------------------------------------------------------------------
# 7. the UI's stop button
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["ui_progress_hook", "flag_only"])
def test_stop_button_keeps_what_was_trained(host, pack, sd15_model, lora_dir, monkeypatch, how):
    """The stop button sets the host's interrupt flag (from the server thread, at any time). In the UI,
    main.py's progress hook raises InterruptProcessingException from the next ProgressBar update
    (``ui_progress_hook``); when no hook call comes first (throttled updates, or the press lands while a
    step computes, the usual case) the host's own layers raise it from inside the next UNet forward
    (``comfy.ops.run_every_op``) (``flag_only``). Either way the node ends training keeping the last
    completed step, saves, clears the flag so downstream nodes (SaveLoRA, …) still run, and returns."""
    import comfy.utils

    mm = host.mm
    k, total = 3, 10
    pressed = []

    def progress_hook(value, total_, preview, prompt_id=None, node_id=None):
        if value >= k and not pressed:
            pressed.append(value)
            mm.interrupt_current_processing(True)  # the stop button
        if how == "ui_progress_hook":
            mm.throw_exception_if_processing_interrupted()  # what main.py's hijack_progress hook does first

    monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", progress_hook)
    latents, positive = dataset(2, seed=7)
    run_name = f"stop_{how}"
    out = train(host, sd15_model, latents, positive, steps=total, run_name=run_name)
    assert pressed == [k]
    assert k <= out.steps <= k + 1, f"stopped at step {out.steps}, pressed after step {k}"
    assert len(out.losses) == out.steps
    assert not mm.processing_interrupted(), "the stop flag leaked out of D2FTrain"
    host.nodes.before_node_execution()  # what the executor calls before the next node: must not raise
    path = lora_file(host, run_name, out.steps)
    assert os.path.exists(path), os.listdir(lora_dir)
    assert max_tensor_diff(saved_lora(path), out.lora) == 0.0
    state_path = state_file(host, run_name)
    assert pack.state.read_metadata(state_path)["step"] == str(out.steps)
    host.run_output_node("SaveLoRA", lora=out.lora, prefix=f"loras/d2f_test_{run_name}", steps=out.steps)
    # what was kept is exactly the last completed step's weights (an interrupted step leaves no trace)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    clean = train(host, sd15_model, latents, positive, steps=out.steps, run_name=f"{run_name}_clean")
    assert max_tensor_diff(out.lora, clean.lora) == 0.0
    assert out.losses == clean.losses


# ---------------------------------------------------------------------------------------------
# 8. non-finite loss
# ---------------------------------------------------------------------------------------------
NAN_OPTIONS = dict(steps=12, batch_size=1, learning_rate=1.0, lora_targets="all")  # 1.0: the schema's maximum


@pytest.mark.parametrize("sync_every", [1, 3], ids=["cpu_cadence", "gpu_like_cadence"])
def test_nan_loss_stops_with_step_and_keeps_last_good(host, pack, sd15_model, lora_dir, monkeypatch, record_measure,
                                                      sync_every):
    """An absurd learning rate → NaN loss: RuntimeError naming the step; the last weights proven good (the
    loss computed with them was finite) are saved under their step, and that state resumes and trains on.
    The node reads the losses every step on the CPU but every 10 steps on a GPU; ``gpu_like_cadence`` runs
    the GPU's batching of loss read-outs (every 3 steps) on the CPU."""
    if sync_every != 1:
        real_config = pack.train_node.TrainConfig
        monkeypatch.setattr(pack.train_node, "TrainConfig", lambda **kw: real_config(**dict(kw, sync_every=sync_every)))
    latents, positive = dataset(2, seed=0)
    run_name = f"nan_{sync_every}"
    with pytest.raises(RuntimeError, match=r"at step (\d+)") as info:
        train(host, sd15_model, latents, positive, run_name=run_name, **NAN_OPTIONS)
    monkeypatch.undo()
    message = str(info.value)
    bad = int(re.search(r"at step (\d+)", message).group(1))
    good = int(re.search(r"last good state \(step (\d+)\)", message).group(1))
    assert 1 < bad <= NAN_OPTIONS["steps"], message
    # weights of step n are proven good by the (finite) loss of step n+1, read at the next read-out
    last_read = (bad - 1) // sync_every * sync_every
    assert good == (last_read if bad > last_read + 1 else max(last_read - sync_every, 0)), message
    assert good > 0, "the NaN came before any good step was read back: pick another seed/rate"
    path = lora_file(host, run_name, good)
    assert path in message and os.path.exists(path), message
    kept = saved_lora(path)
    assert all(torch.isfinite(v).all() for v in kept.values())
    # the kept weights are exactly those of a clean run of `good` steps
    clean = train(host, sd15_model, latents, positive, run_name=f"{run_name}_clean", **dict(NAN_OPTIONS, steps=good))
    d = max_tensor_diff(kept, clean.lora)
    record_measure(f"LoRA kept after NaN at step {bad} vs clean {good}-step run", d, "= 0")
    assert d == 0.0
    # ... and its training state resumes: with a sane learning rate training goes on, finite
    state_path = state_file(host, run_name)
    assert pack.state.read_metadata(state_path)["step"] == str(good)
    on = train(host, sd15_model, latents, positive, run_name=f"{run_name}_resumed", resume_from=state_path,
               **dict(NAN_OPTIONS, steps=good + 2, learning_rate=1e-4))
    assert on.steps == good + 2 and all(math.isfinite(v) for v in on.losses), on.losses
    assert all(torch.isfinite(v).all() for v in on.lora.values())


def test_full_mode_nan_restores_from_host_snapshots(host, pack, sd15_model, lora_dir, monkeypatch):
    """Full fine-tunes keep their recovery snapshots in host memory (``HostSnapshots``, two slots): after a
    NaN the weights saved under the last good step equal a clean run of that many steps, exactly."""
    real_config = pack.train_node.TrainConfig
    monkeypatch.setattr(pack.train_node, "TrainConfig", lambda **kw: real_config(**dict(kw, sync_every=3)))
    used = []
    real_ring = pack.train_node.HostSnapshots

    class Recorded(real_ring):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            used.append(self)
    monkeypatch.setattr(pack.train_node, "HostSnapshots", Recorded)
    latents, positive = dataset(2, seed=0)
    options = dict(NAN_OPTIONS, mode="full", steps=20)
    with pytest.raises(RuntimeError, match=r"at step (\d+)") as info:
        train(host, sd15_model, latents, positive, run_name="nan_full", **options)
    message = str(info.value)
    good = int(re.search(r"last good state \(step (\d+)\)", message).group(1))
    assert len(used) == 1 and used[0].taken >= 3, "full mode did not snapshot through HostSnapshots"
    assert good > 0, message
    path = lora_file(host, "nan_full", good)
    assert path in message and os.path.exists(path), message
    clean = train(host, sd15_model, latents, positive, run_name="nan_full_clean", **dict(options, steps=good))
    assert max_tensor_diff(saved_lora(path), clean.lora) == 0.0


def test_nan_at_first_step_saves_nothing(host, pack, sd15_model, lora_dir):
    latents, positive = dataset(1, seed=0)
    latents[0]["samples"][0, 0, 0, 0] = float("nan")  # a poisoned latent
    before = set(os.listdir(lora_dir))
    with pytest.raises(RuntimeError, match="at step 1") as info:
        train(host, sd15_model, latents, positive, steps=3, run_name="nan_first")
    assert "saved" not in str(info.value)
    assert {f for f in set(os.listdir(lora_dir)) - before if f.startswith("nan_first")} == set()


# ---------------------------------------------------------------------------------------------
# 9. out of memory
# ---------------------------------------------------------------------------------------------
def test_out_of_memory_message(host, pack, sd15_model, monkeypatch):
    def oom(self, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pack.training.Trainer, "step", oom)
    loaded_before = len(host.mm.current_loaded_models)
    latents, positive = dataset(1, seed=0)
    with pytest.raises(RuntimeError) as info:
        train(host, sd15_model, latents, positive, batch_size=4, gradient_checkpointing=False, run_name="oom")
    message = str(info.value)
    assert not isinstance(info.value, torch.OutOfMemoryError)
    for words in ("out of GPU memory", "batch size 4", "batch_size", "gradient_checkpointing", "gradient checkpointing off"):
        assert words in message, message
    assert len(host.mm.current_loaded_models) <= loaded_before, "the private training copy stayed loaded"


# ---------------------------------------------------------------------------------------------
# 10. bad inputs fail before any model is loaded
# ---------------------------------------------------------------------------------------------
def _bad_inputs(host, sd15_model):
    latents, positive = dataset(3, seed=0)
    return {
        "flow-native model (ModelSamplingSD3)": (
            dict(model=host.run1("ModelSamplingSD3", model=sd15_model, shift=3.0), latents=latents[:1],
                 positive=positive[:1]), ValueError, "already a flow-matching model"),
        "latent with 16 channels": (
            dict(model=sd15_model, latents=[{"samples": torch.randn(1, 16, 8, 8)}], positive=positive[:1]),
            ValueError, "16 channels but this model works on 4"),
        "no latents": (dict(model=sd15_model, latents=[], positive=positive[:1]), ValueError, "dataset is empty"),
        "zero-image latent batch": (
            dict(model=sd15_model, latents=[{"samples": torch.zeros(0, 4, 8, 8)}], positive=positive[:1]),
            ValueError, "dataset is empty"),
        "3 latents, 2 captions": (
            dict(model=sd15_model, latents=latents, positive=positive[:2]), ValueError,
            "3 latent inputs but 2 conditioning inputs"),
        "3-image batch, 2 captions": (
            dict(model=sd15_model, latents=[{"samples": torch.randn(3, 4, 8, 8)}],
                 positive=[positive[0] + positive[1]]), ValueError, "3 images but 2 captions"),
        "caption dropout without empty prompt": (
            dict(model=sd15_model, latents=latents[:1], positive=positive[:1], caption_dropout=0.1), ValueError,
            "caption_dropout needs the empty prompt"),
        "missing resume file": (
            dict(model=sd15_model, latents=latents[:1], positive=positive[:1],
                 resume_from="d2f_states/does_not_exist.state.safetensors"), FileNotFoundError,
            "resume_from: no training state"),
    }


BAD_INPUT_CASES = ["flow-native model (ModelSamplingSD3)", "latent with 16 channels", "no latents",
                   "zero-image latent batch", "3 latents, 2 captions", "3-image batch, 2 captions",
                   "caption dropout without empty prompt", "missing resume file"]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_inputs_fail_before_gpu_work(host, pack, sd15_model, monkeypatch, case):
    kwargs, error, message = _bad_inputs(host, sd15_model)[case]
    loads = []
    real_load = host.mm.load_models_gpu
    monkeypatch.setattr(host.mm, "load_models_gpu", lambda *a, **k: (loads.append(a), real_load(*a, **k))[1])

    class Reached:
        def __init__(self, *a, **k):
            raise AssertionError("D2FTrain started a training run on bad inputs")

    monkeypatch.setattr(pack.train_node, "TrainingRun", Reached)
    model, latents, positive = kwargs.pop("model"), kwargs.pop("latents"), kwargs.pop("positive")
    with pytest.raises(error, match=message):
        train(host, model, latents, positive, run_name="bad", **kwargs)
    assert loads == [], "a model was loaded before the inputs were checked"


# ---------------------------------------------------------------------------------------------
# 11. SDXL
# ---------------------------------------------------------------------------------------------
def test_sdxl_smoke(host, pack, sdxl_unet_name, monkeypatch):
    """SDXL-style conditioning (pooled_output in the cond dict): 2 steps, finite losses; the pooled output
    is in the UNet's ``y`` (SDXL's encode_adm: [pooled(1280), size embeddings(1536)])."""
    model = host.run1("UNETLoader", unet_name=sdxl_unet_name, weight_dtype="default")
    assert type(model.model.model_config).__name__ == "SDXL"
    latents, positive = dataset(1, seed=8, dim=2048, pooled=1280)
    captured = []
    real = pack.train_node.assemble_buckets
    monkeypatch.setattr(pack.train_node, "assemble_buckets", lambda *a, **k: captured.append(real(*a, **k)) or captured[-1])
    out = train(host, model, latents, positive, steps=2, run_name="sdxl")
    assert out.steps == 2 and len(out.losses) == 2 and all(math.isfinite(v) for v in out.losses), out.losses
    assert any(".transformer_blocks." in k for k in out.lora)
    (x0, conds), = captured[0]
    assert conds[0]["context"].shape == (77, 2048) and conds[0]["y"].shape == (2816,)
    assert torch.allclose(conds[0]["y"][:1280], positive[0][0][1]["pooled_output"][0])
    assert torch.allclose(x0, 0.13025 * latents[0]["samples"], atol=1e-6)  # SDXL latent scale (DESIGN §3)
    del model, out
    host.mm.unload_all_models()


# ---------------------------------------------------------------------------------------------
# 12. the host's dataset nodes
# ---------------------------------------------------------------------------------------------
def _pairs_by_image(buckets, images, contexts) -> dict[int, tuple]:
    """{image index: (bucket, row)} for assemble_buckets' output, checking each row's caption is its image's."""
    found = {}
    for b, (lat, conds) in enumerate(buckets):
        for r in range(lat.shape[0]):
            matches = [i for i, img in enumerate(images)
                       if tuple(img.shape) == tuple(lat[r].shape) and torch.allclose(lat[r], img, atol=1e-6)]
            assert len(matches) == 1, f"bucket {b} row {r} matches images {matches}"
            i = matches[0]
            assert torch.allclose(conds[r]["context"], contexts[i], atol=1e-6), f"image {i} got another caption"
            found[i] = (b, r)
    return found


def test_dataset_nodes_interop(host, pack, sd15_full, monkeypatch):
    """Real MakeTrainingDataset (the checkpoint's VAE and CLIP) on images of two sizes → core ResolutionBucket
    → D2FTrain, with caption dropout on the CLIP's empty prompt. Each latent keeps its own caption through
    the bucketing; the unbucketed list gives the same pairs."""
    model, clip, vae = sd15_full
    gen = torch.Generator().manual_seed(9)
    images = [torch.rand(1, 64, 64, 3, generator=gen), torch.rand(1, 48, 80, 3, generator=gen),
              torch.rand(1, 64, 64, 3, generator=gen)]
    texts = ["a red cube", "a blue sphere", "a green cone"]
    latents, conds = host.run("MakeTrainingDataset", images=images, vae=[vae], clip=[clip], texts=texts)
    assert len(latents) == len(conds) == 3
    bucket_latents, bucket_conds = host.run("ResolutionBucket", latents=latents, conditioning=conds)
    assert sorted(l["samples"].shape[0] for l in bucket_latents) == [1, 2]
    empty = host.run1("CLIPTextEncode", clip=clip, text="")

    captured = []
    real = pack.train_node.assemble_buckets

    def spy(*a, **k):
        captured.append(real(*a, **k))
        return captured[-1]

    monkeypatch.setattr(pack.train_node, "assemble_buckets", spy)
    out = train(host, model, bucket_latents, bucket_conds, empty=empty, steps=2, batch_size=2, caption_dropout=0.5,
                run_name="buckets")
    assert out.steps == 2 and all(math.isfinite(v) for v in out.losses)
    flat = train(host, model, latents, conds, steps=1, run_name="unbucketed")
    assert math.isfinite(flat.losses[0])

    x0 = [SD15_SCALE * l["samples"][0] for l in latents]
    contexts = [c[0][0][0] for c in conds]
    assert len({tuple(c.shape) for c in contexts}) == 1 and not torch.allclose(contexts[0], contexts[1])
    bucketed = _pairs_by_image(captured[0], x0, contexts)
    unbucketed = _pairs_by_image(captured[1], x0, contexts)
    assert sorted(bucketed) == sorted(unbucketed) == [0, 1, 2]
    assert sorted(lat.shape[0] for lat, _ in captured[0]) == [1, 2]
