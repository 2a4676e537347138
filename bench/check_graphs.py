"""CUDA-graph correctness check: D2FTrain with ``cuda_graphs`` on vs off, same seed, every setting.

    python bench/check_graphs.py --out DIR            # on the GPU machine
    python bench/check_graphs.py --quick --out DIR    # a few settings

For each setting (mode LoRA / full × gradient checkpointing on / off × gradient accumulation 1, 2, 4, 8 ×
one or three resolution buckets, plus ``compile`` on for a subset) D2FTrain runs twice on the same
random-weight real-architecture UNet through the host's executor path: once replaying CUDA graphs, once
eagerly. The trained weights it returns (LoRA factors, or full-mode weight differences) are compared:

    rel = max |θ_graphed − θ_eager| / max |θ_eager − θ_init|        (over every trained tensor)

i.e. the disagreement measured against the size of what training changed. Each run also reports whether the
graphs were really used (or fell back to eager, with the logged reason), and whether the process's default
CUDA generator still works afterwards (a failed capture can leave it unusable). cuDNN runs deterministic
here so that eager kernels are the same on both sides. Writes ``graphs_check.json`` and ``graphs_check.md``.
This is a check that reports; the pass criterion (rel ≤ 1e-6, graphs used, RNG intact) is in the table.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402  (host boot, node call, UNet files)

TOLERANCE = 1e-6
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (before CUDA starts)


class WarningLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def graphs_used(fn):
    """Runs ``fn`` and counts CUDA-graph replays (``torch.cuda.CUDAGraph.replay`` calls)."""
    import torch
    if not torch.cuda.is_available():
        return fn(), 0
    real = torch.cuda.CUDAGraph.replay
    count = [0]

    def counted(self, *a, **k):
        count[0] += 1
        return real(self, *a, **k)
    torch.cuda.CUDAGraph.replay = counted
    try:
        return fn(), count[0]
    finally:
        torch.cuda.CUDAGraph.replay = real


@contextlib.contextmanager
def capture_failing(on: bool):
    """Fault injection: the network synchronises the device while it is being captured, which invalidates the
    capture (as any host sync in a user's network would). D2FTrain must fall back to eager training, log the
    reason once, train exactly what eager training trains, and leave the default CUDA generator usable."""
    if not on:
        yield
        return
    import torch
    graphs = next(m for n, m in sys.modules.items() if n.endswith("d2f_core.training.graphs"))
    real = graphs._Positional.forward

    def syncing(self, *args):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()
        return real(self, *args)
    graphs._Positional.forward = syncing
    try:
        yield
    finally:
        graphs._Positional.forward = real


def dataset(arch_size: int, buckets: int, n_per_bucket: int, ctx_dim: int):
    """Latent buckets as ResolutionBucket outputs: one LATENT and a list of conditionings per resolution."""
    import torch
    g = torch.Generator().manual_seed(1)
    sizes = [arch_size, arch_size + 8, arch_size - 8][:buckets]
    latents = [{"samples": torch.randn(n_per_bucket, 4, s, s, generator=g)} for s in sizes]
    positive = [[[torch.randn(1, 77, ctx_dim, generator=g), {}] for _ in range(n_per_bucket)] for _ in sizes]
    return latents, positive


def train(nodes, model, latents, positive, graphs: bool, **settings):
    out = bench_train.run_node(nodes, "D2FTrain", lists=("latents", "positive"), model=model, latents=latents, positive=positive,
                               rank=8, alpha=8.0, training_dtype="bf16", seed=3, run_name="graphs_check",
                               lora_targets="all", cuda_graphs=graphs, **settings)
    lora = out.result[1] if hasattr(out, "result") else out[1]
    return {k: v.detach().float().cpu().clone() for k, v in lora.items()}


def compare(graphed: dict, eager: dict) -> float:
    """max |graphed − eager| over every trained tensor, relative to the largest change training made: the
    tensors that start at zero (LoRA up factors; full mode's weight differences) are that change."""
    num = max(float((graphed[k] - eager[k]).abs().max()) for k in eager)
    moved = [k for k in eager if "lora_up" in k or k.endswith((".diff", ".diff_b"))]
    den = max(float(eager[k].abs().max()) for k in moved)
    return num / den if den > 0 else float("inf")


def rng_ok() -> str:
    import torch
    if not torch.cuda.is_available():
        return "n/a (CPU)"
    try:
        torch.randn(4, device="cuda")
        torch.cuda.synchronize()
        return "ok"
    except Exception as exc:  # what a broken capture leaves behind
        return f"{type(exc).__name__}: {str(exc)[:120]}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="LoRA without checkpointing only")
    ap.add_argument("--arch", choices=["sd15", "tiny"], default="sd15", help="UNet of the non-compiled rows")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--acc", default="1,2,4,8", help="gradient accumulation settings")
    ap.add_argument("--compile", choices=["none", "subset"], default="subset")
    ap.add_argument("--out", default=os.path.join(bench_train.ROOT, "bench", "out"))
    args = ap.parse_args(argv)

    import torch
    nodes = bench_train.boot_host()
    import comfy.sd
    # Deterministic kernels on both sides, so that the only difference left is the graphs (the eager-vs-eager
    # column shows what is left of run-to-run noise).
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    log = WarningLog()
    logging.getLogger().addHandler(log)
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "unets")
    os.makedirs(work, exist_ok=True)

    models = {}

    def model_for(arch):
        if arch not in models:
            path = os.path.join(work, f"{arch}.safetensors")
            bench_train.write_unet(path, bench_train.SD15 if arch == "sd15" else bench_train.TINY_SD15,
                                   "cuda" if torch.cuda.is_available() else "cpu")
            models[arch] = comfy.sd.load_diffusion_model(path)
        return models[arch]

    grid = []
    accs = tuple(int(a) for a in args.acc.split(","))
    for mode, ckpt, acc, buckets in itertools.product(("lora", "full"), (True, False), accs, (1, 3)):
        if args.quick and (mode == "full" or ckpt) or mode == "full" and (acc not in (1, 4) or buckets > 1):
            continue  # full mode: a reload of ~1 B float32 masters per run; accumulation 1 and 4 cover it
        grid.append(dict(arch=args.arch, mode=mode, ckpt=ckpt, acc=acc, buckets=buckets, compile=False))
    grid.append(dict(arch=args.arch, mode="lora", ckpt=False, acc=2, buckets=3, compile=False, fault=True))
    if args.compile == "subset":  # compiling costs ~1 min a shape: the tiny real-layout UNet, two settings
        grid += [dict(arch="tiny", mode="lora", ckpt=False, acc=4, buckets=2, compile=True)]

    rows = []
    table = ""
    for s in grid:
        model = model_for(s["arch"])
        latents, positive = dataset(32, s["buckets"], 4, 768)
        # SGD: an update linear in the gradient, so rounding-level differences stay rounding-level (Adam's first
        # steps move every weight by ≈ lr·sign(g), which turns 1-ulp noise in a near-zero gradient into a full step:
        # measured with AdamW on an H100, two eager runs already differed by the whole trained change).
        settings = dict(mode=s["mode"], gradient_checkpointing=s["ckpt"], grad_accumulation=s["acc"],
                        steps=args.steps, batch_size=2, compile=s["compile"], optimizer="sgd",
                        learning_rate=1e-2 if s["mode"] == "lora" else 1e-4)
        row = dict(s)
        t0 = time.perf_counter()
        try:
            log.messages.clear()
            eager = train(nodes, model, latents, positive, graphs=False, **settings)
            # run-to-run noise of eager training itself (nondeterministic kernels, e.g. attention backward)
            row["floor"] = compare(train(nodes, model, latents, positive, graphs=False, **settings), eager)
            with capture_failing(s.get("fault", False)):
                graphed, replays = graphs_used(lambda: train(nodes, model, latents, positive, graphs=True, **settings))
            row.update(rel=compare(graphed, eager), replays=replays,
                       warnings=[m[:300] for m in log.messages if "graph" in m.lower() or "compile" in m.lower()])
        except Exception as exc:
            row.update(error=f"{type(exc).__name__}: {str(exc)[:300]}")
        row["rng"] = rng_ok()
        row["seconds"] = round(time.perf_counter() - t0, 1)
        used = row.get("replays", 0) > 0 if not s.get("fault") else (row.get("replays") == 0 and bool(row.get("warnings")))
        row["within_noise"] = row.get("rel", 1.0) <= max(TOLERANCE, 2 * row.get("floor", 0.0))
        row["pass"] = row.get("rel", 1.0) <= TOLERANCE and used and row["rng"] == "ok" and not row.get("error")
        rows.append(row)
        print(json.dumps(row), flush=True)
        table = write(rows, args)
    print(table)


def write(rows, args):
    import torch
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "tolerance": TOLERANCE}
    with open(os.path.join(args.out, "graphs_check.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"CUDA graphs vs eager, D2FTrain, {meta['device']}, torch {meta['torch']}, {meta['date']}: "
             f"{args.steps} steps, batch 2 per micro-batch, bf16, LoRA rank 8 on all targets; "
             f"SGD, deterministic cuDNN/cuBLAS on both sides; rel = max|graphed − eager| / largest trained "
             f"change (LoRA up factors, full-mode weight differences); pass: rel ≤ {TOLERANCE:g}, graphs replayed "
             "(or, with the capture made to fail, the fallback logged), default RNG intact",
             "", "| UNet | mode | ckpt | accumulation | buckets | compile | rel graphed vs eager | rel eager vs eager "
             "| graph replays | default RNG after | pass |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = r.get("error") or f"{r['rel']:.2e}"
        floor = f"{r['floor']:.2e}" if "floor" in r else "-"
        what = "capture made to fail" if r.get("fault") else ("on" if r["compile"] else "off")
        lines.append(f"| {r['arch']} | {r['mode']} | {'on' if r['ckpt'] else 'off'} | {r['acc']} | {r['buckets']} | "
                     f"{what} | {rel} | {floor} | {r.get('replays', '-')} | {r['rng']} | "
                     f"{'yes' if r['pass'] else 'NO'} |")
    fallbacks = sorted({w for r in rows for w in r.get("warnings", [])})
    if fallbacks:
        lines += ["", "Warnings logged:", *[f"- {w}" for w in fallbacks]]
    lines += ["", f"{sum(r['pass'] for r in rows)} of {len(rows)} settings pass."]
    with open(os.path.join(args.out, "graphs_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
