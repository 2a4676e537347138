"""Reflow couplings: (noise ε, the model's own ODE solution x̂0, prompt) triples, on disk and in memory.

Reflow (DESIGN §2) trains on pairs the model itself produced: draw ε, solve the model's flow ODE (with
CFG and the prompt) from ε down to σ = 0, keep (ε, x̂0), and train on the straight line between them,

    x = (1-σ)·x̂0 + σ·ε,   target v = ε - x̂0,

which straightens the sampling paths so that 1–4 Euler steps land close to where the full ODE lands.

The ε trained on is the noise end of the straight line through the state the sampler really started
from. An SD schedule ends at σ_0 = σ_max < 1 (nonzero terminal SNR), and every sampler starts there from
the host's max-denoise state D(σ_0)·ε, which is not the interpolant (1-σ_0)·x̂0 + σ_0·ε. The line through
that start and x̂0 ends at σ = 1 in

    ε' = (D(σ_0)·ε - (1-σ_0)·x̂0) / σ_0            (``noise_through_start``)

and training on ε' teaches the velocity the few-step sampler needs at the states it visits. Training on ε
itself would learn a line that misses the start by (1-σ_0)·x̂0 - (D(σ_0) - σ_0)·ε, and the straightened
flow would land on a shrunken x̂0. Files keep the drawn ε; ε' is derived when training reads the pairs.

Layout of a couplings folder (every file written with ``files.atomic_save``: complete or absent, never
replacing an existing file; a damaged file raises ``CouplingsError`` naming it):

* ``prompts.safetensors``: the prompt table, tensors ``prompt.<kwarg>`` shaped (P, …) in float32 (the
  UNet's conditioning keyword tensors, e.g. ``context`` (P, 77, 768) and SDXL's ``y`` (P, 2816)), stored
  once per prompt; header ``{format, meta, num_prompts}``.
* ``chunk_<start>-<stop>.safetensors`` (9-digit numbers): ``noise`` and ``x0`` (n, C, H, W) float32 and
  ``prompt_index`` (n,) int64 of pairs [start, stop), n = stop - start; header ``{format, meta, start, count}``.
  Folders written before chunks were named by their range call them ``chunk_00000.safetensors``,
  ``chunk_00001.safetensors``, … in the order written, with the same header; they are read and continued
  alike, since a chunk's pairs are its header's, not its name's.

The header is one safetensors metadata entry, ``d2f_couplings``, holding sorted JSON (so equal contents are
equal bytes).

The chunks of a folder must not overlap (two files holding one pair: mixed runs, refused). The pairs
loaded are [0, n) with no gap: a gap before the pairs asked for raises an error naming the missing pairs;
pairs after it stay on disk until a run fills it.

Chunks are written as they are generated, so an interruption loses at most the chunk being made.
Pair i's noise is a function of (seed, i) only (``pair_noise``) and its prompt is i mod P, so a folder
reopened with the same meta continues exactly where it stopped. The chunks a run still has to make are a
function of the folder alone (``missing_chunks``: each gap in [0, count) cut into pieces of the batch size
from its start), and each names its own pair range, so a resumed run writes the files an uninterrupted one
would have written, and several processes (torch.distributed ranks, DESIGN §7) can share them out
(``generate``): the pairs are the same tensors whatever the world size, and a run stopped on N ranks can be
continued on any other number.

``meta`` identifies what the pairs are samples of (model, prompts, negative, cfg, steps, shift, seed,
latent format, shape, …). Reopening a folder with a different identity is refused: the pairs would be
samples of two different ODEs. Keys in ``INFO_KEYS`` (pack version, batch size) are recorded only.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from ..flow.bridge import FlowBridge
from ..storage.files import DamagedFileError, atomic_save, is_temp_file, read_header, read_tensors
from ..flow.samplers import sample_euler_flow
from .distributed import DistributedContext

FORMAT = "d2f_couplings"
FORMAT_VERSION = 1
PROMPTS_FILE = "prompts.safetensors"
CHUNK_RE = re.compile(r"^chunk_\d{5,}(-\d{5,})?\.safetensors$")  # chunk_<start>-<stop>, or the older chunk_<k>
INFO_KEYS = frozenset({"pack_version", "batch_size"})  # recorded, not part of a folder's identity


class CouplingsError(ValueError):
    """A couplings folder cannot be used as asked (different meta, damaged, empty)."""


def chunk_name(start: int, stop: int) -> str:
    """The file of pairs [start, stop). Chunks of disjoint ranges have different names, so writers (ranks,
    runs) never race for one file; two writers of one range do, and the second gets FileExistsError."""
    return f"chunk_{start:09d}-{stop:09d}.safetensors"


# --- noise and prompts of pair i ---------------------------------------------------------------------
def pair_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for pair ``index`` of a run with ``seed`` (a hash: no two (seed, i) share it
    in practice, unlike seed·K + i)."""
    digest = hashlib.blake2b(f"d2f-reflow:{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def pair_noise(seed: int, start: int, count: int, shape) -> torch.Tensor:
    """Standard normal ε for pairs ``start … start+count-1``, (count, *shape) float32 on the CPU.
    Pair i's noise depends on (seed, i) only: not on the batch it is made in, nor on earlier pairs."""
    shape = tuple(int(s) for s in shape)
    out = torch.empty((count,) + shape, dtype=torch.float32)
    g = torch.Generator(device="cpu")
    for j in range(count):
        g.manual_seed(pair_seed(seed, start + j))
        out[j] = torch.randn(shape, generator=g, dtype=torch.float32)
    return out


def prompt_indices(start: int, count: int, num_prompts: int) -> torch.Tensor:
    """Prompts cycle: pair i uses prompt i mod P."""
    return torch.arange(start, start + count, dtype=torch.int64) % max(1, int(num_prompts))


# --- the ODE that defines a coupling -----------------------------------------------------------------
@torch.no_grad()
def solve_flow_ode(denoise: Callable, bridge: FlowBridge, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x̂0 of one coupling: Euler on dx/dσ = (x - x̂0(x, σ))/σ over ``sigmas`` (σ_max … 0), from the host's
    max-denoise start x = D(σ_max)·ε (``FlowBridge.start_state``), as D2FReflowPairs samples through the host.
    ``denoise(x, σ_batch) -> x̂0`` (guided or not)."""
    x = bridge.start_state(sigmas[:1], noise, torch.zeros_like(noise), max_denoise=True)
    return sample_euler_flow(denoise, x, sigmas)


# --- in memory ---------------------------------------------------------------------------------------
def noise_through_start(noise: torch.Tensor, x0: torch.Tensor, sigma_start: float) -> torch.Tensor:
    """ε' = (D(σ_0)·ε - (1-σ_0)·x̂0) / σ_0: then (1-σ_0)·x̂0 + σ_0·ε' = D(σ_0)·ε, the max-denoise start.

    The two coefficients D(σ_0)/σ_0 and (1-σ_0)/σ_0 are host numbers (Python doubles); the tensors are
    combined in float32 or better (float64 only for float64 inputs), on their device, and returned in
    ``noise.dtype``: no float64 is made on a device that lacks it. σ_0 = 1 gives ε back (D(1) = 1).
    """
    s0 = float(sigma_start)
    if not 0.0 < s0 <= 1.0:
        raise CouplingsError(f"the start time σ_0 must be in (0, 1], got {s0}")
    a, b = math.hypot(1 - s0, s0) / s0, (1 - s0) / s0
    dtype = torch.promote_types(torch.promote_types(noise.dtype, x0.dtype), torch.float32)
    through = a * noise.to(dtype) - b * x0.to(dtype)
    return through.to(noise.dtype)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Couplings:
    """N pairs in the model's working latent space (``process_in``'d), float32, with a prompt table.

    ``prompts``: dict kwarg → (P, …) float32 (may be empty for unconditional models); ``prompt_index``:
    (N,) int64 rows into it; ``meta``: what the pairs are samples of (see the module docstring).
    """

    noise: torch.Tensor
    x0: torch.Tensor
    prompts: dict[str, torch.Tensor]
    prompt_index: torch.Tensor
    meta: dict = field(default_factory=dict)
    folder: str | None = None

    def __post_init__(self):
        if self.x0.ndim != 4 or self.noise.shape != self.x0.shape:
            raise CouplingsError(f"couplings need noise and x0 of one shape (N, C, H, W), got "
                                 f"{tuple(self.noise.shape)} and {tuple(self.x0.shape)}")
        if self.prompt_index.shape != (self.x0.shape[0],):
            raise CouplingsError(f"prompt_index must be ({self.x0.shape[0]},), got {tuple(self.prompt_index.shape)}")
        sizes = {v.shape[0] for v in self.prompts.values()}
        if len(sizes) > 1:
            raise CouplingsError(f"the prompt table's tensors disagree on the number of prompts: {sorted(sizes)}")
        if len(self) and self.prompts:
            lo, hi = int(self.prompt_index.min()), int(self.prompt_index.max())
            if lo < 0 or hi >= self.num_prompts:
                raise CouplingsError(f"prompt_index spans {lo}…{hi} but the table has {self.num_prompts} prompts")

    def __len__(self) -> int:
        return int(self.x0.shape[0])

    @property
    def num_prompts(self) -> int:
        return int(next(iter(self.prompts.values())).shape[0]) if self.prompts else 1

    @property
    def shape(self) -> tuple:
        """(C, H, W) of one latent."""
        return tuple(self.x0.shape[1:])

    def prompt_conditioning(self, p: int) -> dict[str, torch.Tensor]:
        return {k: v[p] for k, v in self.prompts.items()}

    def conditioning(self, i: int) -> dict[str, torch.Tensor]:
        """The UNet keyword tensors (no batch dim) of pair i."""
        return self.prompt_conditioning(int(self.prompt_index[i]))

    def head(self, n: int) -> "Couplings":
        """The first ``n`` pairs (all when n ≥ N)."""
        if n >= len(self):
            return self
        return Couplings(self.noise[:n], self.x0[:n], self.prompts, self.prompt_index[:n], dict(self.meta), self.folder)

    @property
    def start_sigma(self) -> float | None:
        """σ_0 of the max-denoise start D(σ_0)·ε the pairs were sampled from (meta ``sigma_max``, which
        D2FReflowPairs records), or None when the maker did not say."""
        value = self.meta.get("sigma_max")
        return None if value is None else float(value)

    def line_noise(self) -> torch.Tensor:
        """The noise to train on: ε' of :func:`noise_through_start` when the start is known, else ε."""
        if self.start_sigma is None:
            return self.noise
        return noise_through_start(self.noise, self.x0, self.start_sigma)

    def buckets(self) -> list[tuple]:
        """LatentBuckets input: [(x0 (N,C,H,W), per-sample conditioning dicts, noise (N,C,H,W))], the
        noise being :meth:`line_noise`. The dicts are views of the table rows (no copies); LatentBuckets
        stacks them once."""
        if not len(self):
            return []
        table = [self.prompt_conditioning(p) for p in range(self.num_prompts)]
        return [(self.x0, [table[p] for p in self.prompt_index.tolist()], self.line_noise())]

    def digest(self) -> str:
        """sha256 of every tensor and the meta: equal digests ⇔ bit-identical couplings."""
        tensors = {"noise": self.noise, "x0": self.x0, "prompt_index": self.prompt_index,
                   **{f"prompt.{k}": v for k, v in self.prompts.items()}}
        return hashlib.sha256((_digest(tensors) + _meta_json(self.meta)).encode()).hexdigest()


def couplings_buckets(items: list[Couplings]) -> list[tuple]:
    """Several couplings (e.g. two resolutions, or two runs) as LatentBuckets input, one bucket per latent
    shape: [(x0, conds, noise)]."""
    by_shape: dict[tuple, tuple[list, list, list]] = {}
    for c in items:
        for x0, conds, noise in c.buckets():
            group = by_shape.setdefault(tuple(x0.shape[1:]), ([], [], []))
            group[0].append(x0)
            group[1].extend(conds)
            group[2].append(noise)
    return [(torch.cat(x0s), conds, torch.cat(noises)) for x0s, conds, noises in by_shape.values()]


# --- on disk -----------------------------------------------------------------------------------------
def _meta_json(meta: dict) -> str:
    try:
        return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CouplingsError(f"couplings meta must be plain JSON (numbers, strings, lists, dicts): {exc}") from None


def _identity(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in INFO_KEYS}


HEADER_KEY = "d2f_couplings"


def _save(tensors: dict[str, torch.Tensor], path: str, header: dict) -> str:
    """One metadata entry holding the header as sorted JSON: safetensors keeps metadata in a hash map whose
    order varies between runs, so several entries would make equal contents give different bytes. A file
    that already exists is never replaced (another writer got there first: an error)."""
    return atomic_save(tensors, path, {HEADER_KEY: json.dumps(header, sort_keys=True, separators=(",", ":"))})


def _header(metadata: dict | None) -> dict:
    try:
        return json.loads((metadata or {})[HEADER_KEY])
    except (KeyError, TypeError, ValueError):
        return {}


def _read_metadata(path: str) -> dict:
    try:
        return _header(read_header(path, "couplings file"))
    except DamagedFileError as exc:
        raise CouplingsError(str(exc)) from None


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header) of a couplings file."""
    try:
        tensors, metadata = read_tensors(path, "couplings file")
    except DamagedFileError as exc:
        raise CouplingsError(str(exc)) from None
    return tensors, _header(metadata)


def _folder_meta(folder: str) -> tuple[dict, int]:
    path = os.path.join(folder, PROMPTS_FILE)
    header = _read_metadata(path)
    if header.get("format") != FORMAT or not isinstance(header.get("meta"), dict):
        raise CouplingsError(f"'{path}' is not a Diff2Flow couplings file")
    return header["meta"], int(header.get("num_prompts", 0))


def _chunk_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if CHUNK_RE.match(name))


def _scan_chunks(folder: str) -> list[tuple[str, int, int]]:
    """[(path, start, count)] of the folder's chunks by start, checked not to overlap (gaps are allowed: a
    stopped run on several ranks leaves them)."""
    out = []
    for path in _chunk_files(folder):
        header = _read_metadata(path)
        start, count = int(header.get("start", -1)), int(header.get("count", -1))
        if start < 0 or count < 0:
            raise CouplingsError(f"couplings chunk '{path}' names no pair range in its header: it is damaged. "
                                 "Delete it and rerun D2FReflowPairs to remake its pairs.")
        out.append((path, start, count))
    out.sort(key=lambda c: c[1])
    for (path_a, start_a, count_a), (path_b, start_b, _) in zip(out, out[1:]):
        if start_b < start_a + count_a:
            raise CouplingsError(f"couplings chunks '{path_a}' and '{path_b}' both hold pair {start_b}: the folder "
                                 "mixes runs and is damaged. Use a new name.")
    return out


def folder_pair_count(folder: str) -> int:
    """Pairs on disk in a couplings folder, after a gap too (0 when it does not exist); reads file headers only."""
    if not os.path.isfile(os.path.join(folder, PROMPTS_FILE)):
        return 0
    try:
        return sum(count for _, _, count in _scan_chunks(folder))
    except (CouplingsError, OSError, ValueError):
        return 0


def is_couplings_folder(folder: str) -> bool:
    try:
        _folder_meta(folder)
        return True
    except (OSError, CouplingsError, ValueError, json.JSONDecodeError):
        return False


class CouplingsWriter:
    """Writes chunks of pairs to a couplings folder; reopening a folder resumes it.

    ``CouplingsWriter(folder, meta, prompts)``: a new folder is created with the prompt table; an existing
    one must have the same identity (``meta`` minus ``INFO_KEYS``) and the same prompt table, else a
    ``CouplingsError`` names what differs. ``ranges`` are the (start, n) of the chunks there, by start;
    ``count`` the pairs 0 … count-1 they hold without a gap; ``append`` writes a chunk of new pairs.
    ``create=False`` opens a folder that another process (rank 0, see :meth:`open`) set up: it must exist,
    and only the creator removes leftovers of killed writes, so no temp file of a live writer is touched.
    """

    def __init__(self, folder: str, meta: dict, prompts: dict[str, torch.Tensor] | None = None, *,
                 create: bool = True):
        self.folder = os.path.abspath(folder)
        self.meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
        self.meta = json.loads(_meta_json(self.meta))  # plain JSON: what a reader gets back
        prompts = {k: v.detach().float().cpu().contiguous() for k, v in (prompts or {}).items()}
        sizes = {v.shape[0] for v in prompts.values()}
        if len(sizes) > 1:
            raise CouplingsError(f"the prompt table's tensors disagree on the number of prompts: {sorted(sizes)}")
        self.num_prompts = sizes.pop() if sizes else 1
        prompts_path = os.path.join(self.folder, PROMPTS_FILE)
        if os.path.isfile(prompts_path):
            self._check_existing(prompts)
        elif not create:
            raise CouplingsError(f"'{self.folder}' has no {PROMPTS_FILE}, although the process that sets the folder "
                                 "up made it: every process must see the same folder (one shared file system).")
        else:
            if os.path.isdir(self.folder) and _chunk_files(self.folder):
                raise CouplingsError(f"'{self.folder}' holds couplings chunks but no {PROMPTS_FILE}: the folder is "
                                     "damaged. Delete it or use a new name.")
            os.makedirs(self.folder, exist_ok=True)
            _save({f"prompt.{k}": v for k, v in prompts.items()}, prompts_path,
                         {"format": FORMAT, "meta": self.meta, "num_prompts": self.num_prompts})
        if create:
            for name in os.listdir(self.folder):  # leftovers of a write that was cut off
                if is_temp_file(name):
                    os.remove(os.path.join(self.folder, name))
        self.rescan()

    @classmethod
    def open(cls, folder: str, meta: dict, prompts: dict[str, torch.Tensor] | None = None,
             dist: DistributedContext | None = None) -> "CouplingsWriter":
        """This rank's writer of a folder shared by the ranks of ``dist`` (None: one process, the constructor).

        Rank 0 opens first: it alone creates the folder, writes the prompt table and removes leftovers. A
        collective, then the other ranks open what it made (``create=False``); a second collective, so that no
        rank writes before every rank has read the chunks there: all deal out the same missing chunks. A
        failure on any rank is raised on every rank (no rank is left waiting in a collective).
        """
        ctx = dist or DistributedContext.single()
        writer = None
        for my_turn in (ctx.is_main, not ctx.is_main):
            error = None
            if my_turn:
                try:
                    writer = cls(folder, meta, prompts, create=ctx.is_main)
                except (ValueError, OSError) as exc:
                    error = exc
            if ctx.any(error is not None):
                raise error or CouplingsError(f"another rank could not open the couplings folder '{folder}' (see "
                                              "its error)")
        return writer

    def rescan(self) -> None:
        """Read which pairs the folder holds, whoever wrote them (e.g. the other ranks)."""
        self.ranges = [(start, n) for _, start, n in _scan_chunks(self.folder)]

    @property
    def count(self) -> int:
        """Pairs 0 … count-1 are on disk; ``ranges`` may hold more after a gap."""
        end = 0
        for start, n in self.ranges:
            if start != end:
                break
            end += n
        return end

    def _check_existing(self, prompts: dict[str, torch.Tensor]):
        old, num_prompts = _folder_meta(self.folder)
        a, b = _identity(old), _identity(self.meta)
        if a != b:
            diffs = [f"{k}: {_short(a.get(k))} there, {_short(b.get(k))} now" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k)]
            raise CouplingsError(
                f"the couplings in '{self.folder}' were made with different settings ({'; '.join(diffs)}). Its pairs "
                "are samples of another model/prompt/guidance and cannot be continued: use a new name, or set the "
                "inputs back to what they were.")
        table, _ = _read(os.path.join(self.folder, PROMPTS_FILE))
        old_prompts = {k[len("prompt."):]: v for k, v in table.items() if k.startswith("prompt.")}
        if set(old_prompts) != set(prompts) or num_prompts != self.num_prompts or any(
                old_prompts[k].shape != prompts[k].shape or not torch.equal(old_prompts[k], prompts[k]) for k in prompts):
            raise CouplingsError(f"the couplings in '{self.folder}' were made for other prompts: use a new name, or "
                                 "connect the same prompts again.")

    def append(self, noise: torch.Tensor, x0: torch.Tensor, prompt_index: torch.Tensor, start: int | None = None) -> str:
        """Write pairs [start, start+n) (by default start = ``count``) as one chunk, atomically; returns its path.
        They must be new to this writer; a chunk of the same range written meanwhile by another raises
        FileExistsError (``chunk_name``), one of another range overlapping it is refused when the folder is read."""
        start = self.count if start is None else int(start)
        n = int(x0.shape[0])
        if noise.shape != x0.shape or prompt_index.shape != (n,):
            raise CouplingsError(f"a chunk needs noise/x0 (n, C, H, W) and prompt_index (n,), got "
                                 f"{tuple(noise.shape)}, {tuple(x0.shape)}, {tuple(prompt_index.shape)}")
        if any(s < start + n and start < s + c for s, c in self.ranges):
            raise CouplingsError(f"pairs {start}…{start + n - 1} are already in '{self.folder}'")
        path = os.path.join(self.folder, chunk_name(start, start + n))
        _save({"noise": noise.float(), "x0": x0.float(), "prompt_index": prompt_index.to(torch.int64)}, path,
                     {"format": FORMAT, "meta": self.meta, "start": start, "count": n})
        bisect.insort(self.ranges, (start, n))
        return path


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value) if value is not None else "absent"
    return text if len(text) <= limit else text[:limit - 1] + "…"


def load_couplings(folder: str, limit: int | None = None) -> Couplings:
    """Pairs 0 … N-1 of ``folder`` (N: all, or the first ``limit``), bit-identical to what was written.

    The chunks must follow each other from pair 0 up to the pairs asked for: a gap there (pairs a stopped
    run on several ranks did not make, or a deleted chunk) raises an error naming the missing pairs. Fewer
    pairs than ``limit`` at the end is not a gap: the pairs there are returned.
    """
    folder = os.path.abspath(folder)
    if not os.path.isfile(os.path.join(folder, PROMPTS_FILE)):
        raise CouplingsError(f"no Diff2Flow couplings in '{folder}' (no {PROMPTS_FILE}): make them with "
                             "D2FReflowPairs first")
    meta, _ = _folder_meta(folder)
    table, _ = _read(os.path.join(folder, PROMPTS_FILE))
    prompts = {k[len("prompt."):]: v for k, v in table.items() if k.startswith("prompt.")}
    noise, x0, index = [], [], []
    have = 0
    for path, start, count in _scan_chunks(folder):
        if limit is not None and have >= limit:
            break
        if start != have:
            raise CouplingsError(f"pairs {have}…{start - 1} of the couplings in '{folder}' are missing (a stopped run, "
                                 "or a deleted chunk): run D2FReflowPairs again with the same inputs to make them, or "
                                 f"load at most {have} pairs (limit).")
        tensors, header = _read(path)
        if _identity(header.get("meta", {})) != _identity(meta):
            raise CouplingsError(f"'{path}' was made with other settings than '{folder}': the folder mixes runs")
        missing = {"noise", "x0", "prompt_index"} - set(tensors)
        if missing:
            raise CouplingsError(f"couplings chunk '{path}' lacks {sorted(missing)}: it is damaged. Delete it, then "
                                 "rerun D2FReflowPairs with the same inputs to remake its pairs.")
        noise.append(tensors["noise"])
        x0.append(tensors["x0"])
        index.append(tensors["prompt_index"])
        have += count
    if not x0:
        raise CouplingsError(f"the couplings folder '{folder}' holds no pairs yet")
    out = Couplings(torch.cat(noise), torch.cat(x0), prompts, torch.cat(index), meta, folder)
    return out.head(limit) if limit is not None else out


# --- the generation loop -----------------------------------------------------------------------------
def missing_chunks(ranges: list[tuple[int, int]], count: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, n) of the chunks that make pairs [0, count) complete, given the (start, n) ``ranges`` on disk
    (by start, disjoint): each gap cut into pieces of ``batch_size`` from the gap's start.

    A function of the folder alone, so every rank computes the same list. From an empty folder the chunks are
    [k·B, (k+1)·B); a run stopped between chunks leaves gaps that start on that grid, so continuing it with
    the same B, on any number of ranks, writes exactly the chunks an uninterrupted run writes.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    out, done = [], 0  # done: the end of the chunks seen so far
    for start, n in [*ranges, (count, 0)]:
        stop = min(start, count)
        out.extend((s, min(batch_size, stop - s)) for s in range(done, stop, batch_size))
        done = max(done, start + n)
    return out


def _make_chunk(writer: CouplingsWriter, start: int, n: int, sample: Callable, seed: int, shape) -> None:
    noise = pair_noise(seed, start, n, shape)
    index = prompt_indices(start, n, writer.num_prompts)
    x0 = sample(noise, index, start)
    writer.append(noise, x0.detach().float().cpu(), index, start)


def generate(writer: CouplingsWriter, count: int, batch_size: int, sample: Callable, *, seed: int, shape,
             should_stop: Callable[[], bool] | None = None, dist: DistributedContext | None = None) -> int:
    """Make the pairs of [0, count) the folder lacks: the chunks of :func:`missing_chunks`, dealt round-robin
    to the ranks of ``dist`` (rank r makes chunks r, r+N, r+2N, …; None: one process makes them all), each
    written by its maker as soon as it is done. ``writer`` is this rank's (:meth:`CouplingsWriter.open`).

    ``sample(noise (n,C,H,W) float32 CPU, prompt_index (n,), start) -> x̂0 (n,C,H,W)`` solves the ODE; pair
    i's noise and prompt depend on i only, so the folder holds the same tensors whatever the world size.

    Before each round of N chunks every rank takes part in one ``dist.any`` of "stop": its ``should_stop()``,
    or an exception its last chunk raised (e.g. the host's interrupt, out of memory). So a stop on any rank
    ends every rank after the chunk it is making, with every finished chunk on disk. One more ``any`` after
    the last round: when it returns every rank's chunks are written, and the folder is read again. The
    exception is then raised on the rank that had it. World size 1 issues no collective.
    Returns ``writer.count``: the pairs from 0 on without a gap, counting every rank's chunks.
    """
    ctx = dist or DistributedContext.single()
    chunks = missing_chunks(writer.ranges, count, batch_size)
    mine = ctx.deal(chunks)
    rounds = -(-len(chunks) // ctx.world_size)  # rank 0's share, the largest: every rank runs as many rounds
    error = None
    for k in range(rounds):
        if ctx.any(error is not None or (should_stop is not None and should_stop())):
            break
        if k < len(mine):
            try:
                _make_chunk(writer, *mine[k], sample, seed, shape)
            except BaseException as exc:  # held until every rank has heard of it: none waits for this one
                error = exc
    else:
        ctx.any(error is not None)  # the last round's chunks are on disk on every rank
    writer.rescan()
    if error is not None:
        raise error
    return writer.count
