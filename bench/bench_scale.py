"""Data-parallel scaling of Diff2Flow training, engine level (DESIGN §7).

    python bench/bench_scale.py --out DIR                                   # GPU machine: every GPU it has
    python bench/bench_scale.py --mode full --sharding fsdp --out DIR       # full fine-tune, FSDP-sharded N-rank rows
    python bench/bench_scale.py --arch tiny --device cpu --worlds 1,2 --steps 3 --warmup 1 --out DIR  # CPU smoke

Every rank builds the same random-weight UNet of the real SD1.5 (or SDXL) architecture (the host's own
``UNetModel`` class, bf16, channels-last on GPUs, as D2FTrain's private copy), LoRA rank 16 on the attention
blocks (D2FTrain's default targets), the same synthetic latents and prompts, and trains with the engine's
``Trainer``: the code D2FTrain runs, minus the host's executor. Rows, each in its own processes:

* ``plain``  one process, no process group: the single-process path;
* ``ddp-1``  a process group of one rank: the trained net wrapped in DDP (hooks, a one-rank all-reduce per
  step), the distributed path's own cost before any communication; ``overhead = 1 − ddp-1 / plain``;
* ``ddp-N``  N ranks (NCCL on GPUs, gloo on CPU), ``--batch`` samples per rank;
* ``fsdp-N`` (``--mode full --sharding fsdp``) N ranks of a sharded full fine-tune: FSDP2 on the ResBlocks and
  transformer blocks, then the UNet, float32 masters sharded, weights gathered in bf16 (D2FTrain's sharded path).

``--mode full`` trains every weight (float32 masters under autocast, D2FTrain's full mode) in every row.

The measured window is ``--steps`` optimizer steps after ``--warmup`` steps, between device syncs (the
Trainer's own timing). Global samples/s = N · batch · steps / s; scaling efficiency = samples/s(N) /
(N · samples/s(ddp-1)). Peak memory per rank is torch's max allocated over the whole run, weights included.
``plain`` and ``ddp-1`` run ``--repeats`` times, interleaved, in one process each call.

``--pairs P``: D2FReflowPairs' engine too, at every world size: P pairs (``--pair-steps`` flow-Euler steps, CFG
``--cfg``, ``--batch`` pairs per chunk) made by ``couplings.generate`` with the pairs dealt over the ranks,
timed from the first chunk to the last rank's last chunk on disk; pairs/s and efficiency vs one rank; the
folders' SHA-256 over every chunk's tensors must agree across world sizes (printed, and recorded as
``same_couplings``). This is a benchmark: it prints and writes numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench_train import SD15, SDXL, TINY_SD15  # noqa: E402  (the architectures the other benchmarks use)

ARCHS = {"sd15": (SD15, 64, 77, 768), "sdxl": (SDXL, 128, 77, 2048), "tiny": (TINY_SD15, 8, 8, 768)}


def build_unet(arch: str, device: torch.device, dtype: torch.dtype):
    """The host's UNetModel with a seeded random init (the same on every rank), frozen, cast like D2FTrain."""
    host = os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/ComfyUI")
    sys.path.insert(0, host)
    import comfy.cli_args
    if device.type == "cpu":  # before comfy.model_management is imported: it probes the GPU at import
        comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from d2f_core.training.precision import cast_for_training
    config = dict(ARCHS[arch][0])
    if config.get("num_classes") == "sequential":
        config["adm_in_channels"] = config.get("adm_in_channels", 2816)
    unet = UNetModel(**config, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.uniform_(-fan_in ** -0.5, fan_in ** -0.5, generator=g)
    unet.requires_grad_(False)
    unet.to(device)
    return cast_for_training(unet, dtype, channels_last=device.type == "cuda")


def make_trainer(arch: str, device, dtype, batch: int, steps: int, ctx, checkpointing: bool, mode: str = "lora",
                 sharding: str = "ddp"):
    """The Trainer of one row, its adapters and the context its steps run in. ``mode`` full trains every weight
    (float32 masters, autocast to ``dtype``, as D2FTrain's full mode); ``sharding`` fsdp shards them over ``ctx``'s
    ranks (FSDP2 on the checkpointing blocks, then the UNet: D2FTrain's sharded path)."""
    from d2f_core.flow.bridge import FlowBridge
    from d2f_core.flow.schedule import DiscreteSchedule
    from d2f_core.training.adapters import FullAdapters, LoraAdapters, attention_only
    from d2f_core.training.checkpointing import blocks_by_class_name, checkpointed
    from d2f_core.training.data import LatentBuckets
    from d2f_core.training.trainer import TrainConfig, Trainer
    _, side, tokens, width = ARCHS[arch]
    unet = build_unet(arch, device, dtype)
    g = torch.Generator().manual_seed(1)
    n = 64
    latents = torch.randn(n, 4, side, side, generator=g)
    conds = [{"context": torch.randn(tokens, width, generator=g)} for _ in range(n)]
    if unet.num_classes is not None:
        conds = [dict(c, y=torch.randn(unet.label_emb[0][0].in_features, generator=g)) for c in conds]
    data = LatentBuckets([(latents, conds)], device=device, cond_dtype=dtype)
    block_types = ("ResBlock", "SpatialTransformer")
    blocks = blocks_by_class_name(unet, block_types) if checkpointing else []
    sharded = None
    scopes = []
    if mode == "lora":
        adapters = LoraAdapters(unet, rank=16, alpha=16.0, dtype=torch.float32, device=device,
                                include=attention_only, key_prefix="diffusion_model.", seed=0)
        adapters.attach()
        call = unet  # the hooks do the rest
    elif sharding == "fsdp" and ctx is not None:
        adapters = FullAdapters(unet, dtype=torch.float32, device="cpu", key_prefix="diffusion_model.")
        sharded = adapters.shard(ctx, blocks_by_class_name(unet, block_types), dtype)
        call = adapters
    else:
        adapters = FullAdapters(unet, dtype=torch.float32, device=device, key_prefix="diffusion_model.")
        scopes.append(adapters.installed())
        call = adapters
    channels_last = device.type == "cuda"
    autocast = mode == "full" and dtype != torch.float32

    def net(x, t, context, y=None):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast, cache_enabled=False):
            return call(x, t, context=context, y=y)
    config = TrainConfig(steps=steps, batch_size=batch, learning_rate=1e-4, seed=0, sync_every=10 ** 9)
    trainer = Trainer(net, FlowBridge(DiscreteSchedule.stable_diffusion()), adapters.parameters(), data, config,
                      device=device, compute_dtype=dtype, dist=ctx, sharded=sharded)
    scopes.append(checkpointed(blocks))
    return trainer, adapters, _all(scopes)


@contextlib.contextmanager
def _all(scopes):
    with contextlib.ExitStack() as stack:
        for scope in scopes:
            stack.enter_context(scope)
        yield


def make_pairs(arch: str, device, dtype, args, ctx, folder: str) -> float:
    """Seconds for ``args.pairs`` Reflow pairs into ``folder`` on this rank of ``ctx`` (every rank returns once all
    chunks are written)."""
    from d2f_core.flow.bridge import FlowBridge
    from d2f_core.flow.samplers import flow_sigmas
    from d2f_core.flow.schedule import DiscreteSchedule
    from d2f_core.training.couplings import CouplingsWriter, generate, solve_flow_ode
    _, side, tokens, width = ARCHS[arch]
    unet = build_unet(arch, device, dtype)
    bridge = FlowBridge(DiscreteSchedule.stable_diffusion())
    g = torch.Generator().manual_seed(2)
    cond, uncond = (torch.randn(1, tokens, width, generator=g).to(device, dtype) for _ in range(2))
    y = (torch.randn(1, unet.label_emb[0][0].in_features, generator=g).to(device, dtype)
         if unet.num_classes is not None else None)
    sigmas = flow_sigmas(args.pair_steps, bridge.sigma_max).to(device)

    @torch.no_grad()
    def sample(noise, prompt_index, start):
        n = noise.shape[0]

        def denoise(x, sigma):  # CFG on both halves of one batch, as the host's sampler does
            x_in = bridge.model_input(sigma, x).to(dtype).repeat(2, 1, 1, 1)
            label = bridge.label(sigma).float().repeat(2)
            ctx_ = torch.cat([cond.expand(n, -1, -1), uncond.expand(n, -1, -1)])
            out = unet(x_in, label, context=ctx_, y=None if y is None else y.expand(2 * n, -1)).float()
            c, u = out.chunk(2)
            return bridge.denoised(sigma, u + args.cfg * (c - u), x)
        return solve_flow_ode(denoise, bridge, noise.to(device), sigmas).cpu()

    writer = CouplingsWriter.open(folder, {"bench": arch}, {"context": cond.float().cpu()}, ctx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    generate(writer, args.pairs, args.batch, sample, seed=0, shape=(4, side, side), dist=ctx)
    return time.perf_counter() - t0


def folder_digest(folder: str) -> str:
    from d2f_core.training.couplings import load_couplings
    c = load_couplings(folder)
    h = hashlib.sha256()
    for t in (c.noise, c.x0, c.prompt_index):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def timed_window(trainer, warmup: int, steps: int, scope) -> float:
    """Seconds of ``steps`` optimizer steps after ``warmup`` (Trainer.run syncs the device at its end)."""
    with scope:
        trainer.config.steps = warmup
        trainer.run()
        trainer.config.steps = warmup + steps
        return trainer.run(start_step=warmup).seconds


def _device_of(args, local_rank: int) -> torch.device:
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def worker(rank: int, world: int, args, store: str, out: str):
    """One rank of a ``ddp-N`` row (``world`` ≥ 1), or the interleaved plain / ddp-1 pair when ``world`` is 0."""
    from d2f_core.training.distributed import DistributedContext
    torch.manual_seed(0)
    device = _device_of(args, rank)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "nccl" if device.type == "cuda" else "gloo"
    size = max(1, world)
    dist.init_process_group(backend, store=dist.FileStore(store, size), rank=rank, world_size=size,
                            timeout=timedelta(seconds=600), **({"device_id": device} if backend == "nccl" else {}))
    rows = {}
    try:
        group_ctx = DistributedContext.from_environment(device=device)
        kinds = ["plain", "ddp-1"] * args.repeats if world == 0 else [f"{args.sharding}-{world}"]
        for kind in kinds:
            ctx = None if kind == "plain" else group_ctx
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            trainer, adapters, scope = make_trainer(args.arch, device, dtype, args.batch, args.warmup + args.steps,
                                                    ctx, args.checkpointing, args.mode,
                                                    args.sharding if kind != "ddp-1" else "ddp")
            seconds = timed_window(trainer, args.warmup, args.steps, scope)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            rows.setdefault(kind, []).append({"seconds": seconds, "peak_bytes": peak})
            if args.mode == "lora":
                adapters.detach()
            del trainer, adapters
        if args.pairs:
            folder = os.path.join(out, f"pairs-{max(1, world)}")
            seconds = make_pairs(args.arch, device, dtype, args, group_ctx, folder)
            rows[f"pairs-{max(1, world)}"] = [{"seconds": seconds, "peak_bytes": None,
                                               "digest": folder_digest(folder) if rank == 0 else None}]
        torch.save(rows, os.path.join(out, f"{world}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_world(world: int, args, tmp: str) -> dict:
    """Spawns the processes of one row set; returns rank 0's rows (and every rank's peak memory)."""
    nproc = max(1, world)
    store = os.path.join(tmp, f"store-{world}")
    mp.spawn(worker, args=(world, args, store, tmp), nprocs=nproc, join=True)
    per_rank = [torch.load(os.path.join(tmp, f"{world}-rank{r}.pt")) for r in range(nproc)]
    rows = per_rank[0]
    for kind in rows:
        for i, row in enumerate(rows[kind]):
            row["peak_bytes_per_rank"] = [r[kind][i]["peak_bytes"] for r in per_rank]
    return rows


def summarize(rows: dict, args) -> list[dict]:
    out = []
    base = None
    pairs_base = None
    digests = set()
    for kind, runs in rows.items():
        world = 1 if kind in ("plain", "ddp-1") else int(kind.split("-")[1])
        best = min(r["seconds"] for r in runs)
        if kind.startswith("pairs"):
            pps = args.pairs / best
            pairs_base = pps if world == 1 else pairs_base
            digests.add(runs[0]["digest"])
            out.append({"row": kind, "world": world, "pairs_per_s": pps, "seconds": [best],
                        "efficiency": pps / (world * pairs_base) if pairs_base else None,
                        "digest": runs[0]["digest"]})
            continue
        sps = world * args.batch * args.steps / best
        peaks = [p for r in runs for p in r["peak_bytes_per_rank"] if p is not None]
        row = {"row": kind, "world": world, "samples_per_s": sps, "seconds": [r["seconds"] for r in runs],
               "peak_gib_per_rank": max(peaks) / 2 ** 30 if peaks else None}
        if kind == "ddp-1":
            base = sps
        out.append(row)
    plain = next((r["samples_per_s"] for r in out if r["row"] == "plain"), None)
    for row in out:
        if base and row["row"].startswith(("ddp", "fsdp")):
            row["efficiency"] = row["samples_per_s"] / (row["world"] * base)
        if row["row"] == "ddp-1" and plain:
            row["overhead_vs_plain"] = 1 - row["samples_per_s"] / plain
    if digests:
        for row in out:
            if row["row"].startswith("pairs"):
                row["same_couplings"] = len(digests) == 1
    return out


def markdown(table: list[dict], info: dict) -> str:
    what = "LoRA" if info.get("mode", "lora") == "lora" else f"full fine-tune ({info.get('sharding', 'ddp')} for N ranks)"
    lines = [f"# Data-parallel {what} scaling ({info['arch']}, batch {info['batch']} per rank, "
             f"checkpointing {'on' if info['checkpointing'] else 'off'})", "",
             f"{info['device']}, torch {info['torch']}, commit {info['commit']}, {info['date']}. "
             f"Window: {info['steps']} steps after {info['warmup']} warm-up; best of {info['repeats']} for plain / ddp-1.",
             "", "| row | ranks | samples/s (global) | efficiency vs ddp-1 | overhead vs plain | peak GiB per rank |",
             "|---|---|---|---|---|---|"]
    pairs = [r for r in table if r["row"].startswith("pairs")]
    table = [r for r in table if not r["row"].startswith("pairs")]
    for r in table:
        eff = f"{r['efficiency']:.1%}" if "efficiency" in r else ""
        over = f"{r['overhead_vs_plain']:+.1%}" if "overhead_vs_plain" in r else ""
        peak = f"{r['peak_gib_per_rank']:.2f}" if r["peak_gib_per_rank"] is not None else "n/a (CPU)"
        lines.append(f"| {r['row']} | {r['world']} | {r['samples_per_s']:.2f} | {eff} | {over} | {peak} |")
    if pairs:
        lines += ["", f"Reflow pairs: {info['pairs']} pairs, {info['pair_steps']} flow-Euler steps, cfg {info['cfg']}, "
                  f"{info['batch']} pairs per chunk.", "",
                  "| ranks | pairs/s | efficiency vs 1 rank | same couplings as every other world size |", "|---|---|---|---|"]
        for r in pairs:
            eff = f"{r['efficiency']:.1%}" if r.get("efficiency") else ""
            lines.append(f"| {r['world']} | {r['pairs_per_s']:.2f} | {eff} | {'yes' if r.get('same_couplings') else 'NO'} "
                         f"(sha256 {r['digest'][:12]}) |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8, help="samples per rank")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--mode", choices=["lora", "full"], default="lora", help="LoRA (rank 16, attention) or full")
    p.add_argument("--sharding", choices=["ddp", "fsdp"], default="ddp",
                   help="the N-rank rows: replicated (DDP) or, with --mode full, sharded (FSDP2)")
    p.add_argument("--pairs", type=int, default=0, help="Reflow pairs per world size (0: no pair rows)")
    p.add_argument("--pair-steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--worlds", default="", help="rank counts of the ddp-N rows (default: 2..every GPU)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.sharding == "fsdp" and args.mode != "full":
        p.error("--sharding fsdp shards a full fine-tune: add --mode full")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    worlds = [int(w) for w in args.worlds.split(",") if w] if args.worlds else list(range(2, gpus + 1))
    worlds = [w for w in worlds if w > 1]
    if args.device == "cuda" and any(w > gpus for w in worlds):
        sys.exit(f"asked for {max(worlds)} ranks but this machine has {gpus} GPUs")
    os.makedirs(args.out, exist_ok=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in [0] + worlds:
            t0 = time.perf_counter()
            rows.update(run_world(world, args, tmp))
            print(f"world {world or '1 (plain, ddp-1)'}: {time.perf_counter() - t0:.0f} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    info = {"arch": args.arch, "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "checkpointing": args.checkpointing, "pairs": args.pairs, "mode": args.mode, "sharding": args.sharding,
            "pair_steps": args.pair_steps, "cfg": args.cfg, "torch": torch.__version__, "commit": commit or "unknown",
            "date": datetime.date.today().isoformat(),
            "device": (f"{gpus} × {torch.cuda.get_device_name(0)}" if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)")}
    table = summarize(rows, args)
    text = markdown(table, info)
    print(text)
    stem = os.path.join(args.out, f"scale_{args.arch}" + ("" if args.mode == "lora" else f"_full_{args.sharding}"))
    with open(stem + ".json", "w") as f:
        json.dump({"info": info, "rows": table, "raw": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
