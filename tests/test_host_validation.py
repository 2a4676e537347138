"""D2FValidation → D2FTrain's validation input in the real host (issue 12 part 2): the held-out series in the
LOSS_MAP at the right steps, grid PNGs named by step in the run's folder, validation seconds reported apart from
samples/s, a split of the training set that really leaves training, straightness for a Reflow run, the time cap,
and the faults guarded against (grid write failing, NaN held-out loss, half-connected held-out inputs)."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import sys

import pytest

import comfy_host

_LOCATION = comfy_host.find_host()
if not _LOCATION:
    pytest.skip(f"no ComfyUI host: {_LOCATION.how}", allow_module_level=True)

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from test_host_train import _clean_host_state, dataset, pack, train_options  # noqa: E402,F401

STEPS = 4
EVERY = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mods(host, pack):
    node = sys.modules[host.node_class("D2FValidation").__module__]
    events = sys.modules[pack.train_node.TrainingReporter.__module__]
    return node, events


@pytest.fixture
def events(mods, monkeypatch):
    """Every ``d2f.train`` message the run sends, as the server would (JSON, no NaN allowed)."""
    sent = []
    monkeypatch.setattr(mods[1], "_send", lambda data: sent.append(json.loads(json.dumps(data, allow_nan=False))))
    return sent


def validation(host, **kw):
    settings = dict(every_n_steps=EVERY, holdout_fraction=0.4, loss_times=2, grid_steps="1,2,4", cfg=3.0, seed=5,
                    images=2, max_seconds=0.0)
    settings.update(kw)
    return host.run1("D2FValidation", **settings)


def run_train(host, model, validation_spec, latents=None, positive=None, empty=None, couplings=None, **overrides):
    opts = dict(steps=STEPS, batch_size=1, run_name="valid_test")
    opts.update(overrides)
    inputs = {k: [v] for k, v in comfy_host.d2f_train_inputs(host, train_options(host, **opts)).items()}
    inputs.update(model=[model], validation=[validation_spec])
    if latents is not None:
        inputs.update(latents=list(latents), positive=list(positive))
    if empty is not None:
        inputs["empty_conditioning"] = [empty]
    if couplings is not None:
        inputs["couplings"] = couplings
    return host.run("D2FTrain", **inputs)


def run_folder(host, run_name):
    states = os.path.join(host.folder_paths.get_output_directory(), "d2f_states")
    names = sorted(n for n in os.listdir(states) if n.startswith(run_name + "_"))
    return os.path.join(states, names[-1])


def test_held_out_series_grid_files_and_seconds(host, sd15_model, events):
    latents, positive = dataset(3, seed=11)
    held_latents, held_positive = dataset(2, seed=12)
    spec = validation(host, latents={"samples": torch.cat([l["samples"] for l in held_latents])},
                      positive=held_positive[0])
    empty = [[torch.zeros(1, 77, 768), {}]]
    _, _, loss, steps = run_train(host, sd15_model, spec, latents, positive, empty=empty, run_name="valid_grid")
    assert steps == STEPS and len(loss["loss"]) == STEPS
    assert loss["validation_steps"] == [2, 4]
    assert len(loss["validation_loss"]) == 2 and all(math.isfinite(v) and v > 0 for v in loss["validation_loss"])
    assert "straightness" not in loss  # not a Reflow run
    assert loss["validation_seconds"] > 0

    folder = run_folder(host, "valid_grid")
    pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    assert pngs == ["validation_000002_steps.png", "validation_000004_steps.png"]
    with Image.open(os.path.join(folder, pngs[0])) as im:
        w, h = im.size
    assert (w % 3, h % 2) == (0, 0) and w // 3 == h // 2  # 3 step counts × 2 images of equal cells

    val = [e for e in events if e["kind"] == "validation"]
    assert [e["step"] for e in val] == [2, 4]
    for e in val:
        assert e["seconds"] > 0 and e["straightness"] is None and e["skipped"] == []
        assert e["grid"]["type"] == "output" and e["grid"]["steps"] == [1, 2, 4] and e["grid"]["images"] == 2
        assert os.path.isfile(os.path.join(host.folder_paths.get_output_directory(), e["grid"]["subfolder"],
                                           e["grid"]["filename"]))
    assert val[-1]["total_seconds"] == pytest.approx(loss["validation_seconds"])
    assert val[0]["loss"] == pytest.approx(loss["validation_loss"][0])
    progress = [e for e in events if e["kind"] == "progress"]
    assert progress and all("samples_per_second" in e for e in progress)


def test_split_takes_the_held_out_items_out_of_training(host, sd15_model, pack, monkeypatch, events):
    latents, positive = dataset(5, seed=13)
    seen = {}

    class Spy(pack.train_node.Trainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen["train"] = torch.cat(self.data.latents).cpu()

    real = pack.train_node.ValidationRun

    class SpyValidation(real):
        def __init__(self, run, plan):
            super().__init__(run, plan)
            seen["held"] = torch.cat([g.latents for g in self.validator.groups]).cpu()
    monkeypatch.setattr(pack.train_node, "Trainer", Spy)
    monkeypatch.setattr(pack.train_node, "ValidationRun", SpyValidation)
    _, _, loss, _ = run_train(host, sd15_model, validation(host, holdout_fraction=0.4, images=0), latents, positive,
                              steps=2, run_name="valid_split")
    assert seen["train"].shape[0] == 3 and seen["held"].shape[0] == 2
    for row in seen["held"]:
        assert not any(torch.equal(row, t) for t in seen["train"]), "a held-out item is still trained on"
    assert loss["validation_steps"] == [2]
    assert not [e for e in events if e["kind"] == "validation"][0]["grid"]  # images=0: no grid


def test_reflow_run_reports_straightness(host, sd15_model, events):
    from test_host_reflow import cond, make_pairs
    c, _ = make_pairs(host, sd15_model, [cond(1), cond(2)], cond(3), "valid_pairs", count=4, steps=2)
    _, _, loss, _ = run_train(host, sd15_model, validation(host, holdout_fraction=0.5, images=2, grid_steps="1,3"),
                              couplings=[c], run_name="valid_reflow")
    assert loss["validation_steps"] == [2, 4]
    assert len(loss["straightness"]) == 2 and all(s is not None and 0 < s < 10 for s in loss["straightness"])
    val = [e for e in events if e["kind"] == "validation"]
    assert [e["straightness"] for e in val] == pytest.approx(loss["straightness"])


def test_time_cap_skips_the_grid_but_keeps_the_loss(host, sd15_model, events):
    latents, positive = dataset(3, seed=14)
    _, _, loss, _ = run_train(host, sd15_model, validation(host, max_seconds=1e-6), latents, positive, steps=2,
                              run_name="valid_cap")
    assert loss["validation_steps"] == [2] and math.isfinite(loss["validation_loss"][0])
    (e,) = [e for e in events if e["kind"] == "validation"]
    assert e["skipped"] == [1, 2, 4] and e["grid"] is None
    assert not [f for f in os.listdir(run_folder(host, "valid_cap")) if f.endswith(".png")]


def test_grid_write_failure_and_nan_loss_do_not_end_training(host, sd15_model, mods, monkeypatch, events, caplog):
    node, _ = mods

    def full_disk(data, path, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(node, "atomic_write_bytes", full_disk)
    real_loss = node.Validator.loss
    monkeypatch.setattr(node.Validator, "loss", lambda self: float("nan") if real_loss(self) else 0.0)
    latents, positive = dataset(3, seed=15)
    with caplog.at_level(logging.WARNING):
        _, _, loss, steps = run_train(host, sd15_model, validation(host), latents, positive, run_name="valid_fault")
    assert steps == STEPS and loss["validation_steps"] == [2, 4]
    assert all(math.isnan(v) for v in loss["validation_loss"])
    val = [e for e in events if e["kind"] == "validation"]
    assert all(e["loss"] is None and e["grid"] is None for e in val)  # JSON-safe (the fixture refuses NaN)
    assert "validation grid of step 2 was not saved" in caplog.text and "No space left" in caplog.text


def test_half_connected_held_out_inputs_are_refused(host):
    latents, _ = dataset(1)
    with pytest.raises(ValueError, match="both held-out latents and their positive"):
        validation(host, latents=latents[0])
    with pytest.raises(ValueError, match="grid_steps"):
        validation(host, grid_steps="1,x")


def test_split_of_a_single_item_is_refused_before_training(host, sd15_model):
    latents, positive = dataset(1)
    with pytest.raises(ValueError, match="at least 2 training items"):
        run_train(host, sd15_model, validation(host), latents, positive, steps=1, run_name="valid_one")


def test_validation_uses_the_ema_weights(host, sd15_model, pack, mods, monkeypatch, events):
    """With D2FEMA on, the validator runs on θ_ema (swapped in), and training goes on with θ afterwards."""
    node, _ = mods
    seen = []
    real_call, real_run = node.ValidationRun.__call__, node.Validator.run

    def call(self, step):
        seen.append({"train": self.run.adapters.state_tensors(), "ema": self.run.ema.state_tensors()})
        real_call(self, step)
        seen[-1]["after"] = self.run.adapters.state_tensors()

    def run(self, step):
        seen[-1]["inside"] = {k: v.detach().clone() for k, v in pack.train_node.TrainingRun._current.adapters
                              .named_trainables().items()}
        return real_run(self, step)

    real_init = pack.train_node.TrainingRun.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        pack.train_node.TrainingRun._current = self
    monkeypatch.setattr(pack.train_node.TrainingRun, "__init__", init)
    monkeypatch.setattr(node.ValidationRun, "__call__", call)
    monkeypatch.setattr(node.Validator, "run", run)
    latents, positive = dataset(3, seed=16)
    inputs = {k: [v] for k, v in comfy_host.d2f_train_inputs(host, train_options(
        host, steps=STEPS, batch_size=2, learning_rate=1e-2, run_name="valid_ema")).items()}
    inputs.update(model=[sd15_model], latents=list(latents), positive=list(positive),
                  validation=[validation(host, images=0)],
                  ema=[host.run1("D2FEMA", decay=0.5, warmup=False, dtype="fp32")])
    host.run("D2FTrain", **inputs)
    assert [len(s) for s in seen] == [4, 4]
    for s in seen:
        for k in s["ema"]:
            assert torch.equal(s["inside"][k], s["ema"][k]), k  # validated on θ_ema
            assert torch.equal(s["after"][k], s["train"][k]), k  # θ back for training
        assert any(not torch.equal(s["ema"][k], s["train"][k]) for k in s["ema"])  # teeth: θ_ema ≠ θ
    monkeypatch.delattr(pack.train_node.TrainingRun, "_current", raising=False)


def test_validation_of_a_sharded_run_is_refused_before_any_worker_starts(host, sd15_model, monkeypatch):
    """Rank 0 validates alone, but every forward of an FSDP-sharded net is a collective of all ranks: a sharded full
    fine-tune with D2FValidation is refused after the pre-flight, before a worker process or the model load."""
    latents, positive = dataset(4)
    local_workers = next(m for n, m in sys.modules.items() if n.endswith(".nodes.local_workers"))
    started = []
    monkeypatch.setattr(local_workers.local_group.LocalGroup, "start", lambda *a, **k: started.append(1))
    with pytest.raises(ValueError, match="D2FValidation does not work with a sharded .FSDP. full fine-tune"):
        run_train(host, sd15_model, validation(host), latents, positive, steps=1, mode="full", gpus="2",
                  sharding="fsdp", training_dtype="fp32", run_name="valid_fsdp")
    assert not started
