"""Self-describing files (d2f_core/storage/metadata.py): the modelspec.* and diff2flow.* keys, written through
atomic_save and save_state and read back with safetensors' own safe_open."""

import datetime
import json

import pytest
import torch
from safetensors import safe_open

from d2f_core.storage.files import atomic_save
from d2f_core.storage.metadata import (RESERVED, TrainingDescription, architecture, check_metadata,
                                       file_metadata)
from d2f_core.storage.state import read_state, save_state

MUST = ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title")
DIFF2FLOW = ("base_prediction", "schedule", "label_offset", "objective", "steps", "dataset_size",
             "resolution_buckets", "seed", "pack_version")


def description(**overrides) -> TrainingDescription:
    fields = dict(family="SD15", prediction="eps",
                  schedule={"beta_schedule": "linear", "timesteps": 1000, "zsnr": False, "flow_sigma_max": 0.935958},
                  label_offset=0.0, objective="diff2flow", mode="lora", total_steps=500, dataset_size=12,
                  buckets=[(512, 512, 8), (512, 768, 4)], seed=7, pack_version="0.1.0", run_name="cat_00003",
                  settings={"rank": 16, "alpha": 16.0, "learning_rate": 1e-4}, ema={"decay": 0.999, "warmup": True,
                                                                                    "dtype": "fp32"})
    fields.update(overrides)
    return TrainingDescription(**fields)


def header(path) -> dict:
    with safe_open(path, framework="pt") as f:
        return f.metadata()


def test_lora_metadata_keys_and_values():
    when = datetime.datetime(2026, 12, 5, 11, 30, 15, 123, tzinfo=datetime.timezone.utc)
    md = file_metadata(description(), "lora", 250, ema_weights=True, date=when)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    for key in MUST:
        assert md[key], key
    assert md["modelspec.sai_model_spec"] == "1.0.0"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.title"] == "cat_00003 step 250 EMA"
    assert md["modelspec.date"] == "2026-12-05T11:30:15+00:00"
    assert md["modelspec.resolution"] == "512x512"  # the bucket with most images
    assert md["modelspec.prediction_type"] == "epsilon"
    assert "D2FFlowPatch" in md["modelspec.usage_hint"] and "label_offset 0" in md["modelspec.usage_hint"]
    for key in DIFF2FLOW:
        assert f"diff2flow.{key}" in md, key
    assert md["diff2flow.steps"] == "250" and md["diff2flow.total_steps"] == "500"
    assert md["diff2flow.base_prediction"] == "eps" and md["diff2flow.objective"] == "diff2flow"
    assert json.loads(md["diff2flow.resolution_buckets"]) == [[512, 512, 8], [512, 768, 4]]
    assert json.loads(md["diff2flow.schedule"])["timesteps"] == 1000
    assert json.loads(md["diff2flow.ema"]) == {"decay": 0.999, "dtype": "fp32", "warmup": True}
    assert md["diff2flow.ema_weights"] == "true" and md["diff2flow.seed"] == "7"
    assert float(md["diff2flow.label_offset"]) == 0.0
    assert json.loads(md["diff2flow.settings"])["learning_rate"] == 1e-4  # floats round-trip exactly


@pytest.mark.parametrize("family, prediction, arch", [
    ("SD15", "eps", "stable-diffusion-v1"), ("SD20", "eps", "stable-diffusion-v2-512"),
    ("SD20", "v_prediction", "stable-diffusion-v2-768-v"), ("SDXL", "v_prediction", "stable-diffusion-xl-v1-base"),
    ("SDXLRefiner", "eps", "stable-diffusion-xl-v1-refiner"), ("PixArtSigma", "eps", "comfyui-pixartsigma")])
def test_architecture_ids(family, prediction, arch):
    assert architecture(family, prediction) == arch


def test_kinds_and_no_ema():
    d = description(ema=None, buckets=[], mode="full")
    full = file_metadata(d, "full", 3)
    state = file_metadata(d, "state", 3)
    assert full["modelspec.architecture"] == "stable-diffusion-v1/lora" and full["diff2flow.mode"] == "full"
    assert "weight differences" in full["modelspec.description"]
    assert state["modelspec.architecture"] == "stable-diffusion-v1/diff2flow-training-state"
    assert "resume_from" in state["modelspec.usage_hint"]
    assert full["diff2flow.ema"] == "off" and full["diff2flow.ema_weights"] == "false"
    assert "modelspec.resolution" not in full  # no bucket, no claim
    with pytest.raises(ValueError, match="kind"):
        file_metadata(d, "checkpoint", 3)


def test_non_string_metadata_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="'diff2flow.steps'"):
        check_metadata({"diff2flow.steps": 5})
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match="'k' has a NoneType"):
        atomic_save({"a": torch.zeros(1)}, str(path), {"k": None})
    assert not path.exists() and not list(tmp_path.iterdir())  # no file, no temp file
    with pytest.raises(ValueError, match="not finite"):
        file_metadata(description(label_offset=float("nan")), "lora", 1)


def test_written_lora_carries_the_keys(tmp_path):
    md = file_metadata(description(), "lora", 10)
    path = atomic_save({"diffusion_model.a.lora_up.weight": torch.zeros(2, 1)}, str(tmp_path / "l.safetensors"), md)
    assert header(path) == md


def test_state_carries_the_keys_and_its_own_fields(tmp_path):
    md = file_metadata(description(), "state", 4)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w])
    w.grad = torch.ones(3)
    opt.step()
    path = save_state(str(tmp_path / "state.safetensors"), {"w": w.detach()}, opt, 4, {"mode": "lora"},
                      ema={"w": torch.full((3,), 0.5)}, ema_info={"decay": 0.9, "start_step": 0}, metadata=md)
    got = header(path)
    for k, v in md.items():
        assert got[k] == v, k
    assert got["step"] == "4" and json.loads(got["meta"]) == {"mode": "lora"}
    state = read_state(path)
    assert state.step == 4 and state.ema_info == {"decay": 0.9, "start_step": 0}
    assert torch.equal(state.ema["w"], torch.full((3,), 0.5)) and torch.equal(state.weights["w"], w.detach())


@pytest.mark.parametrize("key", sorted(RESERVED))
def test_metadata_may_not_overwrite_a_state_field(tmp_path, key):
    with pytest.raises(ValueError, match="reserved"):
        save_state(str(tmp_path / "s.safetensors"), {"w": torch.ones(1)}, None, 1, metadata={key: "x"})
    assert not (tmp_path / "s.safetensors").exists()
