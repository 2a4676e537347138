"""D2FEMA → D2FTrain's ema input, in the real host (issue 12 part 3): the returned and saved LoRAs are the EMA's
closed form over the training trajectory, training itself is unchanged by keeping an EMA (the swaps in and out
for every save restore the training weights exactly), previews and the returned MODEL use the EMA, the state
resumes the EMA exactly, and a NaN restores the EMA with the weights."""

from __future__ import annotations

import json
import os
import re

import pytest

import comfy_host

_LOCATION = comfy_host.find_host()
if not _LOCATION:
    pytest.skip(f"no ComfyUI host: {_LOCATION.how}", allow_module_level=True)

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402

from test_host_train import (NAN_OPTIONS, RESUME_TOL, SAMPLE_TOL, Trained, _clean_host_state, dataset,  # noqa: E402,F401
                             ksample, lora_dir, lora_file, max_tensor_diff, pack, patch, prompt_pair, rel, saved_lora,
                             state_file, train, train_options)

BETA = 0.5  # large steps of the average, so the EMA is far from the training weights after 3 steps
STEPS = 3
COMMON = dict(steps=STEPS, batch_size=2, learning_rate=1e-2, lora_targets="all", save_every=1, seed=3)


def ema_options(host, decay=BETA, warmup=False, dtype="fp32"):
    return host.run1("D2FEMA", decay=decay, warmup=warmup, dtype=dtype)


def train_with_ema(host, model, latents, positive, options, resume_from=None, **overrides) -> Trained:
    """``test_host_train.train`` with D2FEMA's output on D2FTrain's ema input (every input a list)."""
    inputs = {k: [v] for k, v in comfy_host.d2f_train_inputs(host, train_options(host, **overrides)).items()}
    inputs.update(model=[model], latents=list(latents), positive=list(positive), ema=[options])
    if resume_from is not None:
        inputs["resume_from"] = [resume_from]
    return Trained(*host.run("D2FTrain", **inputs))


def factors(lora: dict) -> dict:
    return {k: v for k, v in lora.items() if not k.endswith(".alpha")}


@pytest.fixture(scope="module")
def runs(host, pack, sd15_model, lora_dir):
    """The same 3-step run without and with an EMA (β = 0.5, no warm-up), each saving every step."""
    latents, positive = dataset(3, seed=21)
    plain = train(host, sd15_model, latents, positive, run_name="ema_plain", **COMMON)
    trajectory = [saved_lora(lora_file(host, "ema_plain", s)) for s in range(1, STEPS + 1)]
    previews = []

    def spy(self, step):  # inside the EMA swap: what the preview samples with
        previews.append((step, {k: v.detach().clone() for k, v in self.adapters.named_trainables().items()}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pack.train_node.TrainingRun, "_preview", spy)
        averaged = train_with_ema(host, sd15_model, latents, positive, ema_options(host), run_name="ema_on",
                               preview_every=STEPS, **COMMON)
    return latents, positive, plain, trajectory, averaged, previews


def test_ema_output_is_the_closed_form_and_training_is_unchanged(host, pack, sd15_model, runs, record_measure):
    latents, positive, plain, trajectory, averaged, _ = runs
    # θ_0: the LoRA the run started from (seeded init, up = 0), as D2FTrain builds it
    start = pack.train_node.LoraAdapters(sd15_model.model.diffusion_model, rank=4, alpha=4.0, dtype=torch.float32,
                                         device="cpu", include=None, key_prefix="diffusion_model.", seed=3).export()
    thetas = [start] + trajectory
    expected = {k: BETA ** STEPS * thetas[0][k].double()
                + sum((1 - BETA) * BETA ** (STEPS - j) * thetas[j][k].double() for j in range(1, STEPS + 1))
                for k in factors(start)}
    d = max(float((averaged.lora[k].double() - v).abs().max()) for k, v in expected.items())
    scale = max(float(v.abs().max()) for v in expected.values())
    record_measure("D2FTrain EMA LoRA vs closed form over the plain run's trajectory", d / scale, "≤ 1e-6")
    assert d <= 1e-6 * scale
    # the EMA is not the training weights (teeth), and training with an EMA trains exactly the same weights
    assert max_tensor_diff(factors(averaged.lora), factors(plain.lora)) > 100 * 1e-6 * scale
    assert averaged.losses == plain.losses
    state = pack.state.read_state(state_file(host, "ema_on"))
    assert max_tensor_diff(state.weights, pack.state.read_state(state_file(host, "ema_plain")).weights) == 0.0
    assert state.ema_info["decay"] == BETA and state.ema_info["warmup"] is False
    # every saved LoRA file of the EMA run holds the EMA of its step; the last equals the returned LoRA
    assert max_tensor_diff(saved_lora(lora_file(host, "ema_on", STEPS)), averaged.lora) == 0.0
    with safe_open(lora_file(host, "ema_on", STEPS), framework="pt") as f:
        md = f.metadata()
    assert md["diff2flow.ema_weights"] == "true" and md["modelspec.title"].endswith("EMA")
    assert json.loads(md["diff2flow.ema"]) == {"decay": BETA, "dtype": "fp32", "warmup": False}


def test_full_mode_ema_is_the_closed_form(host, pack, sd15_model, lora_dir):
    """Full fine-tune: the weight differences D2FTrain returns are the EMA's, Δ_ema = Σ_j (1−β)·β^(K−j)·Δ_j
    (Δ_0 = 0: the EMA starts at the base weights), and the state keeps the training masters beside the EMA."""
    latents, positive = dataset(2, seed=23)
    options = dict(COMMON, mode="full", steps=2, learning_rate=1e-3)
    plain = train(host, sd15_model, latents, positive, run_name="ema_full_plain", **options)
    deltas = [saved_lora(lora_file(host, "ema_full_plain", s)) for s in (1, 2)]
    averaged = train_with_ema(host, sd15_model, latents, positive, ema_options(host), run_name="ema_full", **options)
    expected = {k: (1 - BETA) * (BETA * deltas[0][k].double() + deltas[1][k].double()) for k in deltas[1]}
    # The EMA averages the float32 masters θ, not Δ: its round-off is float32's on |θ| (a few ulp), not on |Δ|.
    tol = 8 * 2 ** -24 * max(float(v.abs().max()) for v in sd15_model.model.diffusion_model.state_dict().values())
    d = max(float((averaged.lora[k].double() - v).abs().max()) for k, v in expected.items())
    assert d <= tol, (d, tol)
    assert max_tensor_diff(averaged.lora, plain.lora) > 100 * tol  # teeth: the EMA is not the last weights
    state = pack.state.read_state(state_file(host, "ema_full"))
    plain_state = pack.state.read_state(state_file(host, "ema_full_plain"))
    assert max_tensor_diff(state.weights, plain_state.weights) == 0.0 and set(state.ema) == set(state.weights)


def test_previews_and_the_returned_model_use_the_ema(host, sd15_model, runs, record_measure):
    _, _, plain, _, averaged, previews = runs
    assert [s for s, _ in previews] == [STEPS]
    seen = {f"diffusion_model.{k}": v for k, v in previews[0][1].items()}
    assert max_tensor_diff(seen, factors(averaged.lora)) == 0.0
    conds = prompt_pair()
    ours = ksample(host, averaged.model, conds)
    via_lora = ksample(host, patch(host, host.run1("LoraModelLoader", model=sd15_model, lora=averaged.lora,
                                                   strength_model=1.0, bypass=False)), conds)
    training = ksample(host, plain.model, conds)
    d, gap = rel(ours, via_lora), rel(ours, training)
    record_measure("EMA MODEL vs LoraModelLoader(EMA LoRA)", d, f"≤ {SAMPLE_TOL:g}")
    record_measure("EMA MODEL vs training-weights MODEL (must be large)", gap, f"> {100 * SAMPLE_TOL:g}")
    assert d <= SAMPLE_TOL and gap > 100 * SAMPLE_TOL


def test_resume_continues_the_ema_exactly(host, pack, sd15_model, lora_dir, record_measure):
    latents, positive = dataset(3, seed=22)
    common = dict(batch_size=2, learning_rate=2e-3, lora_targets="all", save_every=2)
    options = ema_options(host, decay=0.9, warmup=True)
    straight = train_with_ema(host, sd15_model, latents, positive, options, steps=4, run_name="ema_straight", **common)
    train_with_ema(host, sd15_model, latents, positive, options, steps=2, run_name="ema_split", **common)
    path = state_file(host, "ema_split")
    second = train_with_ema(host, sd15_model, latents, positive, options, steps=4, run_name="ema_split",
                            resume_from=state_file(host, "ema_split", relative=True), **common)
    d = max_tensor_diff(second.lora, straight.lora)
    record_measure("EMA resumed 2+2 vs straight 4 steps", d, f"≤ {RESUME_TOL:g}")
    assert d <= RESUME_TOL
    # teeth: resuming the same state with the EMA restarted from the resumed weights ends elsewhere
    no_ema = os.path.join(os.path.dirname(path), "no_ema.state.safetensors")
    import safetensors.torch
    header = pack.state.read_metadata(path)
    header.pop("ema")
    safetensors.torch.save_file({k: v for k, v in safetensors.torch.load_file(path).items() if not k.startswith("ema.")},
                                no_ema, metadata=header)
    restarted = train_with_ema(host, sd15_model, latents, positive, options, steps=4, run_name="ema_restarted",
                               resume_from=no_ema, **common)
    assert max_tensor_diff(restarted.lora, straight.lora) > 100 * RESUME_TOL


def test_nan_restores_the_ema_with_the_weights(host, pack, sd15_model, lora_dir):
    """NaN at an absurd learning rate: the LoRA saved under the last good step (the EMA's) equals a clean EMA run
    of that many steps, exactly, and is finite."""
    latents, positive = dataset(2, seed=0)
    options = ema_options(host, decay=0.5)
    with pytest.raises(RuntimeError, match=r"at step (\d+)") as info:
        train_with_ema(host, sd15_model, latents, positive, options, run_name="ema_nan", **NAN_OPTIONS)
    good = int(re.search(r"last good state \(step (\d+)\)", str(info.value)).group(1))
    assert good > 0, str(info.value)
    kept = saved_lora(lora_file(host, "ema_nan", good))
    assert all(torch.isfinite(v).all() for v in kept.values())
    clean = train_with_ema(host, sd15_model, latents, positive, options, run_name="ema_nan_clean",
                        **dict(NAN_OPTIONS, steps=good))
    assert max_tensor_diff(kept, clean.lora) == 0.0
    state = pack.state.read_state(state_file(host, "ema_nan"))
    assert all(torch.isfinite(v).all() for v in state.ema.values())


@pytest.mark.parametrize("decay", [1.0, -0.5])
def test_d2fema_refuses_a_bad_decay(host, decay):
    with pytest.raises(ValueError, match="decay"):
        ema_options(host, decay=decay)
