"""Memory pre-flight check: D2FTrain's measured peak GPU memory vs the estimate of d2f_core.training.memory.

    python bench/bench_memory.py --out DIR             # GPU machine (one H100: about 3–4 minutes)
    python bench/bench_memory.py --history             # CPU: the estimate against the peaks in bench/results
    python bench/bench_memory.py --tiny --out DIR      # CPU smoke run of the GPU path (tiny UNets, no peaks)

GPU: random-weight UNets of the real SD1.5 and SDXL architectures (fp16 files loaded by the host's own loader,
as bench_train.py), 16 latents of 64×64 (SD1.5) / 128×128 (SDXL) with random captions. Each row is one D2FTrain
run through the host's executor path, bf16, cuda_graphs on (unless said; D2FTrain replays graphs for LoRA
without checkpointing only), a few optimizer steps: the first step of a shape runs eagerly, the second captures
the CUDA graphs, the rest replay them. Saving is switched off (no
disk traffic); the node's own pre-flight runs and its estimate is recorded (its free-memory reading is
replaced by "no limit", so that every row runs even where the estimate says it would not fit). Measured:

* ``peak``: torch's max_memory_allocated over the run (the private copy's load, the steps, the captures);
* ``steady``: memory_reserved after the last step with the allocator's cache emptied: what stays held while
  training goes on (live tensors, the CUDA graphs' private pools, the NaN-recovery snapshots);
* ``need`` = max(peak, steady), compared with the estimate: error = estimate / need − 1 (target: within 15%);
* per step, allocated memory before it and the running peak after it (where the peak happens).

From rows that differ only in batch size it fits the constants of the model (bytes per latent pixel per
sample per family with and without checkpointing, the LoRA-on-every-layer and full fine-tune factors, the
overhead) and prints them next to the ones in use. Writes memory_<gpu>.json and memory_<gpu>.md to --out.
This is a benchmark: it prints and writes numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench_train  # noqa: E402  (host boot, node call, UNet files, architectures)

GIB = 2 ** 30
SIDE = {"sd15": 64, "sdxl": 128}
ARCH = {"sd15": bench_train.SD15, "sdxl": bench_train.SDXL}
TINY_ARCH = {"sd15": bench_train.TINY_SD15, "sdxl": bench_train.TINY_SDXL}
N_IMAGES = 16

# (arch, mode, lora_targets, batch, checkpointing, cuda_graphs, extra bucket side or 0, seconds it takes on an H100)
# In order of importance: rows are skipped from the end when the time budget runs out.
CONFIGS = [
    ("sd15", "lora", "attention", 1, False, True, 0, 6), ("sd15", "lora", "attention", 4, False, True, 0, 6),
    ("sd15", "lora", "attention", 1, True, True, 0, 6), ("sd15", "lora", "attention", 4, True, True, 0, 6),
    ("sdxl", "lora", "attention", 1, False, True, 0, 12), ("sdxl", "lora", "attention", 4, False, True, 0, 14),
    ("sdxl", "lora", "attention", 1, True, True, 0, 12), ("sdxl", "lora", "attention", 4, True, True, 0, 14),
    ("sd15", "full", "attention", 1, True, True, 0, 10), ("sd15", "full", "attention", 4, True, True, 0, 10),
    ("sd15", "full", "attention", 1, False, True, 0, 10), ("sd15", "full", "attention", 4, False, True, 0, 10),
    ("sdxl", "full", "attention", 1, True, True, 0, 30), ("sdxl", "full", "attention", 2, True, True, 0, 30),
    ("sd15", "lora", "all", 4, False, True, 0, 6), ("sd15", "lora", "attention", 4, False, False, 0, 6),
    ("sd15", "lora", "attention", 4, False, True, 48, 8), ("sdxl", "full", "attention", 1, False, True, 0, 35),
]

# Recorded peaks in bench/results (torch's max_memory_allocated of whole D2FTrain runs, LoRA rank 16, bf16,
# CUDA graphs on, one bucket): (file, commit, arch, mode, targets, batch, ckpt, key in the row, note).
HISTORY = [
    ("train_h200_sd15_eager_bs8_16.json", "17404f6", "sd15", "lora", "attention", 8, False, "d2f", ""),
    ("train_h200_sd15_eager_bs8_16.json", "17404f6", "sd15", "lora", "attention", 16, False, "d2f", ""),
    ("train_like_for_like_h100.json", "9b21b0d", "sd15", "lora", "attention", 1, False, "d2f_attention", "H100"),
    ("train_like_for_like_h100.json", "9b21b0d", "sd15", "lora", "attention", 4, False, "d2f_attention", "H100"),
    ("train_like_for_like_h100.json", "9b21b0d", "sd15", "lora", "all", 1, False, "d2f_all", "H100"),
    ("train_like_for_like_h100.json", "9b21b0d", "sd15", "lora", "all", 4, False, "d2f_all", "H100"),
    ("train_h200_run2.json", "063a821", "sd15", "lora", "attention", 1, True, "d2f", ""),
    ("train_h200_run2.json", "063a821", "sd15", "lora", "attention", 4, True, "d2f", ""),
    ("train_h200_run2.json", "063a821", "sd15", "lora", "attention", 8, True, "d2f", ""),
    ("train_h200_run2.json", "063a821", "sd15", "lora", "attention", 1, False, "d2f", ""),
    ("train_h200_run2.json", "063a821", "sd15", "lora", "attention", 4, False, "d2f", ""),
    ("train_h200_run2.json", "063a821", "sd15", "lora", "attention", 8, False, "d2f", ""),
    ("train_h200_sd15.json", "a736957", "sd15", "lora", "attention", 1, True, "d2f", ""),
    ("train_h200_sd15.json", "a736957", "sd15", "lora", "attention", 4, True, "d2f", ""),
    ("train_h200_sd15.json", "a736957", "sd15", "lora", "attention", 8, True, "d2f", ""),
    ("train_h200_sd15.json", "a736957", "sd15", "lora", "attention", 1, False, "d2f", ""),
    ("train_h200_sd15.json", "a736957", "sd15", "lora", "attention", 4, False, "d2f", ""),
    ("train_h200_sd15.json", "a736957", "sd15", "lora", "attention", 8, False, "d2f", ""),
    ("train_h200_sd15_compiled_ckpt_on.json", "4764ec2", "sd15", "lora", "attention", 8, True, "d2f", "compiled"),
    ("train_h200_lora_sdxl.json", "46be3fb", "sdxl", "lora", "attention", 1, True, "d2f", ""),
    ("train_h200_lora_sdxl.json", "46be3fb", "sdxl", "lora", "attention", 4, True, "d2f", ""),
    ("train_h200_sdxl.json", "a736957", "sdxl", "lora", "attention", 1, False, "d2f", ""),
    ("train_h200_sdxl.json", "a736957", "sdxl", "lora", "attention", 4, False, "d2f", ""),
    ("train_h200_run2.json", "063a821", "sdxl", "lora", "attention", 1, False, "d2f", ""),
    ("train_h200_run2.json", "063a821", "sdxl", "lora", "attention", 4, False, "d2f", ""),
    ("train_h200_full_sd15.json", "46be3fb", "sd15", "full", "attention", 1, True, "d2f", ""),
    ("train_h200_full_sd15.json", "46be3fb", "sd15", "full", "attention", 4, True, "d2f", ""),
    ("train_h200_full_sdxl.json", "46be3fb", "sdxl", "full", "attention", 1, True, "d2f", ""),
]


def engine():
    """The memory module: the pack's copy as the host loaded it when there is one, else imported from the tree."""
    for name, mod in sys.modules.items():
        if name.endswith("d2f_core.training.memory"):
            return mod
    sys.path.insert(0, ROOT)
    from d2f_core.training import memory
    return memory


def meta_facts(arch: str, targets: str, tiny: bool = False):
    """NetworkFacts of the architecture (the host's UNetModel built on the meta device, fp16 as the files)."""
    import torch
    host = os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/ComfyUI")
    sys.path.insert(0, host)
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    mem = engine()
    pkg = mem.__name__.rsplit(".", 1)[0]
    adapters, checkpointing = sys.modules.get(pkg + ".adapters"), sys.modules.get(pkg + ".checkpointing")
    if adapters is None or checkpointing is None:
        from d2f_core.training import adapters, checkpointing
    with torch.device("meta"):
        unet = UNetModel(**(TINY_ARCH if tiny else ARCH)[arch], dtype=torch.float16, device="meta",
                         operations=comfy.ops.disable_weight_init)
    blocks = checkpointing.blocks_by_class_name(unet, ("ResBlock", "SpatialTransformer"))
    return mem.network_facts(unet, blocks, adapters.attention_only if targets == "attention" else None)


def settings_for(mem, arch, mode, targets, batch, ckpt, graphs=True, extra=0, tiny=False, bytes_=2,
                 graphs_with_checkpointing=True):
    side = 8 if tiny else SIDE[arch]
    ctx = 768 if arch == "sd15" else 2048
    cond = 77 * ctx + (0 if arch == "sd15" else 2816)
    shapes = ((side, side),) + (((extra, extra),) if extra else ())
    data = len(shapes) * N_IMAGES * (4 * side * side * 4 + cond * bytes_)
    return mem.RunSettings(mode=mode, rank=16, batch_size=batch, shapes=shapes, checkpointing=ckpt,
                           weight_bytes=bytes_, lora_targets=targets, cuda_graphs=graphs, data_bytes=data,
                           graphs_with_checkpointing=graphs_with_checkpointing)  # recorded runs: graphs with it too


# --- the history ------------------------------------------------------------------------------------------
def history():
    mem = engine()
    facts = {}
    rows = []
    for file, commit, arch, mode, targets, batch, ckpt, key, note in HISTORY:
        with open(os.path.join(HERE, "results", file)) as f:
            data = json.load(f)
        row = next(r for r in data["rows"] if r["arch"] == arch and r["batch"] == batch and r["checkpointing"] == ckpt)
        measured = row[key]["peak_gib"]
        if (arch, targets) not in facts:
            facts[arch, targets] = meta_facts(arch, targets)
        s = settings_for(mem, arch, mode, targets, batch, ckpt)
        est = mem.estimate(facts[arch, targets], s, arch)
        rows.append({"file": file, "commit": commit, "arch": arch, "mode": mode, "targets": targets, "batch": batch,
                     "checkpointing": ckpt, "graphs": True, "extra": 0, "note": note, "need_gib": measured,
                     "estimate_gib": est.total / GIB, "terms": {k: v / GIB for k, v in est.terms.items()}})
    return rows


# --- the GPU measurement ------------------------------------------------------------------------------------
def pack_module(suffix: str):
    return next(m for n, m in sys.modules.items() if n.endswith(suffix) and not n.startswith("d2f_core"))


@contextlib.contextmanager
def instrumented(record: dict):
    """While inside: D2FTrain saves nothing, its pre-flight sees no memory limit (its result is recorded), and the
    Trainer's construction, steps and end are measured into ``record``."""
    import torch
    train_node = pack_module("nodes.train_node")
    memory_check = pack_module("nodes.memory_check")
    trainer_cls = train_node.Trainer
    cuda = torch.cuda.is_available()
    real = {"save": train_node.TrainingRun.save, "init": trainer_cls.__init__, "step": trainer_cls.step,
            "run": trainer_cls.run, "check": memory_check.check, "available": memory_check.available_memory}

    def alloc():
        return torch.cuda.memory_allocated() / GIB if cuda else None

    def peak():
        return torch.cuda.max_memory_allocated() / GIB if cuda else None

    def init(self, *a, **k):
        real["init"](self, *a, **k)
        record["static_gib"] = alloc()  # weights, trained tensors, zeroed gradients, data (no optimizer state yet)

    def step(self, i):
        before = alloc()
        out = real["step"](self, i)
        record.setdefault("steps", []).append({"step": i, "allocated_before_gib": before, "peak_after_gib": peak()})
        return out

    def run(self, *a, **k):
        result = real["run"](self, *a, **k)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the general pool's cache goes; live tensors and graph pools stay
            record["steady_gib"] = torch.cuda.memory_reserved() / GIB
            record["steady_allocated_gib"] = alloc()
        return result

    def check(*a, **k):
        result = real["check"](*a, **k)
        record["estimate"] = result
        return result

    # No disk traffic and no host-side exports (a full SDXL run's weight differences are 10 GB of CPU work)
    train_node.TrainingRun.save = lambda self, step: "(benchmark: not saved)"
    full_cls = pack_module("d2f_core.training.adapters").FullAdapters
    real["export"], real["trained_model"] = full_cls.export, train_node.TrainingRun._trained_model
    full_cls.export = lambda self, dtype=None: {}
    train_node.TrainingRun._trained_model = lambda self: self.model
    trainer_cls.__init__, trainer_cls.step, trainer_cls.run = init, step, run
    memory_check.check = check  # train_node calls it through the module
    memory_check.available_memory = lambda device: None
    try:
        yield real["available"]
    finally:
        train_node.TrainingRun.save = real["save"]
        full_cls.export, train_node.TrainingRun._trained_model = real["export"], real["trained_model"]
        trainer_cls.__init__, trainer_cls.step, trainer_cls.run = real["init"], real["step"], real["run"]
        memory_check.check = real["check"]
        memory_check.available_memory = real["available"]


def measure(nodes, model, data, arch, mode, targets, batch, ckpt, graphs, extra, steps, tiny):
    import comfy.model_management as mm
    import torch
    cuda = torch.cuda.is_available()
    baseline = release_all(mm, torch)
    latents, conds = data[0] if not extra else data[1]
    record = {"arch": arch, "mode": mode, "targets": targets, "batch": batch, "checkpointing": ckpt, "graphs": graphs,
              "extra": extra, "error": None}
    t0 = time.perf_counter()
    with instrumented(record) as real_available:
        available = real_available(mm.get_torch_device())
        record["available_gib"] = available / GIB if available is not None else None
        try:
            bench_train.run_node(nodes, "D2FTrain", lists=("latents", "positive"), model=model,
                                 latents=[{"samples": lat} for lat in latents], positive=conds, mode=mode, steps=steps,
                                 batch_size=batch, rank=16, alpha=16.0, lora_targets=targets,
                                 learning_rate=1e-4 if mode == "lora" else 1e-5, gradient_checkpointing="on" if ckpt else "off",
                                 training_dtype="fp32" if tiny else "bf16", cuda_graphs=graphs, seed=0,
                                 run_name="bench_memory", save_every=0, preview_every=0)
        except torch.OutOfMemoryError:
            record["error"] = "out of memory"
        except RuntimeError as exc:
            record["error"] = "out of memory" if "out of memory" in str(exc) else f"error: {str(exc)[:300]}"
    record["wall_s"] = time.perf_counter() - t0
    if cuda:
        # What this row itself allocated: anything an earlier row left behind is not its memory.
        record["baseline_gib"] = baseline / GIB
        record["peak_gib"] = (torch.cuda.max_memory_allocated() - baseline) / GIB
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        if record.get("steady_gib") is not None:
            record["steady_gib"] -= baseline / GIB
        record["need_gib"] = max(record["peak_gib"], record.get("steady_gib") or 0.0)
    pre = record.pop("estimate", None)
    if pre is not None:
        mem = engine()
        record["estimate_gib"] = pre.estimate.total / GIB
        record["terms"] = {k: v / GIB for k, v in pre.estimate.terms.items()}
        record["estimate_off_gib"], record["estimate_on_gib"] = pre.without.total / GIB, pre.with_.total / GIB
        if available is not None:  # what the node would have decided on this device, empty
            record["auto_would_use_checkpointing"] = not mem.fits(pre.without.total, available)
            record["refused_here"] = (pre.with_ if ckpt else pre.without).total > available
    record["left_behind_gib"] = release_all(mm, torch) / GIB if cuda else None
    return record


def release_all(mm, torch) -> int:
    """Unload the host's models and free what the last run held; the bytes still allocated after that.

    A run's CUDA graphs and their private memory pools live as long as the objects that hold them, which sit
    in reference cycles (trainer ↔ callbacks): without a garbage collection here, one row's graph pools and
    full-mode tensors were still allocated during the next rows and counted in their peaks."""
    import gc
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def gpu_rows(args, budget_left):
    import torch
    nodes = bench_train.boot_host()
    import comfy.sd
    logging.getLogger().setLevel(logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = tempfile.mkdtemp(prefix="d2f-bench-memory-")
    models, datas = {}, {}
    rows = []
    configs = [c for c in CONFIGS if c[0] in args.arch]
    for cfg in configs:
        arch, mode, targets, batch, ckpt, graphs, extra, cost = cfg
        if args.tiny:
            extra = 6 if extra else 0
        if budget_left() < cost:
            print(json.dumps({"skipped": cfg[:7], "reason": "time budget"}), flush=True)
            rows.append({"arch": arch, "mode": mode, "targets": targets, "batch": batch, "checkpointing": ckpt,
                         "graphs": graphs, "extra": extra, "error": "skipped (time budget)"})
            continue
        if arch not in models:
            path = os.path.join(work, f"{arch}.safetensors")
            bench_train.write_unet(path, (TINY_ARCH if args.tiny else ARCH)[arch], device)
            models[arch] = comfy.sd.load_diffusion_model(path)
            g = torch.Generator().manual_seed(0)
            side = 8 if args.tiny else SIDE[arch]
            ctx = 768 if arch == "sd15" else 2048
            extras = {"pooled_output": torch.randn(1, 1280, generator=g)} if arch == "sdxl" else {}

            def images(s, n=N_IMAGES):
                lat = torch.randn(n, 1, 4, s, s, generator=g)
                return list(lat), [[[torch.randn(1, 77, ctx, generator=g), dict(extras)]] for _ in range(n)]
            one = images(side)
            two_side = (6 if args.tiny else 48)
            two = images(two_side)
            datas[arch] = (one, (one[0] + two[0], one[1] + two[1]))
        steps = 10 if extra else args.steps
        row = measure(nodes, models[arch], datas[arch], arch, mode, targets, batch, ckpt, graphs, extra, steps, args.tiny)
        print(json.dumps({k: v for k, v in row.items() if k not in ("steps", "terms")}), flush=True)
        rows.append(row)
    return rows


# --- the fit ------------------------------------------------------------------------------------------------
def fit(rows, tiny=False):
    """Constants of the model that fit rows differing only in batch size (see the memory module docstring)."""
    mem = engine()
    good = [r for r in rows if r.get("need_gib") and not r.get("error") and r.get("graphs", True) and not r.get("extra")
            and not r.get("note")]
    slopes = {}
    for r in good:
        for q in good:
            same = all(r[k] == q[k] for k in ("arch", "mode", "targets", "checkpointing")) and q["batch"] > r["batch"]
            same = same and r.get("file", "") == q.get("file", "")
            if same:
                key = (r["arch"], r["mode"], r["targets"], r["checkpointing"])
                slopes.setdefault(key, []).append((q["need_gib"] - r["need_gib"]) * GIB / (q["batch"] - r["batch"]))
    slope = {k: statistics.median(v) for k, v in slopes.items()}
    out = {"per_sample_gib": {" ".join(map(str, k)): v / GIB for k, v in slope.items()}}
    facts = {}
    alpha = {}
    for arch in ("sd15", "sdxl"):
        hw = (8 if tiny else SIDE[arch]) ** 2
        if (arch, "attention") not in facts:
            facts[arch, "attention"] = meta_facts(arch, "attention", tiny)
        f = facts[arch, "attention"]
        pair = []
        for ckpt in (False, True):
            k = (arch, "lora", "attention", ckpt)
            if k in slope:
                a_off, a_on = mem.FAMILY_ACTIVATIONS[arch]
                gamma = a_on / a_off if ckpt else 1.0
                rank = 2 * gamma * 16 * (f.lora_tokens + f.lora_context_layers * 77 / hw)
                pair.append(slope[k] / hw - rank)
            else:
                pair.append(None)
        alpha[arch] = pair
    out["FAMILY_ACTIVATIONS"] = {a: [round(x) if x else None for x in v] for a, v in alpha.items()}

    def ratio(a, b):
        vals = [slope[x] / slope[y] for x, y in zip(a, b) if x in slope and y in slope and slope[y] > 0]
        return round(statistics.median(vals), 3) if vals else None
    archs = ("sd15", "sdxl")
    out["F_ALL"] = ratio([(a, "lora", "all", c) for a in archs for c in (False, True)],
                         [(a, "lora", "attention", c) for a in archs for c in (False, True)])
    out["F_FULL_OFF"] = ratio([(a, "full", "attention", False) for a in archs], [(a, "lora", "attention", False) for a in archs])
    out["F_FULL_ON"] = ratio([(a, "full", "attention", True) for a in archs], [(a, "lora", "attention", True) for a in archs])
    residuals = [r["need_gib"] - (r["estimate_gib"] - mem.C_OVERHEAD / GIB) for r in good if r.get("estimate_gib")]
    out["C_OVERHEAD_gib"] = round(statistics.median(residuals), 3) if residuals else None
    out["in_use"] = {"FAMILY_ACTIVATIONS": mem.FAMILY_ACTIVATIONS, "F_ALL": mem.F_ALL, "F_FULL_OFF": mem.F_FULL_OFF,
                     "F_FULL_ON": mem.F_FULL_ON, "C_OVERHEAD_gib": mem.C_OVERHEAD / GIB}
    return out


def table(rows, title) -> str:
    lines = [title, "",
             "| source | model | mode | targets | batch | ckpt | graphs | buckets | peak GiB | steady GiB | need GiB "
             "| estimate GiB | error | within 15% | held before / left after GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        src = f"{r['file']} ({r['commit']})" if r.get("file") else "this run"
        if r.get("note"):
            src += f", {r['note']}"
        need, est = r.get("need_gib"), r.get("estimate_gib")
        err = est / need - 1 if need and est and not r.get("error") else None

        def g(v):
            return f"{v:.2f}" if isinstance(v, (int, float)) else "-"
        lines.append(f"| {src} | {r['arch']} | {r['mode']} | {r['targets']} | {r['batch']} | "
                     f"{'on' if r['checkpointing'] else 'off'} | {'on' if r.get('graphs', True) else 'off'} | "
                     f"{2 if r.get('extra') else 1} | {g(r.get('peak_gib', need if r.get('file') else None))} | "
                     f"{g(r.get('steady_gib'))} | {r['error'] if r.get('error') else g(need)} | {g(est)} | "
                     f"{'-' if err is None else f'{err:+.1%}'} | {'-' if err is None else ('yes' if abs(err) <= 0.15 else 'NO')} | "
                     f"{g(r.get('baseline_gib'))} / {g(r.get('left_behind_gib'))} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    ap.add_argument("--history", action="store_true", help="the estimate against bench/results' recorded peaks (CPU)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny UNets, no peaks")
    ap.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (first eager, second captures)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds after which remaining rows are skipped")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.history:
        rows = history()
        print(table(rows, "Recorded peaks (bench/results) vs the estimate"))
        print(json.dumps(fit(rows), indent=1))
        return
    import torch
    rows = gpu_rows(args, lambda: args.budget - (time.perf_counter() - t0))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    slug = next((k for k in ("H200", "H100", "A100", "L40S", "A10") if k in gpu), gpu.split()[-1] if gpu else "gpu").lower()
    meta = {"device": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny,
            "steps": args.steps, "wall_s": time.perf_counter() - t0}
    try:
        import subprocess
        meta["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip() or "unknown"
    except OSError:
        meta["commit"] = "unknown"
    fitted = fit(rows, args.tiny) if torch.cuda.is_available() else None
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"memory_{slug}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "fit": fitted}, f, indent=1, default=str)
    text = table(rows, f"D2FTrain peak memory vs the pre-flight estimate, {gpu}, torch {torch.__version__}, "
                       f"{meta['date']}, commit {meta['commit']} (LoRA rank 16, bf16, {args.steps} steps per run)")
    if fitted:
        text += "\n\nConstants fitted to these rows (next to those in use):\n\n```\n" + json.dumps(fitted, indent=1) + "\n```\n"
    with open(os.path.join(args.out, f"memory_{slug}.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
