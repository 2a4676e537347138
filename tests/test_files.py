"""d2f_core.storage.files (and the state / couplings files written through it) without a host: names, paths,
atomic never-clobbering writes under injected faults, counters, damaged files.

Faults are injected at the real writer (``files.save_file``, safetensors' own): it writes part of the temp
file and then fails the way a full disk, a Ctrl-C or a competing writer would."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save

import d2f_core.storage.files as files
from d2f_core.training.couplings import CouplingsError, CouplingsWriter, chunk_name, load_couplings
from d2f_core.storage.files import (DamagedFileError, atomic_save, folder_name, plain_name, read_header, read_tensors,
                            reserve_numbered, resolve_inside, used_counters)
from d2f_core.storage.state import load_state, resume_mismatches, save_state

A = {"w": torch.arange(6.0).reshape(2, 3)}
B = {"w": torch.full((2, 3), 7.0)}


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def half_then(exc: BaseException):
    """A writer that writes the first half of the real bytes to the temp file, then raises ``exc``."""
    def writer(tensors, path, metadata=None):
        data = save(tensors, metadata=metadata)
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise exc
    return writer


# --- names and paths ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["d2f_lora", "my-run.v2", "Lora_2024", "猫の絵", " padded "])
def test_plain_names_are_accepted(name):
    assert plain_name(name, "run_name") == name.strip()


@pytest.mark.parametrize("name", ["", "   ", None, ".", "..", "a/b", "../x", "/abs", "a\\b", "C:x", "a b", ".hidden",
                                  "x\ny", "a*b"])
def test_other_names_are_refused_with_the_rule(name):
    with pytest.raises(ValueError, match="run_name") as info:
        plain_name(name, "run_name")
    assert "letters, digits" in str(info.value) or "empty" in str(info.value)


@pytest.mark.parametrize("name,expected", [("reflow", "reflow"), ("a/b", "a/b"), ("a/b/", "a/b"), ("a\\b", "a/b")])
def test_folder_names_allow_subfolders(name, expected):
    assert folder_name(name, "name") == expected


@pytest.mark.parametrize("name", ["", "../x", "/x", "a/../b", "a//b", "./a", ".."])
def test_folder_names_never_leave_their_root(name):
    with pytest.raises(ValueError, match="no absolute paths, no '..'"):
        folder_name(name, "name")


def test_resolve_inside(tmp_path):
    root = tmp_path / "output"
    (root / "d2f_states").mkdir(parents=True)
    target = root / "d2f_states" / "s.safetensors"
    target.write_bytes(b"x")
    assert resolve_inside(str(root), "d2f_states/s.safetensors", "resume_from") == os.path.realpath(target)
    assert resolve_inside(str(root), str(target), "resume_from") == os.path.realpath(target)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    (root / "link").symlink_to(outside)
    for bad in ("../elsewhere.safetensors", str(outside), "link", "d2f_states/../../elsewhere.safetensors"):
        with pytest.raises(ValueError, match="resume_from .* is outside"):
            resolve_inside(str(root), bad, "resume_from")


# --- atomic writes -----------------------------------------------------------------------------------
def test_atomic_save_writes_fsyncs_then_publishes(tmp_path, monkeypatch):
    order = []
    real_fsync, real_publish = files._fsync, files._publish
    monkeypatch.setattr(files, "_fsync", lambda p, directory=False: (order.append(("fsync", directory)),
                                                                     real_fsync(p, directory))[1])
    monkeypatch.setattr(files, "_publish", lambda *a: (order.append(("publish",)), real_publish(*a))[1])
    path = atomic_save(A, str(tmp_path / "a.safetensors"), {"k": "v"})
    assert order == [("fsync", False), ("publish",), ("fsync", True)]
    assert torch.equal(load_file(path)["w"], A["w"]) and read_header(path, "x") == {"k": "v"}
    assert listing(tmp_path) == ["a.safetensors"]


def test_existing_file_is_never_replaced(tmp_path):
    path = str(tmp_path / "a.safetensors")
    atomic_save(A, path)
    with pytest.raises(FileExistsError, match="already exists and belongs to another run"):
        atomic_save(B, path)
    assert torch.equal(load_file(path)["w"], A["w"]) and listing(tmp_path) == ["a.safetensors"]
    atomic_save(B, path, replace=True)  # a file the caller owns (a run's own state)
    assert torch.equal(load_file(path)["w"], B["w"]) and listing(tmp_path) == ["a.safetensors"]


def test_file_appearing_during_the_write_is_not_replaced(tmp_path, monkeypatch):
    """Another writer publishes the same name while ours writes: the publish itself must refuse (hard link),
    not only the check before writing."""
    path = str(tmp_path / "a.safetensors")
    real = files.save_file

    def racing(tensors, tmp, metadata=None):
        real(A, path)  # the other writer
        return real(tensors, tmp, metadata=metadata)
    monkeypatch.setattr(files, "save_file", racing)
    with pytest.raises(FileExistsError):
        atomic_save(B, path)
    assert torch.equal(load_file(path)["w"], A["w"]) and listing(tmp_path) == ["a.safetensors"]


@pytest.mark.parametrize("replace", [False, True])
def test_disk_full_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch, replace):
    path = str(tmp_path / ("state.safetensors" if replace else "b.safetensors"))
    atomic_save(A, str(tmp_path / "a.safetensors"))
    if replace:
        atomic_save(A, path)
    monkeypatch.setattr(files, "save_file", half_then(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match="not enough disk space") as info:
        atomic_save(B, path, replace=replace)
    assert info.value.errno == errno.ENOSPC and path in str(info.value)
    assert not [n for n in listing(tmp_path) if files.is_temp_file(n)], "the temp file was left behind"
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["w"], A["w"])
    if replace:
        assert torch.equal(load_file(path)["w"], A["w"]), "the previous state was damaged"
    else:
        assert not os.path.exists(path)


def test_ctrl_c_mid_write_removes_the_temp_and_propagates(tmp_path, monkeypatch):
    path = str(tmp_path / "state.safetensors")
    atomic_save(A, path)
    monkeypatch.setattr(files, "save_file", half_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_save(B, path, replace=True)
    assert listing(tmp_path) == ["state.safetensors"] and torch.equal(load_file(path)["w"], A["w"])


def test_temp_names_never_look_like_real_files(tmp_path):
    tmp = files._new_temp(str(tmp_path / "run_00001_000002_steps.safetensors"))
    name = os.path.basename(tmp)
    assert name.startswith(".") and files.is_temp_file(name) and not name.endswith(".safetensors")
    assert used_counters(str(tmp_path), "run") == set()


# --- counters ----------------------------------------------------------------------------------------
def test_counters_skip_every_used_number_and_ignore_temp_files(tmp_path):
    loras, states = tmp_path / "loras", tmp_path / "states"
    loras.mkdir()
    (loras / "run_00004_000010_steps.safetensors").write_bytes(b"")
    (loras / f".run_00009_000001_steps.safetensors.abc{files.TEMP_SUFFIX}").write_bytes(b"")
    (loras / "run_000500_steps.safetensors").write_bytes(b"")  # the old naming: a step, not a counter
    (loras / "runner_00007_000001_steps.safetensors").write_bytes(b"")  # another name
    assert used_counters(str(loras), "run") == {4}
    assert reserve_numbered(str(states), "run", used_counters(str(loras), "run")) == (5, str(states / "run_00005"))
    assert reserve_numbered(str(states), "run")[0] == 6
    (states / "run_00008").mkdir()
    assert reserve_numbered(str(states), "run")[0] == 9


def test_concurrent_reservations_get_distinct_counters(tmp_path, monkeypatch):
    """Every thread scans before any creates its folder (a stale scan): mkdir still hands out each counter once."""
    barrier = threading.Barrier(8)
    real = files.used_counters

    def stale(*a):
        found = real(*a)
        barrier.wait(timeout=10)
        return found
    monkeypatch.setattr(files, "used_counters", stale)
    got = []
    threads = [threading.Thread(target=lambda: got.append(reserve_numbered(str(tmp_path), "run")[0])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 9))


# --- damaged files -----------------------------------------------------------------------------------
def truncated_copy(src: str, dst: str) -> str:
    data = open(src, "rb").read()
    open(dst, "wb").write(data[: len(data) // 2])
    return dst


def test_damaged_files_name_the_file(tmp_path):
    good = atomic_save(A, str(tmp_path / "good.safetensors"))
    for bad in (truncated_copy(good, str(tmp_path / "cut.safetensors")), str(tmp_path / "empty.safetensors")):
        open(bad, "ab").close()
        for read in (read_header, read_tensors):
            with pytest.raises(DamagedFileError, match="training state '.*' is damaged or incomplete") as info:
                read(bad, "training state")
            assert bad in str(info.value)


def test_state_round_trip_and_damaged_state(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = save_state(str(tmp_path / "state.safetensors"), dict(net.state_dict()), opt, 5, {"mode": "lora"})
    path = save_state(path, dict(net.state_dict()), opt, 6, {"mode": "lora"})  # a run rewrites its own state
    weights, step, meta = load_state(path, torch.optim.AdamW(net.parameters()))
    assert step == 6 and meta == {"mode": "lora"} and torch.equal(weights["weight"], net.weight)
    assert listing(tmp_path) == ["state.safetensors"]
    cut = truncated_copy(path, str(tmp_path / "cut.safetensors"))
    with pytest.raises(DamagedFileError, match=f"training state '{cut}' is damaged"):
        load_state(cut)


def test_resume_mismatches():
    now = {"mode": "lora", "rank": 4, "alpha": 4.0, "lora_targets": "attention", "model": "abc"}
    assert resume_mismatches(dict(now, alpha=4, run_name="x"), now) == []
    assert resume_mismatches({"mode": "lora", "rank": 4, "run_name": "old"}, now) == []  # older states: what they hold
    diffs = resume_mismatches(dict(now, rank=8, lora_targets="all", model="def"), now)
    assert diffs[0] == "rank 8 in the state, 4 in this run"
    assert diffs[1] == "lora_targets 'all' in the state, 'attention' in this run"
    assert "another architecture" in diffs[2] and "def" in diffs[2] and "abc" in diffs[2]
    full = dict(now, mode="full")
    assert resume_mismatches(dict(full, rank=8), full) == []  # rank means nothing to a full fine-tune
    assert resume_mismatches(now, full) == ["mode 'lora' in the state, 'full' in this run"]


def test_couplings_chunks_are_never_overwritten_and_damage_is_named(tmp_path):
    folder = str(tmp_path / "pairs")
    meta = {"model": "m", "seed": 1}
    shape = (1, 2, 2, 2)
    first, stale = CouplingsWriter(folder, meta), CouplingsWriter(folder, meta)
    first.append(torch.zeros(shape), torch.ones(shape), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(FileExistsError):  # a second writer on the same folder cannot replace chunk 0
        stale.append(torch.ones(shape), torch.zeros(shape), torch.zeros(1, dtype=torch.int64))
    assert torch.equal(load_couplings(folder).x0, torch.ones(shape))
    chunk = os.path.join(folder, chunk_name(0, 1))
    data = open(chunk, "rb").read()
    open(chunk, "wb").write(data[:-10])
    with pytest.raises(CouplingsError, match=f"couplings file '{chunk}' is damaged or incomplete"):
        load_couplings(folder)
