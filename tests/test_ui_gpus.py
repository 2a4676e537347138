"""D2FTrain's and D2FReflowPairs' ``gpus`` input from the real ComfyUI server (DESIGN §7): ``main.py --cpu`` with the pack installed,
driven over HTTP as the frontend drives it (POST /prompt, GET /history, POST /interrupt). On the CPU ``gpus=2``
means the server process (rank 0) and one spawned worker process talking through gloo.

Compared with one process training the global batch in the same server, not "it ran". Three runs start a worker
(a process start costs more than the training here): one that finishes, one whose worker is SIGKILLed after rank 0
saved step 2, one stopped with the stop button. Pairs: gpus=2 makes the tensors gpus=1 makes; a killed worker fails
the run naming its rank, and one process then finishes the folder with the same pairs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_host  # noqa: E402

from d2f_core.storage.state import read_state_meta  # noqa: E402
from d2f_core.training.couplings import folder_pair_count, load_couplings  # noqa: E402
from d2f_host import examples, frontend  # noqa: E402
from d2f_host import workflow as wf  # noqa: E402
from test_workflows import path_of, tiny_overrides  # noqa: E402

PACK_DIR = comfy_host.PACK_DIR
TRAIN = "d2f_sd15_train_lora"
RUN_NAME = "d2f_sd15_lora"  # the workflow's D2FTrain run_name
# As tests/test_launch.py: a seed of its own, and SGD (AdamW's first steps magnify last-bit gradient differences).
SETTINGS = [("D2FTrain", "seed", 7), ("D2FTrainAdvanced", "optimizer", "sgd")]


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):
    """ComfyUI on a free loopback port, base directory in tmp, the pack in its custom_nodes/, a tiny SD1.5
    checkpoint and a training folder of 2 captioned images under the names the workflow uses."""
    base = tmp_path_factory.mktemp("comfyui_gpus")
    srv = frontend.ComfyServer(host.path, str(base), PACK_DIR, startup_timeout=180).prepare()
    unet = comfy_host.tiny_unet_state_dict(comfy_host.SD15_UNET_CONFIG, "SD15", seed=0)
    comfy_host.write_sd15_checkpoint(os.path.join(srv.models_dir, "checkpoints", examples.SD15_CKPT), unet)
    comfy_host.write_training_folder(os.path.join(srv.input_dir, examples.TRAIN_FOLDER))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        print(f"\nComfyUI server log (tail):\n{srv.log_tail(30)}")


@pytest.fixture(scope="module")
def defs(server):
    return server.get_json("/object_info", timeout=60)


def _prompt(defs, **train) -> dict:
    prompt = wf.to_api(wf.load(path_of(TRAIN)), defs)
    wf.apply_overrides(prompt, tiny_overrides(prompt) + SETTINGS + [("D2FTrain", k, v) for k, v in train.items()],
                      defs)
    return prompt


def _drop_validation(prompt: dict) -> None:
    """The example's D2FValidation node and D2FTrain's link to it, out of an API prompt."""
    for node_id in [k for k, e in prompt.items() if e["class_type"] == "D2FValidation"]:
        del prompt[node_id]
        for entry in prompt.values():
            for name, value in list(entry["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and value[0] == node_id:
                    del entry["inputs"][name]


def _lora_dir(server) -> str:
    return os.path.join(server.output_dir, "loras")


def _run_files(server, before: set) -> list[str]:
    """D2FTrain's LoRA files written since ``before`` (one run's, sorted by step)."""
    d = _lora_dir(server)
    names = os.listdir(d) if os.path.isdir(d) else []
    return sorted(os.path.join(d, n) for n in names
                  if n not in before and n.startswith(RUN_NAME + "_") and n.endswith("_steps.safetensors"))


def _existing(server) -> set:
    d = _lora_dir(server)
    return set(os.listdir(d)) if os.path.isdir(d) else set()


def _queue(server, prompt) -> str:
    return server.post_json("/prompt", {"prompt": prompt, "client_id": "d2f-gpus-test"})["prompt_id"]


def _workers(server) -> list[int]:
    """Pids of the server's spawned worker processes (multiprocessing's spawn children, not its resource tracker)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if int(stat[1]) == server.proc.pid and stat[0] != "Z" and b"spawn_main" in cmd:
            pids.append(int(entry))
    return pids


def _wait(server, prompt_id: str, seen: set | None = None, timeout: float = 400.0) -> dict:
    """The history entry of ``prompt_id`` once it has finished; meanwhile adds the worker pids seen to ``seen``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if seen is not None:
            seen.update(_workers(server))
        entry = server.get_json(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
            return entry
        time.sleep(0.3)
    raise AssertionError(f"prompt {prompt_id} did not finish; server log:\n{server.log_tail(60)}")


def _wait_for_file(server, before: set, step: int, seen: set, timeout: float = 300.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.update(_workers(server))
        files = _run_files(server, before)
        if any(f.endswith(f"_{step:06d}_steps.safetensors") for f in files):
            return files
        time.sleep(0.05)
    raise AssertionError(f"no LoRA of step {step} appeared; server log:\n{server.log_tail(60)}")


def _error_of(entry: dict) -> dict:
    return next((m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"), {})


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in a)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def reference(server, defs):
    """One process (gpus=1) with batch 2: the LoRAs of steps 2 and 4."""
    before = _existing(server)
    entry = _wait(server, _queue(server, _prompt(defs, steps=4, batch_size=2, gpus="1")))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], default=str)[:3000]
    files = _run_files(server, before)
    return {step: load_file(next(f for f in files if f.endswith(f"_{step:06d}_steps.safetensors"))) for step in (2, 4)}


def test_gpus_2_trains_the_lora_one_process_trains_with_twice_the_batch(server, defs, reference, record_measure):
    before, seen = _existing(server), set()
    t0 = time.monotonic()
    entry = _wait(server, _queue(server, _prompt(defs, steps=4, batch_size=1, gpus="2")), seen)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], default=str)[:3000]
    print(f"gpus=2 run: {time.monotonic() - t0:.1f} s")
    assert len(seen) == 1, f"expected one worker process, saw {seen}"
    assert all(_gone(p) for p in seen) and not _workers(server), "a worker outlived the run"
    files = _run_files(server, before)
    # rank 0 alone wrote: one run number, the LoRAs of steps 2 and 4 (the worker's would take other numbers)
    names = [os.path.basename(f) for f in files]
    assert len(names) == 2 and names[0].endswith("_000002_steps.safetensors") and \
        names[1] == names[0].replace("_000002_", "_000004_"), names
    with safe_open(files[-1], "pt") as f:
        settings = json.loads(f.metadata()["diff2flow.settings"])
    assert (settings["batch_size"], settings["processes"]) == (1, 2), settings
    for step, path in zip((2, 4), files):
        worst = relative_difference(load_file(path), reference[step])
        record_measure(f"gpus=2 x batch 1 vs gpus=1 x batch 2 (server), LoRA of step {step}", worst, "<= 1e-5")
        assert worst <= 1e-5, (step, worst)
    assert relative_difference(reference[4], reference[2]) > 1e-3  # training moved the weights


def test_a_killed_worker_fails_the_run_naming_its_rank_and_keeps_what_was_saved(server, defs, reference):
    before, seen = _existing(server), set()
    prompt_id = _queue(server, _prompt(defs, steps=40, batch_size=1, gpus="2"))
    _wait_for_file(server, before, 2, seen)
    workers = _workers(server)
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)
    killed = time.monotonic()
    entry = _wait(server, prompt_id, seen, timeout=120)
    ended = time.monotonic()
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"], default=str)[:3000]
    message = _error_of(entry).get("exception_message", "")
    assert "rank 1 was killed by SIGKILL" in message and "Kept: the LoRA of step" in message, message
    assert ended - killed < 60, f"the run ended {ended - killed:.0f} s after the kill"
    print(f"kill to failed prompt: {ended - killed:.1f} s; message: {message}")
    assert all(_gone(p) for p in seen) and not _workers(server)

    # rank 0's files: whole, nothing half-written; step 2's LoRA the one one process trains with batch 2
    files = _run_files(server, before)
    assert files and not any(f.endswith("_000040_steps.safetensors") for f in files), files
    run = os.path.basename(files[0]).rsplit("_", 2)[0]  # d2f_sd15_lora_NNNNN
    state_dir = os.path.join(server.output_dir, "d2f_states", run)
    assert os.listdir(state_dir) == ["state.safetensors"], os.listdir(state_dir)
    assert not [n for n in os.listdir(_lora_dir(server)) if not n.endswith(".safetensors")]
    assert relative_difference(load_file(files[0]), reference[2]) <= 1e-5
    step, _ = read_state_meta(os.path.join(state_dir, "state.safetensors"))
    assert any(f.endswith(f"_{step:06d}_steps.safetensors") for f in files), (step, files)


def test_the_stop_button_stops_every_process_and_the_run_ends_saved(server, defs):
    # after the killed run: the server starts workers again (the crashed run left no group behind)
    before, seen = _existing(server), set()
    prompt_id = _queue(server, _prompt(defs, steps=40, batch_size=1, gpus="2"))
    _wait_for_file(server, before, 2, seen)
    assert len(_workers(server)) == 1
    server.post_json("/interrupt", {})
    stopped = time.monotonic()
    entry = _wait(server, prompt_id, seen, timeout=120)
    print(f"stop to finished prompt: {time.monotonic() - stopped:.1f} s")
    # D2FTrain's stop ends the training only: the run ends saved and the nodes after it run on what was trained
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], default=str)[:3000]
    assert all(_gone(p) for p in seen) and not _workers(server), "a worker outlived the stop"
    files = _run_files(server, before)
    last = int(os.path.basename(files[-1]).split("_")[-2])
    assert 2 <= last < 40, files
    run = os.path.basename(files[0]).rsplit("_", 2)[0]
    step, _ = read_state_meta(os.path.join(server.output_dir, "d2f_states", run, "state.safetensors"))
    assert step == last, (step, files)


def test_gpus_values_and_refusals_before_any_work(host, sd15_model):
    """In the session's host (CPU): counts and "all" (one process without GPUs), and what gpus > 1 refuses."""
    # the pack as the host imported it (under a module name of the host's choosing)
    local_workers = next(m for n, m in sys.modules.items() if n.endswith(".nodes.local_workers"))
    assert local_workers.world_size_for("D2FTrain", "1", sd15_model) == 1
    assert local_workers.world_size_for("D2FTrain", "all", sd15_model) == 1  # no GPU: the plain path
    assert local_workers.world_size_for("D2FTrain", "2", sd15_model) == 2
    with pytest.raises(ValueError, match="gpus must be a count"):
        local_workers.world_size_for("D2FTrain", "two", sd15_model)
    custom = sd15_model.clone()
    custom.cached_patcher_init = None  # as from a custom loader that does not say how to reload its model
    with pytest.raises(ValueError, match="load it with a core loader, or set gpus to 1"):
        local_workers.world_size_for("D2FTrain", "2", custom)

    # D2FReflowPairs sends the model's sampling patches to its workers: one that cannot be sent is refused up front
    pairs_sampling = next(m for n, m in sys.modules.items() if n.endswith(".nodes.pairs_sampling"))
    assert pairs_sampling._patches_for_workers(sd15_model)["object_patches"] == {}
    patched = sd15_model.clone()
    patched.set_model_sampler_cfg_function(lambda args: args["cond"])  # a closure: no pickling it
    with pytest.raises(ValueError, match="a patch on it cannot be sent.*or set gpus to 1"):
        pairs_sampling._patches_for_workers(patched)


def test_gpus_2_sharded_full_fine_tune_trains_what_one_process_with_twice_the_batch_does(server, defs,
                                                                                         record_measure):
    """mode full with sharding fsdp: the weights, gradients and optimizer state split over the server (rank 0) and
    its worker (FSDP over gloo); the saved weight differences of steps 2 and 4 (gathered whole, written by rank 0)
    are those one process (gpus=1, no sharding) trains with the global batch (fp32; in bf16 FSDP gathers the norms'
    weights in bf16 where autocast keeps them float32, so the runs differ by more than rounding)."""
    def run(**train):
        before = _existing(server)
        prompt = _prompt(defs, steps=4, mode="full", learning_rate=1e-4, training_dtype="fp32", **train)
        _drop_validation(prompt)  # refused on a sharded run (tests/test_host_validation.py)
        entry = _wait(server, _queue(server, prompt))
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], default=str)[:3000]
        files = _run_files(server, before)
        assert len(files) == 2, files
        return [load_file(f) for f in files], files
    t0 = time.monotonic()
    single, _ = run(batch_size=2, gpus="1")
    t1 = time.monotonic()
    sharded, files = run(batch_size=1, gpus="2", sharding="fsdp")
    print(f"full gpus=1 bs2: {t1 - t0:.1f} s; full gpus=2 fsdp bs1: {time.monotonic() - t1:.1f} s")
    with safe_open(files[-1], "pt") as f:
        settings = json.loads(f.metadata()["diff2flow.settings"])
    assert (settings["processes"], settings["sharding"]) == (2, "fsdp"), settings  # the file says how it was trained
    assert "full fine-tune sharded over 2 processes (FSDP)" in server.log_tail(400)
    # The files hold Δ = θ' − θ, a few float32 ulps of θ after 4 small SGD steps: compared as weights, i.e. relative
    # to the largest base weight (a 1-ulp rounding flip of θ' is ~1/12 of such a Δ, not a training difference).
    base = comfy_host.tiny_unet_state_dict(comfy_host.SD15_UNET_CONFIG, "SD15", seed=0)
    scale = max(float(v.float().abs().max()) for v in base.values())
    for step, a, b in zip((2, 4), sharded, single):
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a) / scale
        moved = max(float(b[k].abs().max()) for k in b) / scale
        record_measure(f"gpus=2 fsdp x batch 1 vs gpus=1 x batch 2 (server), trained weights of step {step} "
                       "(relative to the largest weight)", worst, "<= 1e-5")
        print(f"step {step}: weights differ by {worst:.2e} of the largest weight; training moved them {moved:.2e}")
        assert worst <= 1e-5 and moved > 10 * worst, (step, worst, moved)
    assert not _workers(server), "a worker outlived the run"


# --- D2FReflowPairs' gpus -------------------------------------------------------------------------------------------
PAIRS_SETTINGS = dict(count=12, width=64, height=64, steps=2, cfg=3.0, seed=5, batch_size=2, shift=1.0)


def _pairs_prompt(name: str, gpus: str, **settings) -> dict:
    """Checkpoint → prompt and negative → D2FReflowPairs → Preview as Text of its count (an output node, so that the
    host runs it)."""
    ckpt = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": examples.SD15_CKPT}}
    text = lambda t: {"class_type": "CLIPTextEncode", "inputs": {"text": t, "clip": ["1", 1]}}  # noqa: E731
    return {
        "1": ckpt, "2": text("a red house"), "4": text(""),
        "5": {"class_type": "D2FReflowPairs", "inputs": dict(PAIRS_SETTINGS, **settings, model=["1", 0],
                                                             positive=["2", 0], negative=["4", 0], name=name,
                                                             gpus=gpus)},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
    }


def _pairs_folder(server, name: str) -> str:
    return os.path.join(server.output_dir, "d2f_couplings", name)


@pytest.fixture(scope="module")
def pairs_reference(server):
    """The pairs one process (gpus=1) makes."""
    entry = _wait(server, _queue(server, _pairs_prompt("pairs_gpus1", "1")))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], default=str)[:3000]
    return load_couplings(_pairs_folder(server, "pairs_gpus1"))


def _pair_difference(a, b) -> float:
    assert a.noise.shape == b.noise.shape and torch.equal(a.noise, b.noise), "pair noise must not depend on the ranks"
    assert torch.equal(a.prompt_index, b.prompt_index)
    return float((a.x0 - b.x0).abs().max() / b.x0.abs().max())


def test_pairs_on_gpus_2_are_the_pairs_one_process_makes(server, pairs_reference, record_measure):
    seen = set()
    entry = _wait(server, _queue(server, _pairs_prompt("pairs_gpus2", "2")), seen)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], default=str)[:3000]
    assert len(seen) == 1, f"expected one worker process, saw {seen}"
    assert all(_gone(p) for p in seen) and not _workers(server), "a worker outlived the run"
    assert len(pairs_reference) == PAIRS_SETTINGS["count"]
    two = load_couplings(_pairs_folder(server, "pairs_gpus2"))
    worst = _pair_difference(two, pairs_reference)
    record_measure("D2FReflowPairs gpus=2 vs gpus=1 (server), x0 of 12 pairs", worst, "<= 1e-5")
    assert worst <= 1e-5
    # chunks of both ranks: rank 1 made chunks 1, 3, 5 (pairs 2-3, 6-7, 10-11) in its own files
    chunks = sorted(n for n in os.listdir(_pairs_folder(server, "pairs_gpus2")) if n.startswith("chunk_"))
    assert len(chunks) == 6, chunks


def test_pairs_worker_killed_fails_naming_its_rank_and_one_process_finishes_the_folder(server, pairs_reference,
                                                                                       record_measure):
    folder = _pairs_folder(server, "pairs_killed")
    seen = set()
    prompt_id = _queue(server, _pairs_prompt("pairs_killed", "2", count=4000))
    deadline = time.monotonic() + 300
    while not (os.path.isdir(folder) and folder_pair_count(folder) >= 2) and time.monotonic() < deadline:
        seen.update(_workers(server))
        time.sleep(0.05)
    workers = _workers(server)
    assert len(workers) == 1, (workers, server.log_tail(40))
    os.kill(workers[0], signal.SIGKILL)
    killed = time.monotonic()
    entry = _wait(server, prompt_id, seen, timeout=120)
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"], default=str)[:3000]
    message = _error_of(entry).get("exception_message", "")
    assert "rank 1 was killed by SIGKILL" in message and "Kept:" in message and "pairs in" in message, message
    assert time.monotonic() - killed < 60
    assert all(_gone(p) for p in seen) and not _workers(server)
    # what a loader lists is whole (a write the kill cut short leaves only a hidden temp file)
    assert all(n.endswith(".safetensors") for n in os.listdir(folder) if not n.startswith(".")), os.listdir(folder)

    # the same inputs on one process: it makes the chunks the killed run left out, and the pairs are the reference's
    entry = _wait(server, _queue(server, _pairs_prompt("pairs_killed", "1")))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], default=str)[:3000]
    resumed = load_couplings(folder, limit=PAIRS_SETTINGS["count"])
    worst = _pair_difference(resumed, pairs_reference)
    record_measure("D2FReflowPairs killed gpus=2 run continued on gpus=1 vs gpus=1, x0 of 12 pairs", worst, "<= 1e-5")
    assert worst <= 1e-5


def test_pairs_on_gpus_2_carry_a_lora_applied_upstream(server, reference, pairs_reference, record_measure):
    """The workers reload the checkpoint from its file and re-apply the model's weight patches: with a LoRA loaded
    upstream (core LoraLoaderModelOnly; a trained LoRA scaled up so that it matters) gpus=2 makes the pairs gpus=1 makes, and
    they are not the pairs without it (a worker that dropped the LoRA would mix both)."""
    trained = sorted(n for n in os.listdir(_lora_dir(server)) if n.startswith(RUN_NAME + "_"))
    assert trained, "no LoRA of the module's training runs"
    os.makedirs(os.path.join(server.models_dir, "loras"), exist_ok=True)
    # a few SGD steps barely move a LoRA: its up factors scaled so that it changes the pairs clearly
    lora = {k: v * 300 if k.endswith("lora_up.weight") else v
            for k, v in load_file(os.path.join(_lora_dir(server), trained[-1])).items()}
    save_file(lora, os.path.join(server.models_dir, "loras", "d2f_pairs.safetensors"))

    def with_lora(name, gpus):
        prompt = _pairs_prompt(name, gpus)
        prompt["8"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "d2f_pairs.safetensors",
                                                                       "strength_model": 1.0}}
        prompt["5"]["inputs"]["model"] = ["8", 0]
        entry = _wait(server, _queue(server, prompt))
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], default=str)[:3000]
        return load_couplings(_pairs_folder(server, name))
    one, two = with_lora("pairs_lora_gpus1", "1"), with_lora("pairs_lora_gpus2", "2")
    worst = _pair_difference(two, one)
    moved = _pair_difference(one, pairs_reference)
    record_measure(f"D2FReflowPairs with a LoRA, gpus=2 vs gpus=1 (server; the LoRA moves x0 by {moved:.2g})", worst,
                   "<= 1e-5")
    assert worst <= 1e-5 and moved > 10 * 1e-5, (worst, moved)  # a worker without the LoRA would break the bound
