"""Multi-process training from the command line (DESIGN §7): ``d2f run --nproc-per-node 2`` on the pack's LoRA
training workflow, real processes started by torch's elastic launcher, gloo on the CPU, the real host in every
rank; compared with one process (the session's host) that trains the global batch.

Two launches in all (a process start costs more than the training here): one that finishes, one whose rank 1 is
SIGKILLed after rank 0 saved step 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from d2f_core.storage.state import read_state_meta
from d2f_host import runner
from d2f_host import workflow as wf
from test_workflows import PACK_DIR, d2f, defs, example_files, path_of, tiny_overrides  # noqa: F401  (fixtures)

TRAIN = "d2f_sd15_train_lora"
RUN_NAME = "d2f_sd15_lora"  # the workflow's D2FTrain run_name
PER_RANK = 1
# On top of the tests' tiny CPU settings (which save every 2 steps): a seed of its own, and SGD, whose update is
# linear in the gradient. AdamW's first steps, lr·g/(|g| + eps), turn the last-bit differences of gradients near
# eps (2 ranks sum in another order than one batch of 2) into differences of up to 2% of lr (measured: 1.9e-2 of
# a LoRA factor's largest value after 2 steps), which says nothing about the launch.
SETTINGS = [("D2FTrain", "seed", 7), ("D2FTrainAdvanced", "optimizer", "sgd")]

# Every worker notes its pid; on rank 1, with D2F_TEST_KILL_AFTER set, a thread SIGKILLs the process as soon as a
# file matching that pattern exists, after noting the time in D2F_TEST_KILLED.
SITECUSTOMIZE = """
import glob, os, signal, threading, time

if os.environ.get("TORCHELASTIC_RUN_ID"):
    with open(os.path.join(os.environ["D2F_TEST_PIDS"], os.environ["RANK"]), "w") as f:
        f.write(str(os.getpid()))
    if os.environ["RANK"] == "1" and os.environ.get("D2F_TEST_KILL_AFTER"):
        def _kill():
            while not glob.glob(os.environ["D2F_TEST_KILL_AFTER"]):
                time.sleep(0.02)
            with open(os.environ["D2F_TEST_KILLED"], "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=_kill, daemon=True).start()
"""


def _loras(files, step: int) -> list[str]:
    return [f for f in files if os.path.basename(f).startswith(RUN_NAME + "_") and f.endswith(f"_{step:06d}_steps.safetensors")]


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in a)


def _node(class_type: str, **links) -> dict:
    return {"class_type": class_type, "inputs": {name: [src, 0] for name, src in links.items()} | {"seed": 1}}


def test_rank_0_runs_the_outputs_the_other_ranks_only_the_distributed_nodes_they_need():
    prompt = {"1": _node("CheckpointLoaderSimple"), "2": _node("D2FReflowPairs", model="1"),
              "3": _node("D2FTrain", model="1", couplings="2"), "4": _node("SaveLoRA", lora="3"),
              "5": _node("KSampler", model="3"), "6": _node("SaveImage", images="5"),
              "7": _node("D2FTrain", model="1")}  # feeds no output: no rank runs it
    assert runner.rank_outputs(prompt, ["4", "6"], 0) == ["4", "6"]
    assert runner.rank_outputs(prompt, ["4", "6"], 1) == ["2", "3"]
    assert runner.rank_outputs({"1": _node("EmptyLatentImage"), "2": _node("SaveLatent", samples="1")}, ["2"], 1) == []
    prompt["8"] = _node("SaveLoRA", lora="7")
    with pytest.raises(wf.WorkflowError, match="nodes 2 .D2FReflowPairs. and 7 .D2FTrain. do not depend on one another"):
        runner.rank_outputs(prompt, ["4", "6", "8"], 0)


@pytest.fixture(scope="module")
def reference(d2f, defs, example_files):
    """One process, batch 2 × the per-rank batch: the session host runs the workflow (LoRAs of steps 2 and 4)."""
    prompt = wf.to_api(wf.load(path_of(TRAIN)), defs)
    wf.apply_overrides(prompt, tiny_overrides(prompt) + SETTINGS + [("D2FTrain", "steps", 4),
                                                                     ("D2FTrain", "batch_size", 2 * PER_RANK)])
    result = runner.run_prompt(prompt, host=d2f)
    assert result.success, json.dumps(result.error, default=str)[:3000]
    return {step: load_file(_loras(result.files, step)[0]) for step in (2, 4)}


def launch(host, defs, example_files, tmp_path, steps: int, **env):
    """``d2f run --nproc-per-node 2`` of the training workflow (per-rank batch 1, ``steps``) into tmp_path/out;
    returns the finished process and the pid of each rank."""
    for folder in ("site", "pids"):
        (tmp_path / folder).mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    models = tmp_path / "models.yaml"
    models.write_text(json.dumps({"d2f_test": {"base_path": os.path.dirname(example_files["checkpoints"]),
                                               "checkpoints": "checkpoints"}}))
    prompt = wf.to_api(wf.load(path_of(TRAIN)), defs)
    overrides = tiny_overrides(prompt) + SETTINGS + [("D2FTrain", "steps", steps), ("D2FTrain", "batch_size", PER_RANK)]
    cmd = [sys.executable, "-m", "d2f_app", "run", path_of(TRAIN), "--comfyui", host.path, "--cpu", "--no-custom-nodes",
           "--output", str(tmp_path / "out"), "--input", example_files["input"], "--extra-model-paths", str(models),
           "--nproc-per-node", "2"]
    for node, name, value in overrides:
        cmd += ["--set", f"{node}.{name}={json.dumps(value)}"]
    base = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "D2F_RUN_REEXEC")}
    env = {**base, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), PACK_DIR]),
           "D2F_TEST_PIDS": str(tmp_path / "pids"), **env}
    proc = subprocess.run(cmd, cwd=PACK_DIR, env=env, capture_output=True, text=True, timeout=400)
    pids = {int(p.name): int(p.read_text()) for p in (tmp_path / "pids").iterdir()}
    return proc, pids


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _short(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def test_two_ranks_train_the_lora_one_process_trains_with_twice_the_batch(host, defs, example_files, reference,
                                                                       tmp_path, record_measure):
    proc, pids = launch(host, defs, example_files, tmp_path, steps=4)
    assert proc.returncode == 0, _short(proc)
    assert sorted(pids) == [0, 1], pids
    out = tmp_path / "out"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    # What one process writes, once: D2FTrain's LoRAs of steps 2 and 4, its state and validation grid, SaveLoRA's file (its
    # counter counts D2FTrain's files of the same prefix too), the image sampled with the trained model. Rank 1
    # ran neither the output nodes nor D2FTrain's saves (its files would have taken the next counters).
    assert written == sorted([f"loras/{RUN_NAME}_00001_000002_steps.safetensors",
                              f"loras/{RUN_NAME}_00001_000004_steps.safetensors",
                              f"d2f_states/{RUN_NAME}_00001/state.safetensors",
                              f"d2f_states/{RUN_NAME}_00001/validation_000004_steps.png",  # D2FValidation's grid
                              "loras/d2f_sd15_lora_4_steps_00002_.safetensors",
                              "d2f/trained_preview_00001_.png"]), written
    # each output node ran once (the loss graph is a preview: shown, not saved in output/)
    ids = {n["type"]: n["id"] for n in wf.load(path_of(TRAIN))["nodes"]}
    assert proc.stderr.count(f"Plot Loss Graph (#{ids['LossGraphNode']})") == 1, proc.stderr
    assert proc.stderr.count(f"Save LoRA Weights (#{ids['SaveLoRA']})") == 1, proc.stderr
    with safe_open(str(out / "loras" / f"{RUN_NAME}_00001_000004_steps.safetensors"), "pt") as f:
        settings = json.loads(f.metadata()["diff2flow.settings"])
    assert (settings["batch_size"], settings["processes"]) == (PER_RANK, 2), settings  # the file says its global batch
    for step in (2, 4):
        lora = load_file(str(out / "loras" / f"{RUN_NAME}_00001_{step:06d}_steps.safetensors"))
        worst = relative_difference(lora, reference[step])
        record_measure(f"2 ranks x batch 1 vs 1 process x batch 2, LoRA of step {step}", worst, "<= 1e-5")
        assert worst <= 1e-5, (step, worst)
    saved = load_file(str(out / "loras" / "d2f_sd15_lora_4_steps_00002_.safetensors"))
    assert relative_difference(saved, reference[4]) <= 1e-5  # what SaveLoRA got is the trained LoRA
    assert relative_difference(reference[4], reference[2]) > 1e-3  # training moved the weights


def test_a_killed_rank_ends_every_rank_and_keeps_what_rank_0_saved(host, defs, example_files, reference, tmp_path):
    out = tmp_path / "out"
    killed = tmp_path / "killed"
    t0 = time.time()
    proc, pids = launch(host, defs, example_files, tmp_path, steps=40, D2F_TEST_KILLED=str(killed),
                        D2F_TEST_KILL_AFTER=str(out / "loras" / f"{RUN_NAME}_*_000002_steps.safetensors"))
    ended = time.time()
    assert killed.exists(), f"rank 1 was never killed: {_short(proc)}"
    kill_time = float(killed.read_text())
    assert proc.returncode != 0, _short(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("d2f run: rank 1 (killed by SIGKILL)") and "failed" in last, _short(proc)
    assert ended - kill_time < 60, f"the launcher ended {ended - kill_time:.0f} s after the kill"
    assert all(_gone(pid) for pid in pids.values()), pids  # no rank outlives the launcher
    print(f"launch to end {ended - t0:.0f} s, kill to end {ended - kill_time:.1f} s")

    # Rank 0's files: complete, no temp file left, step 2's LoRA the one a single process trains.
    files = [str(p) for p in out.rglob("*") if p.is_file()]
    loras = sorted(f for f in files if f.endswith("_steps.safetensors"))
    assert loras and not any(f.endswith("_000040_steps.safetensors") for f in loras), loras
    assert len(files) == len(loras) + 1, files  # the LoRAs and the state, nothing half-written
    assert relative_difference(load_file(_loras(loras, 2)[0]), reference[2]) <= 1e-5
    state = next(f for f in files if f.endswith("state.safetensors"))
    step, _ = read_state_meta(state)
    assert any(f.endswith(f"_{step:06d}_steps.safetensors") for f in loras), (step, loras)
