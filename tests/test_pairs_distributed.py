"""Reflow pairs made by several torch.distributed ranks (DESIGN §7), with real collectives: gloo process groups on
the CPU, rendezvous through a FileStore in the test's temporary directory.

The contract under test: pair i's noise, prompt and x̂0 depend on i only, and the chunks still to make on the folder
only, so N ranks write the folder one process writes, byte for byte; a stop or a fault on one rank ends every rank
with the finished chunks on disk; a folder stopped on 2 ranks and continued on 1 or 3 ends as an uninterrupted run;
gaps and overlaps are named when the folder is read; folders of the older chunk naming still load and continue.
The ``sample`` function is ``test_couplings``' stand-in for the ODE: x̂0 a fixed function of a pair's noise and prompt.
"""

import os
import shutil
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from d2f_core.training.couplings import (FORMAT, CouplingsError, CouplingsWriter, _save, chunk_name, folder_pair_count,
                                         generate, load_couplings, missing_chunks, pair_noise, prompt_indices)
from d2f_core.training.distributed import DistributedContext

from test_couplings import META, SHAPE, fake_solver, folder_bytes, prompt_table, write

COUNT, BATCH = 11, 2  # chunks [0,2) [2,4) … [8,10) [10,11)
STOP = (1, 1)  # (rank, chunks it made): rank 1 asks to stop after its first chunk
FAULT = (0, 1)  # rank 0's second chunk raises


def make(ctx: DistributedContext | None, folder: str, stop=None, fault=None) -> dict:
    """What D2FReflowPairs does on this rank: open the folder, generate, load what is there without a gap."""
    rank = ctx.rank if ctx is not None else 0
    prompts = prompt_table()
    solver = fake_solver(prompts)
    calls = []

    def sample(noise, index, start):
        if fault == (rank, len(calls)):
            raise RuntimeError("injected fault")
        calls.append(start)
        return solver(noise, index, start)
    writer = CouplingsWriter.open(folder, META, prompts, ctx)
    try:
        result = generate(writer, COUNT, BATCH, sample, seed=META["seed"], shape=SHAPE,
                          should_stop=lambda: stop == (rank, len(calls)), dist=ctx)
    except RuntimeError as exc:
        result = str(exc)
    loaded = load_couplings(folder, limit=min(COUNT, writer.count))
    return {"calls": calls, "result": result, "ranges": list(writer.ranges), "digest": loaded.digest()}


def _worker(rank: int, world: int, tmp: str):
    """Every 3-rank case on all ranks and every 2-rank case on ranks 0 and 1 in a subgroup, in one spawn (a process
    start costs more than all the pairs here). The stopped 2-rank folders are copied twice: continued here on 3 ranks
    (``-on3``), and by the test process on 1 (``-on1``)."""
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank,
                            world_size=world, timeout=timedelta(seconds=30))
    try:
        everyone = DistributedContext.from_environment()
        pair = dist.new_group([0, 1])  # every rank takes part in creating it
        out = {"w3": make(everyone, os.path.join(tmp, "w3"))}
        if rank < 2:
            two = DistributedContext(rank, 2, backend="gloo", group=pair)
            out["w2"] = make(two, os.path.join(tmp, "w2"))
            out["stop"] = make(two, os.path.join(tmp, "stop"), stop=STOP)
            out["fault"] = make(two, os.path.join(tmp, "fault"), fault=FAULT)
            if rank == 0:
                for name in ("stop", "fault"):
                    for copy in ("on1", "on3"):
                        shutil.copytree(os.path.join(tmp, name), os.path.join(tmp, f"{name}-{copy}"))
        dist.barrier()  # the copies exist
        for name in ("stop", "fault"):
            out[f"{name}-on3"] = make(everyone, os.path.join(tmp, f"{name}-on3"))
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """(folder, per-rank results) of one spawn of 3 gloo ranks; every rank must finish in time (no hang)."""
    tmp = tmp_path_factory.mktemp("pairs")
    procs = mp.spawn(_worker, args=(3, str(tmp)), nprocs=3, join=False)
    deadline = time.monotonic() + 90
    try:
        while not procs.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail("3 ranks did not finish within 90 s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    return tmp, [torch.load(tmp / f"rank{r}.pt") for r in range(3)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run: its folder's bytes and its couplings' digest."""
    folder = tmp_path_factory.mktemp("reference") / "pairs"
    write(folder, count=COUNT, batch=BATCH)
    return folder_bytes(folder), load_couplings(str(folder)).digest()


def test_every_world_size_writes_the_single_process_folder(spawned, reference):
    tmp, results = spawned
    ref_bytes, ref_digest = reference
    assert [name for name in ref_bytes if name.startswith("chunk")] == [
        chunk_name(s, min(s + BATCH, COUNT)) for s in range(0, COUNT, BATCH)]
    for name, world, dealt in (("w2", 2, [[0, 4, 8], [2, 6, 10]]), ("w3", 3, [[0, 6], [2, 8], [4, 10]])):
        assert folder_bytes(tmp / name) == ref_bytes, name
        for rank in range(world):
            got = results[rank][name]
            assert got["calls"] == dealt[rank], (name, rank)  # round-robin: each chunk made once, by one rank
            assert got["result"] == COUNT and got["digest"] == ref_digest, (name, rank)  # all pairs, on every rank


def test_a_stop_on_one_rank_stops_every_rank(spawned, reference):
    """Rank 1 asks to stop after its first chunk: rank 0 stops too, after the chunk it was making (none of its
    later ones), and both return the 4 pairs on disk."""
    tmp, results = spawned
    head = load_couplings(str(tmp / "w2"), limit=4).digest()
    assert [results[r]["stop"]["calls"] for r in (0, 1)] == [[0], [2]]
    for rank in (0, 1):
        got = results[rank]["stop"]
        assert got["result"] == 4 and got["ranges"] == [(0, 2), (2, 2)] and got["digest"] == head


def test_a_fault_on_one_rank_ends_every_rank_and_its_gap_is_named(spawned):
    """Rank 0's chunk [4, 6) raises; rank 1 finishes [6, 8) of the same round, then both stop. The exception reaches
    rank 0's caller; both return the 4 pairs before the gap, and reading past it names the missing pairs."""
    tmp, results = spawned
    assert [results[r]["fault"]["calls"] for r in (0, 1)] == [[0], [2, 6]]
    assert results[0]["fault"]["result"] == "injected fault" and results[1]["fault"]["result"] == 4
    assert results[0]["fault"]["ranges"] == results[1]["fault"]["ranges"] == [(0, 2), (2, 2), (6, 2)]
    assert results[0]["fault"]["digest"] == results[1]["fault"]["digest"] == results[0]["stop"]["digest"]
    with pytest.raises(CouplingsError, match="pairs 4…5 .* are missing"):
        load_couplings(str(tmp / "fault"))


@pytest.mark.parametrize("name,missing", [("stop", [4, 6, 8, 10]), ("fault", [4, 8, 10])])
def test_stopped_on_two_ranks_continued_on_one_or_three_is_the_uninterrupted_run(spawned, reference, name, missing):
    tmp, results = spawned
    ref_bytes, ref_digest = reference
    dealt = [missing[r::3] for r in range(3)]
    for rank in range(3):
        got = results[rank][f"{name}-on3"]
        assert got["calls"] == dealt[rank] and got["result"] == COUNT and got["digest"] == ref_digest, rank
    assert folder_bytes(tmp / f"{name}-on3") == ref_bytes
    got = make(None, str(tmp / f"{name}-on1"))  # the same stopped folder, continued in this one process
    assert got["calls"] == missing and got["result"] == COUNT and got["digest"] == ref_digest
    assert folder_bytes(tmp / f"{name}-on1") == ref_bytes


def test_missing_chunks_fill_each_gap_from_its_start():
    assert missing_chunks([], 5, 2) == [(0, 2), (2, 2), (4, 1)]
    assert missing_chunks([(0, 2), (6, 2)], 11, 2) == [(2, 2), (4, 2), (8, 2), (10, 1)]
    assert missing_chunks([(0, 6)], 10, 4) == [(6, 4)]  # a grown count: the rest in one chunk, as before
    assert missing_chunks([(0, 4), (12, 4)], 10, 4) == [(4, 4), (8, 2)]  # pairs past count are left alone
    assert missing_chunks([(0, 4)], 3, 2) == []
    with pytest.raises(ValueError):
        missing_chunks([], 4, 0)


def test_gap_and_overlap_are_named(tmp_path):
    folder = str(tmp_path / "gap")
    write(tmp_path / "gap", count=COUNT, batch=BATCH)
    full = load_couplings(folder)
    os.remove(os.path.join(folder, chunk_name(4, 6)))
    with pytest.raises(CouplingsError, match="pairs 4…5 .* are missing"):
        load_couplings(folder)
    assert load_couplings(folder, limit=4).digest() == full.head(4).digest()  # a limit before the gap loads
    assert folder_pair_count(folder) == COUNT - 2
    writer = CouplingsWriter(folder, META, prompt_table())
    assert writer.count == 4 and missing_chunks(writer.ranges, COUNT, BATCH) == [(4, 2)]
    with pytest.raises(CouplingsError, match="already in"):
        writer.append(full.noise[5:7], full.x0[5:7], full.prompt_index[5:7], start=5)

    folder = str(tmp_path / "overlap")
    stale = CouplingsWriter(folder, META, prompt_table())  # opened before the other writer's chunks existed
    write(tmp_path / "overlap", count=6, batch=BATCH)
    stale.append(full.noise[2:5], full.x0[2:5], full.prompt_index[2:5], start=2)  # another cut: another name
    for read in (load_couplings, lambda f: CouplingsWriter(f, META, prompt_table())):
        with pytest.raises(CouplingsError, match=r"chunk_000000002-000000004.*chunk_000000002-000000005.* both hold "
                                                 r"pair 2"):
            read(folder)


def test_folders_of_the_older_chunk_names_load_and_continue(tmp_path, reference):
    """Before chunks were named by their range they were numbered in the order written, with the same header
    (here: a run of 8 pairs with batch 4, continued to 10 with batch 3)."""
    folder = str(tmp_path / "old")
    prompts = prompt_table()
    writer = CouplingsWriter(folder, META, prompts)  # the prompt table's file is unchanged
    solver = fake_solver(prompts)
    for k, (start, n) in enumerate([(0, 4), (4, 4), (8, 2)]):
        noise, index = pair_noise(META["seed"], start, n, SHAPE), prompt_indices(start, n, 3)
        _save({"noise": noise, "x0": solver(noise, index, start), "prompt_index": index},
              os.path.join(folder, f"chunk_{k:05d}.safetensors"),
              {"format": FORMAT, "meta": writer.meta, "start": start, "count": n})
    _, ref_digest = reference
    assert len(load_couplings(folder)) == 10 and folder_pair_count(folder) == 10
    got = make(None, folder)
    assert got["calls"] == [10] and got["result"] == COUNT and got["digest"] == ref_digest
    assert {f for f in os.listdir(folder) if f.startswith("chunk")} == {
        "chunk_00000.safetensors", "chunk_00001.safetensors", "chunk_00002.safetensors", chunk_name(10, 11)}
