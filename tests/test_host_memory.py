"""D2FTrain's memory pre-flight inside the real ComfyUI host (v0.33), through the real node class.

The host runs on the CPU, where the pack knows no memory limit (``memory_check.available_memory`` → None: the
estimate is only logged). Where a test needs a GPU-like limit it replaces that one function of the pack with a
fake free-memory reading; nothing of ComfyUI is mocked. Checked: a run that cannot fit is refused before the
private copy of the model is loaded (and before any file is reserved), with the estimate and the settings that
would fit, one of which then trains; ``gradient_checkpointing = auto`` turns checkpointing on exactly when only
that fits; the host is asked to keep the whole run's memory free when it loads the copy; saved workflows'
booleans still validate and train.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import pytest

import comfy_host

_LOCATION = comfy_host.find_host()
if not _LOCATION:
    pytest.skip(f"no ComfyUI host: {_LOCATION.how}", allow_module_level=True)

torch = pytest.importorskip("torch")

OPTIONS = dict(mode="lora", steps=1, batch_size=1, grad_accumulation=1, learning_rate=1e-3, rank=4, alpha=0.0,
               lora_targets="attention", training_dtype="fp32", cuda_graphs=False, seed=0, save_every=0,
               preview_every=0, run_name="memory")


@pytest.fixture(scope="module")
def pack(host):
    comfy_host.load_core_extras(host, "nodes_train.py")
    train_node = sys.modules[host.node_class("D2FTrain").__module__]
    return train_node


@pytest.fixture(autouse=True)
def _clean_host_state(host):
    yield
    host.mm.interrupt_current_processing(False)
    host.mm.unload_all_models()


def options(host, **overrides) -> dict:
    schema = host.node_class("D2FTrain").GET_SCHEMA()
    opts = {i.id: i.default for i in schema.inputs if not i.optional and getattr(i, "default", None) is not None}
    opts.update(OPTIONS)
    opts.update(overrides)
    return opts


def dataset(n: int = 4, size=(8, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = [{"samples": 4.0 * torch.randn((1, 4) + tuple(size), generator=gen)} for _ in range(n)]
    positive = [[[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(n)]
    return latents, positive


def train(host, model, data, **overrides):
    """D2FTrain as the executor runs an is_input_list node: every input a list."""
    latents, positive = data
    inputs = {k: [v] for k, v in comfy_host.d2f_train_inputs(host, options(host, **overrides)).items()}
    inputs.update(model=[model], latents=list(latents), positive=list(positive))
    return host.run("D2FTrain", **inputs)


def estimates(host, pack, model, data, **overrides):
    """The node's own pre-flight for these inputs with no memory limit: (without, with checkpointing)."""
    opts = options(host, **overrides)
    buckets = pack.assemble_buckets(model, *data)
    result = pack.memory_check.plan(model, buckets, opts, pack.DTYPES[opts["training_dtype"]], pack.CHECKPOINT_BLOCKS)
    return result.without, result.with_


@pytest.fixture
def spies(host, pack, monkeypatch):
    """Records every load_models_gpu call (with its memory_required), every TrainingRun made and the blocks each
    training run checkpoints."""
    seen = {"loads": [], "runs": 0, "checkpointed": []}
    real_load, real_run, real_ckpt = host.mm.load_models_gpu, pack.TrainingRun.__init__, pack.checkpointed

    def load(models, *a, **k):
        seen["loads"].append(k.get("memory_required", 0))
        return real_load(models, *a, **k)

    def run_init(self, *a, **k):
        seen["runs"] += 1
        return real_run(self, *a, **k)

    def ckpt(blocks):
        blocks = list(blocks)
        seen["checkpointed"].append(len(blocks))
        return real_ckpt(blocks)
    monkeypatch.setattr(host.mm, "load_models_gpu", load)
    monkeypatch.setattr(pack.TrainingRun, "__init__", run_init)
    monkeypatch.setattr(pack, "checkpointed", ckpt)
    return seen


def fake_free_memory(monkeypatch, pack, available: int):
    """A GPU-like limit for this CPU host: the pack's reading of the device's free memory, replaced."""
    monkeypatch.setattr(pack.memory_check, "available_memory", lambda device: int(available))


def state_dirs(host) -> set:
    states = os.path.join(host.folder_paths.get_output_directory(), "d2f_states")
    return set(os.listdir(states)) if os.path.isdir(states) else set()


# ---------------------------------------------------------------------------------------------------------------
def test_cpu_only_logs_the_estimate(host, pack, sd15_model, spies, caplog):
    assert pack.memory_check.available_memory(torch.device("cpu")) is None
    caplog.set_level(logging.INFO)
    train(host, sd15_model, dataset(2), gradient_checkpointing="auto", batch_size=2)
    assert any("memory estimate" in r.getMessage() and "no device limit known" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records][-5:]
    assert spies["checkpointed"] == [0], "auto on a device without a limit trains without checkpointing"


def test_refused_before_the_private_copy_loads(host, pack, sd15_model, spies, monkeypatch):
    data = dataset(4)
    _, on4 = estimates(host, pack, sd15_model, data, batch_size=4)
    _, on1 = estimates(host, pack, sd15_model, data, batch_size=1)
    available = (on1.total + on4.total) // 2   # batch 4 does not fit even with checkpointing, batch 1 does
    fake_free_memory(monkeypatch, pack, available)
    before = state_dirs(host)
    with pytest.raises(RuntimeError) as info:
        train(host, sd15_model, data, batch_size=4, gradient_checkpointing="auto", run_name="too_big")
    message = str(info.value)
    assert type(info.value).__name__ == "MemoryPreflightError"
    assert spies["loads"] == [] and spies["runs"] == 0, "the model was loaded (or a run started) before the refusal"
    assert state_dirs(host) == before
    assert f"{on4.total / 2 ** 30:.1f} GiB" in message and "gradient checkpointing on" in message
    assert "stopped before loading the model" in message
    b = int(message.split("batch_size ")[1].split(" ")[0])
    assert 1 <= b < 4
    # the suggestion is a run that fits: it trains under the same limit
    train(host, sd15_model, data, batch_size=b, gradient_checkpointing="auto", run_name="fits")
    assert spies["runs"] == 1 and spies["checkpointed"] and spies["checkpointed"][-1] > 0


def test_auto_turns_checkpointing_on_only_when_needed(host, pack, sd15_model, spies, monkeypatch):
    data = dataset(4)
    off, on = estimates(host, pack, sd15_model, data, batch_size=4)
    assert on.total < off.total
    fake_free_memory(monkeypatch, pack, on.total + 1)          # only checkpointing fits
    train(host, sd15_model, data, batch_size=4, gradient_checkpointing="auto")
    fake_free_memory(monkeypatch, pack, 100 * off.total)      # plenty
    train(host, sd15_model, data, batch_size=4, gradient_checkpointing="auto")
    assert spies["checkpointed"][0] > 0 and spies["checkpointed"][1] == 0
    # the host was asked to keep the run's memory free beyond the loaded weights
    assert spies["loads"][0] == on.total - on.stored_bytes and spies["loads"][1] == off.total - off.stored_bytes


def test_explicit_off_that_cannot_fit_is_refused_naming_auto(host, pack, sd15_model, spies, monkeypatch):
    data = dataset(4)
    off, on = estimates(host, pack, sd15_model, data, batch_size=4)
    fake_free_memory(monkeypatch, pack, on.total + 1)
    with pytest.raises(RuntimeError, match="gradient_checkpointing auto or on"):
        train(host, sd15_model, data, batch_size=4, gradient_checkpointing="off")
    assert spies["loads"] == []
    train(host, sd15_model, data, batch_size=4, gradient_checkpointing="on")  # explicit on: kept, fits
    assert len(spies["checkpointed"]) == 1 and spies["checkpointed"][0] > 0


@pytest.mark.parametrize("legacy,blocks", [(True, "some"), (False, "none")])
def test_saved_workflows_booleans_still_train(host, sd15_model, spies, legacy, blocks):
    train(host, sd15_model, dataset(1), gradient_checkpointing=legacy)
    assert (spies["checkpointed"][-1] > 0) == (blocks == "some")


def test_the_executor_validates_choices_and_legacy_booleans(host, sd15_unet_name):
    import execution
    schema = host.node_class("D2FTrain").GET_SCHEMA()
    widgets = {i.id: i.default for i in schema.inputs if not i.optional and getattr(i, "default", None) is not None}

    def validate(**changes):
        prompt = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": sd15_unet_name, "weight_dtype": "default"}},
                  "2": {"class_type": "D2FTrain", "inputs": dict(widgets, model=["1", 0], **changes)}}
        ok, errors, _ = asyncio.run(execution.validate_inputs("memory-test", prompt, "2", {}))
        return ok, errors

    assert widgets["gradient_checkpointing"] == "auto"
    for value in ("auto", "on", "off", True, False):
        ok, errors = validate(gradient_checkpointing=value)
        assert ok, (value, errors)
    ok, errors = validate(gradient_checkpointing="sometimes")
    assert not ok and any("gradient_checkpointing must be one of auto, on, off" in str(e) for e in errors), errors
    ok, errors = validate(mode="sideways")  # the other combos keep the executor's own check
    assert not ok and any(e["type"] == "value_not_in_list" for e in errors), errors


def test_graph_terms_follow_the_nodes_own_rule(host, pack, sd15_model, monkeypatch):
    """On a CUDA device the estimate counts CUDA-graph buffers exactly where D2FTrain replays graphs
    (``fast_paths``: LoRA, checkpointing off, not compiled, one process)."""
    fake_free_memory(monkeypatch, pack, 10 ** 12)
    data = dataset(2)
    buckets = pack.assemble_buckets(sd15_model, *data)

    def graph_gradients(**overrides):
        opts = options(host, **overrides)
        result = pack.memory_check.plan(sd15_model, buckets, opts, torch.float32, pack.CHECKPOINT_BLOCKS,
                                        device=torch.device("cuda"))
        P = result.without.terms["trained"] // 4
        return [e.terms["gradients"] // (4 * P) - 1 for e in (result.without, result.with_)]
    assert graph_gradients(mode="lora", cuda_graphs=True) == [1, 0]      # one bucket captured; none with ckpt
    assert graph_gradients(mode="lora", cuda_graphs=False) == [0, 0]
    assert graph_gradients(mode="full", cuda_graphs=True) == [0, 0]
    assert graph_gradients(mode="lora", cuda_graphs=True, compile=True) == [0, 0]
    opts = options(host, mode="lora", cuda_graphs=True)
    ddp = pack.memory_check.plan(sd15_model, buckets, opts, torch.float32, pack.CHECKPOINT_BLOCKS, world_size=2,
                                 device=torch.device("cuda"))
    P = ddp.without.terms["trained"] // 4
    assert ddp.without.terms["gradients"] == 2 * 4 * P  # persistent gradients + DDP's buckets, no graph


def test_sharding_auto_shards_a_full_fine_tune_only_where_the_replicated_one_does_not_fit(host, pack, sd15_model,
                                                                                          monkeypatch):
    """``sharding`` auto: FSDP exactly when the replicated full fine-tune on N processes would be refused and the
    sharded one fits (its masters, gradients and moments /N; only two blocks' weights whole); ddp otherwise, and
    always for LoRA or one process. fsdp asked for LoRA is refused; on one process it is the plain path."""
    buckets = pack.assemble_buckets(sd15_model, *dataset(2))
    cuda = torch.device("cuda")

    def plan(free, world=2, **overrides):
        fake_free_memory(monkeypatch, pack, free)
        opts = options(host, **overrides)
        return pack.memory_check.plan(sd15_model, buckets, opts, torch.float32, pack.CHECKPOINT_BLOCKS,
                                      world_size=world, device=cuda)
    roomy = plan(10 ** 12, mode="full", cuda_graphs=False, gradient_checkpointing="on")
    assert roomy.sharding == "ddp" and roomy.refusal is None
    replicated, sharded = roomy.estimate, plan(10 ** 12, mode="full", cuda_graphs=False, gradient_checkpointing="on",
                                              sharding="fsdp").estimate
    P = replicated.terms["trained"] // 4
    assert sharded.terms["trained"] == 4 * P // 2 and sharded.terms["optimizer"] == 8 * P // 2
    assert sharded.terms["gradients"] == 4 * P // 2  # no DDP buckets, no accumulation
    assert sharded.total < replicated.total
    # between the two: replicated refused, sharded fits → auto shards
    free = int((replicated.total + sharded.total) / 2)
    tight = plan(free, mode="full", cuda_graphs=False, gradient_checkpointing="on")
    assert tight.sharding == "fsdp" and tight.refusal is None, tight.summary()
    assert plan(free, mode="full", cuda_graphs=False, gradient_checkpointing="on", sharding="ddp").refusal
    assert plan(free, mode="full", cuda_graphs=False, gradient_checkpointing="on", world=1).sharding == "ddp"
    assert plan(free, mode="full", cuda_graphs=False, gradient_checkpointing="on", sharding="fsdp",
                world=1).sharding == "ddp"
    # accumulation keeps whole float32 gradients until the last micro-batch
    acc = plan(10 ** 12, mode="full", cuda_graphs=False, gradient_checkpointing="on", sharding="fsdp",
               grad_accumulation=2).estimate
    assert acc.terms["gradients"] == 4 * P // 2 + 4 * P
    with pytest.raises(ValueError, match="sharding fsdp shards a full fine-tune"):
        plan(10 ** 12, mode="lora", sharding="fsdp")
