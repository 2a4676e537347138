"""D2FTrain's files describe themselves (issue 12 part 4), in the real host: the LoRA (and full-mode weight
differences) and the resumable state carry ``modelspec.*`` and ``diff2flow.*`` metadata, read back with
safetensors' ``safe_open``; a LoRA with that metadata still loads with the core ``LoraLoader`` (which hands the
metadata on as the model's ``lora_metadata`` attachment) and samples as D2FTrain's own MODEL does."""

from __future__ import annotations

import json
import logging
import os

import pytest

import comfy_host

_LOCATION = comfy_host.find_host()
if not _LOCATION:
    pytest.skip(f"no ComfyUI host: {_LOCATION.how}", allow_module_level=True)

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402

from test_host_train import (SAMPLE_TOL, _clean_host_state, dataset, lora_dir, lora_file, pack, patch,  # noqa: E402,F401
                             prompt_pair, ksample, rel, state_file, train)

MUST = ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title")


def header(path) -> dict:
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


@pytest.fixture(scope="module")
def described_run(host, pack, sd15_model, lora_dir):
    latents, positive = dataset(3, seed=11)
    out = train(host, sd15_model, latents, positive, steps=3, batch_size=2, learning_rate=1e-2, lora_targets="all",
                seed=5, run_name="described")
    return out


def test_lora_and_state_carry_the_metadata(host, sd15_model, described_run):
    lora_md = header(lora_file(host, "described", 3))
    state_md = header(state_file(host, "described"))
    for md in (lora_md, state_md):
        for key in MUST:
            assert md.get(key), key
        assert md["modelspec.sai_model_spec"] == "1.0.0"
        assert md["modelspec.prediction_type"] == "epsilon"  # the tiny UNet is detected as ε SD1.5
        assert md["modelspec.resolution"] == "64x64"  # 8×8 latents × the SD latent format's 8
        assert md["diff2flow.base_prediction"] == "eps" and md["diff2flow.base_family"] == "SD15"
        assert md["diff2flow.objective"] == "diff2flow" and md["diff2flow.label_offset"] == "0.0"
        assert md["diff2flow.steps"] == "3" and md["diff2flow.total_steps"] == "3"
        assert md["diff2flow.dataset_size"] == "3" and md["diff2flow.seed"] == "5"
        assert json.loads(md["diff2flow.resolution_buckets"]) == [[64, 64, 3]]
        assert md["diff2flow.pack_version"] and md["diff2flow.ema"] == "off"
        schedule = json.loads(md["diff2flow.schedule"])
        assert schedule["timesteps"] == 1000 and schedule["zsnr"] is False
        assert schedule["flow_sigma_max"] == pytest.approx(0.935958, abs=1e-6)  # DESIGN §2's SD1.5 σ_max
        settings = json.loads(md["diff2flow.settings"])
        assert settings["rank"] == 4 and settings["alpha"] == 4.0 and settings["lora_targets"] == "all"
        assert md["modelspec.title"].startswith("described_") and md["modelspec.title"].endswith(" step 3")
    assert lora_md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert state_md["modelspec.architecture"] == "stable-diffusion-v1/diff2flow-training-state"
    assert state_md["step"] == "3" and "mode" in json.loads(state_md["meta"])  # the state's own fields intact


def test_core_lora_loader_reads_a_lora_with_metadata(host, sd15_model, described_run, lora_dir, caplog):
    path = lora_file(host, "described", 3)
    with caplog.at_level(logging.WARNING):
        loaded, _ = host.run("LoraLoader", model=sd15_model, clip=None, lora_name=os.path.basename(path),
                             strength_model=1.0, strength_clip=1.0)
    not_loaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage()]
    assert not not_loaded, f"the core loader ignored keys of our LoRA: {not_loaded[:3]}"
    n_pairs = sum(1 for k in described_run.lora if k.endswith(".lora_up.weight"))
    assert len(loaded.patches) == n_pairs > 0
    assert loaded.get_attachment("lora_metadata") == header(path)  # the host hands our metadata on
    conds = prompt_pair()
    ours = ksample(host, described_run.model, conds)
    via_loader = ksample(host, patch(host, loaded), conds)
    untrained = ksample(host, patch(host, sd15_model), conds)
    assert rel(ours, untrained) > 100 * SAMPLE_TOL  # training changed the samples: the comparison has teeth
    assert rel(via_loader, ours) <= SAMPLE_TOL


def test_full_mode_files_say_so(host, sd15_model, lora_dir):
    latents, positive = dataset(2, seed=12)
    train(host, sd15_model, latents, positive, mode="full", steps=1, learning_rate=1e-5, run_name="described_full")
    md = header(lora_file(host, "described_full", 1))
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["diff2flow.mode"] == "full"
    assert "weight differences" in md["modelspec.description"]
    assert "rank" not in json.loads(md["diff2flow.settings"])  # LoRA settings mean nothing in full mode
