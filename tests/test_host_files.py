"""What the pack writes, under real faults, in the real ComfyUI host (v0.33): nothing lost, nothing silently wrong.

Each test injects its fault for real and fails if the guard it covers is removed:

* bad ``run_name`` / ``resume_from`` → refused before any model load, nothing written;
* SIGKILL in the middle of a save (a child process blocked inside the real writer) → the previous files load
  intact, no final file for the cut-off save, the leftover temp file is ignored by loaders and counters;
* disk full inside the write (ENOSPC from the real writer) → an error naming the disk space and the path,
  previous files intact, no temp file left;
* truncated state / LoRA / couplings files → errors naming the file (state: before any model load);
* the same ``run_name`` twice → both runs' files kept (counters 00001, 00002);
* ``save_every=0`` → the final LoRA and state are on disk, and resuming from them works;
* the stop button pressed during a save → LoRA and state complete, loadable and of the same step;
* out of memory mid-run → the last read-out step's weights saved (LoRA and state), the message says where;
* resuming with another rank / alpha / mode / targets / model → refused before any model load, naming both values.

File layout (nodes/run_files.py): output/loras/<run_name>_<NNNNN>_<step:06d>_steps.safetensors and
output/d2f_states/<run_name>_<NNNNN>/state.safetensors.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import comfy_host
from test_host_train import (_clean_host_state, dataset, lora_dir, lora_file, max_tensor_diff, pack,  # noqa: F401
                             run_counters, saved_lora, state_file, train)

torch = pytest.importorskip("torch")


def output(host, *parts) -> str:
    return os.path.join(host.folder_paths.get_output_directory(), *parts)


def tree(folder) -> set[str]:
    """Every file and folder under ``folder``, relative."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, n), folder))
    return found


def temp_files(folder, run_name) -> list[str]:
    """Temp files of run ``run_name`` under ``folder`` (the SIGKILL tests leave theirs on purpose)."""
    return sorted(n for n in tree(folder) if n.endswith(".d2f-tmp") and run_name in n)


@pytest.fixture
def files_mod(host, pack):
    """The pack's d2f_core.storage.files as the host loaded it (its ``save_file`` is the writer faults go into)."""
    return sys.modules[pack.train_node.plain_name.__module__]


@pytest.fixture
def no_model_load(host, pack, monkeypatch):
    """Fails the test if D2FTrain gets as far as its training run or loads any model; returns the loads seen."""
    loads = []
    real_load = host.mm.load_models_gpu
    monkeypatch.setattr(host.mm, "load_models_gpu", lambda *a, **k: (loads.append(a), real_load(*a, **k))[1])

    class Reached:
        def __init__(self, *a, **k):
            raise AssertionError("D2FTrain started a training run (private model copy) on inputs it must refuse")
    monkeypatch.setattr(pack.train_node, "TrainingRun", Reached)
    return loads


def state_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------
# names and paths
# ---------------------------------------------------------------------------------------------
BAD_RUN_NAMES = {"absolute": "{tmp}/escaped", "parent": "../x", "subfolder": "a/b", "empty": "", "blank": "   ",
                 "dotdot": "..", "dot": "."}


@pytest.mark.parametrize("case", list(BAD_RUN_NAMES))
def test_bad_run_name_is_refused_before_any_work(host, sd15_model, no_model_load, tmp_path, case):
    name = BAD_RUN_NAMES[case].format(tmp=tmp_path)
    before, outside = tree(output(host)), tree(tmp_path)
    latents, positive = dataset(1, seed=0)
    with pytest.raises(ValueError, match="run_name") as info:
        train(host, sd15_model, latents, positive, run_name=name)
    assert "letters, digits" in str(info.value) or "empty" in str(info.value), str(info.value)
    assert no_model_load == []
    assert tree(output(host)) == before and tree(tmp_path) == outside, "a refused run wrote something"


@pytest.mark.parametrize("name", ["../escape", "{tmp}/abs", "a/../../b", "", "a b"])
def test_reflow_pairs_name_is_checked_before_sampling(host, sd15_model, monkeypatch, tmp_path, name):
    """D2FReflowPairs uses the same naming rule (sub-folders allowed): refused before any sampling, nothing written."""
    reflow = sys.modules[host.node_class("D2FReflowPairs").__module__]

    class Reached:
        def __init__(self, *a, **k):
            raise AssertionError("D2FReflowPairs started sampling under a name it must refuse")
    monkeypatch.setattr(sys.modules[reflow.make_pairs.__module__], "PairSampler", Reached)
    name = name.format(tmp=tmp_path)
    before, outside = tree(output(host)), tree(tmp_path)
    g = torch.Generator().manual_seed(0)
    prompt, negative = [[torch.randn(1, 77, 768, generator=g), {}]], [[torch.randn(1, 77, 768, generator=g), {}]]
    with pytest.raises(ValueError, match="name .* (is not allowed|is empty)"):
        host.run("D2FReflowPairs", model=[sd15_model], positive=[prompt], negative=[negative], count=[1], width=[64],
                 height=[64], steps=[2], cfg=[1.0], seed=[0], batch_size=[1], shift=[1.0], name=[name])
    assert tree(output(host)) == before and tree(tmp_path) == outside


def test_resume_from_outside_output_is_refused(host, pack, sd15_model, no_model_load, tmp_path):
    # a real, valid state outside output/ (and a symlink to it inside): both must be refused
    outside = str(tmp_path / "state.safetensors")
    pack.state.save_state(outside, {"x": torch.zeros(1)}, None, 1, {"mode": "lora"})
    link = output(host, "d2f_states", "link_outside.safetensors")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(outside, link)
    latents, positive = dataset(1, seed=0)
    try:
        for value in (outside, os.path.relpath(outside, output(host)), "d2f_states/link_outside.safetensors"):
            with pytest.raises(ValueError, match="resume_from .* is outside"):
                train(host, sd15_model, latents, positive, run_name="outside", resume_from=value)
    finally:
        os.remove(link)
    assert no_model_load == []


# ---------------------------------------------------------------------------------------------
# SIGKILL mid-save (child process)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("cut", ["lora", "state"])
def test_sigkill_during_a_save(host, pack, sd15_model, sd15_unet_name, lora_dir, cut):
    """A child boots the host on this session's work dir, trains with save_every=1 and is SIGKILLed while the
    real writer has half of step 2's LoRA (``lora``) or state (``state``) in its temp file."""
    run_name = f"killed_{cut}"
    marker = output(host, f"marker_{cut}")
    child = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "kill_during_save.py"), host.path, host.work_dir,
         sd15_unet_name, run_name, "3" if cut == "lora" else "4", marker],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=comfy_host.PACK_DIR)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(marker):
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                pytest.fail("the child never blocked in its save:\n" + child.communicate()[0].decode()[-3000:])
            time.sleep(0.2)
        cut_temp = open(marker).read()
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    os.remove(marker)

    assert os.path.exists(cut_temp) and 0 < os.path.getsize(cut_temp), "the kill did not land mid-write"
    state = state_file(host, run_name, counter=1)
    weights, step, _ = pack.state.load_state(state)  # reads every tensor: intact
    assert step == 1 and weights and all(torch.isfinite(v).all() for v in weights.values())
    step1 = saved_lora(lora_file(host, run_name, 1, counter=1))
    assert step1 and all(torch.isfinite(v).all() for v in step1.values())
    lora2 = lora_file(host, run_name, 2, counter=1)
    if cut == "lora":
        assert not os.path.exists(lora2), "a cut-off write left a file under its final name"
    else:  # step 2's LoRA was complete before its state write was cut off
        assert max_tensor_diff(saved_lora(lora2), step1) > 0

    # the leftover temp file is inert: loaders don't list it, counters skip it, resuming works
    assert not [n for n in host.folder_paths.get_filename_list("loras") if n.endswith(".d2f-tmp")]
    before = state_bytes(state)
    latents, positive = dataset(2, seed=11)
    out = train(host, sd15_model, latents, positive, steps=2, run_name=run_name,
                resume_from=state_file(host, run_name, counter=1, relative=True))
    assert out.steps == 2 and len(out.losses) == 1
    assert run_counters(host, run_name) == [1, 2]
    assert max_tensor_diff(saved_lora(lora_file(host, run_name, 2, counter=2)), out.lora) == 0.0
    assert state_bytes(state) == before, "resuming changed the state it resumed from"


# ---------------------------------------------------------------------------------------------
# disk full
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", ["lora", "state"])
def test_disk_full_during_a_save(host, pack, sd15_model, files_mod, monkeypatch, cut):
    """ENOSPC from the real writer, half-way through step 2's LoRA (write 3) or state (write 4)."""
    run_name = f"disk_full_{cut}"
    real, calls = files_mod.save_file, []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == (3 if cut == "lora" else 4):
            real(tensors, path, metadata=metadata)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(files_mod, "save_file", full_disk)
    latents, positive = dataset(2, seed=3)
    with pytest.raises(RuntimeError, match="could not save step 2: .*not enough disk space") as info:
        train(host, sd15_model, latents, positive, steps=4, save_every=1, run_name=run_name)
    monkeypatch.undo()
    message = str(info.value)
    failed = calls[-1].rsplit(".", 2)[0]  # the temp's final name: .<name>.<hex>.d2f-tmp
    failed = os.path.join(os.path.dirname(failed), os.path.basename(failed)[1:])
    assert failed in message, message
    # it says what is kept
    assert f"the LoRA of step {2 if cut == 'state' else 1} in {lora_file(host, run_name, 2 if cut == 'state' else 1)}" in message
    assert f"the resumable state of step 1 in {state_file(host, run_name)}" in message, message
    assert temp_files(output(host), run_name) == [], "a temp file was left behind"
    _, step, _ = pack.state.load_state(state_file(host, run_name))
    assert step == 1, "the previous state was lost"
    assert saved_lora(lora_file(host, run_name, 1))
    assert os.path.exists(lora_file(host, run_name, 2)) == (cut == "state")


# ---------------------------------------------------------------------------------------------
# damaged files
# ---------------------------------------------------------------------------------------------
def _truncate(src, dst):
    with open(src, "rb") as f:
        data = f.read()
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "wb") as f:
        f.write(data[: len(data) // 2])
    return dst


@pytest.fixture(scope="module")
def base_run(host, pack, sd15_model):
    """One saved 1-step LoRA run (rank 4, alpha 4, attention): its state and LoRA file."""
    latents, positive = dataset(2, seed=5)
    out = train(host, sd15_model, latents, positive, steps=1, run_name="base")
    host.mm.unload_all_models()
    return out, state_file(host, "base"), lora_file(host, "base", 1)


def test_damaged_state_and_lora_are_named_before_any_work(host, sd15_model, base_run, no_model_load):
    _, state, lora = base_run
    latents, positive = dataset(1, seed=0)
    cut_state = _truncate(state, output(host, "d2f_states", "damaged", "state.safetensors"))
    cut_lora = _truncate(lora, output(host, "damaged_lora.safetensors"))
    for path, what in ((cut_state, "training state"), (cut_lora, "training state")):
        with pytest.raises(ValueError, match=re.escape(f"{what} '{path}' is damaged or incomplete")):
            train(host, sd15_model, latents, positive, run_name="damaged", resume_from=path)
    with pytest.raises(ValueError, match="not a Diff2Flow training state .* not a LoRA file"):
        train(host, sd15_model, latents, positive, run_name="damaged", resume_from=lora)
    assert no_model_load == []


def test_damaged_couplings_are_named(host, pack):
    reflow = sys.modules[host.node_class("D2FReflowPairs").__module__]
    couplings = sys.modules[reflow.load_couplings.__module__]
    folder = reflow.couplings_folder("damaged_pairs")
    writer = couplings.CouplingsWriter(folder, {"model": "m"}, {"context": torch.zeros(1, 77, 768)})
    for _ in range(2):
        writer.append(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.zeros(2, dtype=torch.int64))
    _, n = host.run("D2FLoadReflowPairs", name="damaged_pairs")
    assert n == 4
    for name in (couplings.chunk_name(2, 4), couplings.PROMPTS_FILE):
        path = os.path.join(folder, name)
        good = state_bytes(path)
        _truncate(path, path)
        try:
            with pytest.raises(ValueError, match=re.escape(f"couplings file '{path}' is damaged or incomplete")):
                host.run("D2FLoadReflowPairs", name="damaged_pairs")
        finally:
            with open(path, "wb") as f:
                f.write(good)


# ---------------------------------------------------------------------------------------------
# runs never replace each other; every run ends saved
# ---------------------------------------------------------------------------------------------
def test_same_run_name_twice_keeps_both_runs(host, pack, sd15_model):
    latents, positive = dataset(2, seed=6)
    first = train(host, sd15_model, latents, positive, steps=2, seed=1, run_name="twice")
    second = train(host, sd15_model, latents, positive, steps=2, seed=2, run_name="twice")
    assert run_counters(host, "twice") == [1, 2]
    a, b = saved_lora(lora_file(host, "twice", 2, counter=1)), saved_lora(lora_file(host, "twice", 2, counter=2))
    assert max_tensor_diff(a, first.lora) == 0.0 and max_tensor_diff(b, second.lora) == 0.0
    assert max_tensor_diff(a, b) > 0, "the two runs (other seeds) should differ"
    metas = [pack.state.read_state_meta(state_file(host, "twice", counter=c)) for c in (1, 2)]
    assert [m[0] for m in metas] == [2, 2] and [m[1]["run_name"] for m in metas] == ["twice_00001", "twice_00002"]


def test_save_every_zero_saves_at_the_end_and_resumes(host, pack, sd15_model):
    latents, positive = dataset(2, seed=7)
    out = train(host, sd15_model, latents, positive, steps=2, save_every=0, run_name="at_end")
    state = state_file(host, "at_end")
    assert max_tensor_diff(saved_lora(lora_file(host, "at_end", 2)), out.lora) == 0.0
    assert pack.state.read_state_meta(state)[0] == 2
    before = state_bytes(state)
    on = train(host, sd15_model, latents, positive, steps=3, save_every=0, run_name="at_end",
               resume_from=state_file(host, "at_end", relative=True))
    assert on.steps == 3 and len(on.losses) == 1
    assert pack.state.read_state_meta(state_file(host, "at_end"))[1]["resumed_from"] == os.path.realpath(state)
    assert max_tensor_diff(saved_lora(lora_file(host, "at_end", 3)), on.lora) == 0.0
    assert state_bytes(state) == before


def test_stop_pressed_during_the_first_save(host, pack, sd15_model, files_mod, monkeypatch):
    """The stop button lands while the first save (step 2's LoRA) is being written: the save completes, the run
    ends keeping step 2, and the end-of-run save does not write step 2 again (that would be refused as a
    replacement): one LoRA and one state, complete and of the same step."""
    real, calls = files_mod.save_file, []

    def pressed(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 1:
            host.mm.interrupt_current_processing(True)
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(files_mod, "save_file", pressed)
    latents, positive = dataset(2, seed=8)
    out = train(host, sd15_model, latents, positive, steps=10, save_every=2, run_name="stop_in_save")
    monkeypatch.undo()
    assert 2 <= out.steps <= 3 and not host.mm.processing_interrupted()
    loras = sorted(n for n in os.listdir(output(host, "loras")) if n.startswith("stop_in_save_00001_"))
    assert loras == sorted({os.path.basename(lora_file(host, "stop_in_save", s)) for s in (2, out.steps)})
    weights, step, _ = pack.state.load_state(state_file(host, "stop_in_save"))
    assert step == out.steps
    assert max_tensor_diff(saved_lora(lora_file(host, "stop_in_save", out.steps)), out.lora) == 0.0
    assert temp_files(output(host), "stop_in_save") == []


def test_out_of_memory_keeps_what_was_trained(host, pack, sd15_model, monkeypatch):
    """Out of memory in step 3 (of 5): the weights of step 2 are saved (LoRA and state) and the message says where."""
    real_step = pack.training.Trainer.step

    def step(self, index):
        if index == 2:  # 0-based: the third step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, index)
    monkeypatch.setattr(pack.training.Trainer, "step", step)
    latents, positive = dataset(2, seed=9)
    with pytest.raises(RuntimeError, match="ran out of GPU memory") as info:
        train(host, sd15_model, latents, positive, steps=5, run_name="oom_kept")
    monkeypatch.undo()
    path = lora_file(host, "oom_kept", 2)
    assert f"The weights of step 2 were saved to {path}" in str(info.value), str(info.value)
    assert pack.state.read_state_meta(state_file(host, "oom_kept"))[0] == 2
    clean = train(host, sd15_model, latents, positive, steps=2, run_name="oom_clean")
    assert max_tensor_diff(saved_lora(path), clean.lora) == 0.0


# ---------------------------------------------------------------------------------------------
# resume mismatches
# ---------------------------------------------------------------------------------------------
MISMATCHES = {
    "rank": (dict(rank=8), "rank 4 in the state, 8 in this run"),
    "alpha": (dict(alpha=2.0), "alpha 4.0 in the state, 2.0 in this run"),
    "mode": (dict(mode="full"), "mode 'lora' in the state, 'full' in this run"),
    "lora_targets": (dict(lora_targets="all"), "lora_targets 'attention' in the state, 'all' in this run"),
    "model": (None, "model: the state was trained on another architecture"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_resume_mismatch_is_refused_before_the_model_loads(host, pack, sd15_model, sdxl_unet_name, base_run,
                                                           no_model_load, case):
    overrides, message = MISMATCHES[case]
    model, (latents, positive) = sd15_model, dataset(1, seed=0)
    if overrides is None:  # another architecture: the tiny SDXL UNet
        model = host.run1("UNETLoader", unet_name=sdxl_unet_name, weight_dtype="default")
        latents, positive = dataset(1, seed=0, dim=2048, pooled=1280)
        overrides = {}
    with pytest.raises(ValueError, match="does not fit this run") as info:
        train(host, model, latents, positive, run_name="mismatch", resume_from=base_run[1], **overrides)
    assert message in str(info.value), str(info.value)
    assert no_model_load == []
