"""Sample quality of the bridge and of Diff2Flow fine-tunes on CPU: a benchmark, not a test.

    python bench/bench_quality.py                 # default size (~25 min on 2 idle cores)
    python bench/bench_quality.py --quick         # minutes; smoke run, numbers not meaningful
    python bench/bench_quality.py --out DIR --tag NAME --threads N --train-seeds K

Everything is the demo's setting (``d2f_app.demo``): the bundled 8×8 digits upscaled to 16×16 in [-1, 1],
tiny UNets (``d2f_app.tiny_unet``) trained natively on the Stable Diffusion schedule (T = 1000), EMA
weights; fine-tunes through ``d2f_core.training.trainer.Trainer``. Two experiments:

A. **Few-step quality.** For an ε- and a v-model: rows native DDIM, flow patch zero-shot (flow Euler through
   the bridge, no training), Diff2Flow fine-tune, + scheduled sampling, + Reflow (the demo's
   ``finetune_variants``), columns steps ∈ {1, 2, 4, 8, 25, 50} on the host's ``simple`` integer-label grid
   (the same σ grid for every row). Cell: Fréchet distance to the held-out digits, mean ± std over
   ``--seeds`` sampling seeds (noise sets) × ``--train-seeds`` training seeds. Ablation row "+ Reflow, ε
   coupling": the same Reflow trained on (x̂0, ε) instead of the start-consistent (x̂0, ε')
   (``d2f_app.demo.reflow_couplings``).

B. **Convergence to a new target** (the paper's comparison). An ε- and a v-model pretrained natively on digits
   0–4 are each fine-tuned on digits 5–9 three ways, with the same Trainer settings, batches and seed:

   * Diff2Flow: the bridge + ``objective="diff2flow"``; evaluated with 25-step flow Euler;
   * naive flow matching: the same net with the bridge ignored — input x itself, label 999·σ, output taken
     as the velocity v̂ = out (``NaiveFlowBridge``), loss ‖out - (ε - x0)‖²; 25-step flow Euler with
     x̂0 = x - σ·out;
   * native fine-tune: ``objective="native"`` (MSE to ε or v at the same flow times); 25-step DDIM.

   FD to held-out 5–9 digits at a fixed list of training steps, mean ± std over ``--train-seeds``.

Feature spaces (``d2f_app.metrics``), both fixed before any sample is generated:
  * pixel PCA: top-16 principal components of the training digits' pixels (of 5–9's training digits in B);
  * random conv: a seeded random 2-layer ReLU conv net, 4×4-pooled, projected to 32 dims, per-feature
    std 1 on the same training digits.

Targets, checked and written to the results: Reflow at 4 Euler steps within 1.2× of native DDIM at 50 steps;
zero-shot patch equal to DDIM at every step count (|ΔFD| ≤ 1e-3 relative, samples within 1e-4); Diff2Flow
reaching naive FM's final distance in ≤ 1/4 of naive FM's steps.
Results: ``OUT/quality_TAG.md`` and ``OUT/quality_TAG.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from d2f_core.flow.bridge import FlowBridge  # noqa: E402
from d2f_app.datasets import digits_tensor, split_indices  # noqa: E402
from d2f_app.demo import (FINETUNE_ROWS, FLOW, NATIVE, PREDICTIONS, REFLOW_RAW, DemoConfig, finetune,  # noqa: E402
                           finetune_config, finetune_variants, sample_flow_euler, sample_native_ddim, simple_labels,
                           train_native, unconditional_data)
from d2f_app.metrics import PixelPCAFrechet, RandomConvFrechet  # noqa: E402
from d2f_core.flow.schedule import DiscreteSchedule  # noqa: E402
from d2f_app.tiny_unet import TinyUNet  # noqa: E402

STEPS = (1, 2, 4, 8, 25, 50)
ROWS = (NATIVE, FLOW) + tuple(row for row, _ in FINETUNE_ROWS)
REFLOW = FINETUNE_ROWS[-1][0]
METRICS = ("pixel_pca", "random_conv")
D2F, NAIVE, NATIVE_FT = "Diff2Flow (bridge, diff2flow loss)", "naive FM (output = velocity)", "native fine-tune"
NAIVE_OUTPUT = "naive FM, bridge input/label (output = velocity)"


class NaiveFlowBridge(FlowBridge):
    """The pretrained net read as if it were a flow model, ignoring the bridge: it gets the flow state x
    itself, the label (T-1)·σ (flow time stretched onto the label range), and its output *is* the velocity.

        v̂ = out,   x̂0 = x - σ·out

    (``mode="output"`` keeps the bridge's input x/D(σ) and label n(σ) and only reads the output as v̂.)
    Same σ range as the bridge, so the Trainer draws the same flow times for every method.
    """

    def __init__(self, schedule: DiscreteSchedule, mode: str = "full"):
        super().__init__(schedule, "eps")
        if mode not in ("full", "output"):
            raise ValueError("mode is 'full' or 'output'")
        self.mode = mode

    def label(self, sigma):
        if self.mode == "output":
            return super().label(sigma)
        return torch.as_tensor(sigma) * (len(self.schedule) - 1)  # in σ's precision, like the bridge

    def model_input(self, sigma, x):
        return x if self.mode == "full" else super().model_input(sigma, x)

    def velocity(self, sigma, out, x):
        return out.to(torch.promote_types(x.dtype, torch.float32))

    def denoised(self, sigma, out, x):
        s = torch.as_tensor(sigma, device=x.device)
        s = s.reshape(()) if s.numel() == 1 else s.reshape(-1, *([1] * (x.ndim - 1)))
        return (x - s.to(torch.promote_types(s.dtype, torch.float32)) * out).to(torch.promote_types(x.dtype, torch.float32))


@dataclass
class BenchConfig:
    steps_train: int = 1200         # native pretraining steps per model (batch 64, the demo's LR/EMA)
    finetune_steps: int = 400       # Diff2Flow fine-tune and + scheduled sampling
    reflow_pairs: int = 2048
    reflow_steps: int = 800
    n_samples: int = 256            # per FD evaluation (the held-out set has 359 digits; B: ~180)
    seeds: int = 3                  # sampling seeds (noise sets) in A
    train_seeds: int = 1            # training seeds in A (models retrained per seed)
    conv_pretrain_steps: int = 1000  # B: native pretraining on digits 0–4
    conv_steps: int = 400           # B: fine-tune steps on digits 5–9
    conv_eval: tuple = (0, 10, 25, 50, 75, 100, 150, 200, 300, 400)
    conv_solver_steps: int = 25
    conv_train_seeds: int = 2
    conv_lr: float = 5e-4
    conv_models: tuple = ("eps", "v")  # B: which pretrained models (ε, v) are fine-tuned
    naive_output_only: bool = False  # B: also run NaiveFlowBridge(mode="output")
    reflow_ablation: bool = True    # A: also Reflow trained on (x̂0, ε) instead of (x̂0, ε')
    threads: int = 2

    @classmethod
    def quick(cls) -> "BenchConfig":
        return cls(steps_train=150, finetune_steps=30, reflow_pairs=64, reflow_steps=30, n_samples=64, seeds=2,
                   conv_pretrain_steps=150, conv_steps=40, conv_eval=(0, 10, 20, 40), conv_train_seeds=1,
                   conv_models=("eps",))


def _demo_config(b: BenchConfig) -> DemoConfig:
    return DemoConfig(steps_train=b.steps_train, finetune_steps=b.finetune_steps, reflow_pairs=b.reflow_pairs,
                      reflow_steps=b.reflow_steps, n_samples=b.n_samples, threads=b.threads)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values) -> str:
    m, s = _mean_std(values)
    return f"{m:.3f} ± {s:.3f}"


def _log(msg: str = ""):
    print(msg, flush=True)


# --- A: few-step quality ---------------------------------------------------------------------------
def quality(b: BenchConfig, schedule: DiscreteSchedule) -> dict:
    images, _ = digits_tensor(16)
    train_idx, held_idx = split_indices(len(images), 0.2, 0)
    x_train, x_held = images[train_idx], images[held_idx]
    metrics = {"pixel_pca": PixelPCAFrechet(x_train, 16), "random_conv": RandomConvFrechet(x_train)}
    ref = {}
    for key, m in metrics.items():
        vals = []
        for s in range(b.seeds):
            idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(100 + s))[:b.n_samples]
            vals.append(m.distance(x_train[idx], x_held))
        ref[key] = vals
    cfg = _demo_config(b)
    cells: dict = {}   # (model, row, steps, metric) -> [fd]
    equivalence: dict = {}  # (model, steps) -> max |Δx|
    timing: dict = {}
    for train_seed in range(b.train_seeds):
        for name, prediction in (("eps", "eps"), ("v", "v_prediction")):
            bridge = FlowBridge(schedule, prediction)
            t0 = time.perf_counter()
            torch.manual_seed(1000 * train_seed)
            net = TinyUNet(in_channels=1, channels=cfg.channels)
            ema, stats = train_native(net, bridge, x_train, cfg, f"A pretrain {name} seed {train_seed}",
                                      seed=1000 * train_seed + 1)
            ema.eval()
            t1 = time.perf_counter()
            variants, ft_stats = finetune_variants(ema, bridge, x_train, cfg, seed=1000 * train_seed + 5, name=name,
                                                   raw_noise_ablation=b.reflow_ablation)
            t2 = time.perf_counter()
            _log(f"A {name} seed {train_seed}: native loss {stats['final_loss']:.4f} ({t1 - t0:.0f}s); fine-tunes "
                 + ", ".join(f"{row} {s['final_loss']:.4f}" for row, s in ft_stats.items()) + f" ({t2 - t1:.0f}s)")
            nets = [(NATIVE, sample_native_ddim, ema), (FLOW, sample_flow_euler, ema)]
            nets += [(row, sample_flow_euler, n) for row, _, n in variants]
            for s in range(b.seeds):
                noise = torch.randn((b.n_samples, 1, 16, 16), generator=torch.Generator().manual_seed(10_000 + s))
                for steps in STEPS:
                    labels = simple_labels(steps, len(schedule))
                    outs = {}
                    for row, sampler, n in nets:
                        x = sampler(n, bridge, noise, labels)
                        outs[row] = x
                        for key, m in metrics.items():
                            cells.setdefault((name, row, steps, key), []).append(m.distance(x, x_held))
                    diff = (outs[NATIVE] - outs[FLOW]).abs().max().item()
                    equivalence[(name, steps)] = max(diff, equivalence.get((name, steps), 0.0))
            timing[f"{name} seed {train_seed}"] = {"pretrain": t1 - t0, "finetunes": t2 - t1,
                                                   "sampling": time.perf_counter() - t2}
            _log(f"A {name} seed {train_seed}: sampled {len(nets)} rows x {len(STEPS)} step counts x {b.seeds} "
                 f"noise sets in {time.perf_counter() - t2:.0f}s")
    return {"cells": cells, "equivalence": equivalence, "reference": ref, "timing": timing,
            "metrics": {k: m.describe() for k, m in metrics.items()},
            "n_train": len(x_train), "n_held": len(x_held)}


# --- B: convergence on a new target ----------------------------------------------------------------
def convergence(b: BenchConfig, schedule: DiscreteSchedule) -> dict:
    images, labels = digits_tensor(16)
    train_idx, held_idx = split_indices(len(images), 0.2, 0)
    src_train = images[train_idx][labels[train_idx] <= 4]
    tgt_train = images[train_idx][labels[train_idx] >= 5]
    tgt_held = images[held_idx][labels[held_idx] >= 5]
    metrics = {"pixel_pca": PixelPCAFrechet(tgt_train, 16), "random_conv": RandomConvFrechet(tgt_train)}
    n = min(b.n_samples, len(tgt_train))
    noise = torch.randn((n, 1, 16, 16), generator=torch.Generator().manual_seed(20_000))
    eval_steps = tuple(s for s in b.conv_eval if s <= b.conv_steps)
    grid = simple_labels(b.conv_solver_steps, len(schedule))
    ref = {k: m.distance(tgt_train[torch.randperm(len(tgt_train), generator=torch.Generator().manual_seed(7))[:n]],
                         tgt_held) for k, m in metrics.items()}
    ref_src = {k: m.distance(src_train[torch.randperm(len(src_train), generator=torch.Generator().manual_seed(7))[:n]],
                             tgt_held) for k, m in metrics.items()}
    cfg = replace(_demo_config(b), steps_train=b.conv_pretrain_steps, finetune_steps=b.conv_steps, finetune_lr=b.conv_lr)
    curves: dict = {}   # (model, method, metric, step) -> [fd]
    timing, pretrain_loss = {}, {}
    data = unconditional_data(tgt_train)
    for model in b.conv_models:
        bridge = FlowBridge(schedule, dict(PREDICTIONS)[model])
        methods = [(D2F, bridge, "diff2flow", sample_flow_euler),
                   (NAIVE, NaiveFlowBridge(schedule), "diff2flow", sample_flow_euler),
                   (NATIVE_FT, bridge, "native", sample_native_ddim)]
        if b.naive_output_only:
            methods.insert(2, (NAIVE_OUTPUT, NaiveFlowBridge(schedule, "output"), "diff2flow", sample_flow_euler))
        t0 = time.perf_counter()
        torch.manual_seed(0)
        pre, stats = train_native(TinyUNet(in_channels=1, channels=cfg.channels), bridge, src_train, cfg,
                                  f"B pretrain {model} on 0-4", seed=1)
        pre.eval()
        timing[f"{model} pretrain"] = time.perf_counter() - t0
        pretrain_loss[model] = stats["final_loss"]
        for train_seed in range(b.conv_train_seeds):
            for method, br, objective, sampler in methods:
                t1 = time.perf_counter()

                def evaluate(step, net, method=method, br=br, sampler=sampler):
                    if step not in eval_steps:
                        return
                    with torch.no_grad():
                        x = sampler(net, br, noise, grid)
                    for key, m in metrics.items():
                        curves.setdefault((model, method, key, step), []).append(m.distance(x, tgt_held))

                evaluate(0, pre)
                tc = finetune_config(cfg, seed=500 + train_seed, objective=objective)
                _, st = finetune(pre, br, data, tc, f"B {model} {method[:12]} seed {train_seed}", on_eval=evaluate,
                                 eval_every=_gcd_of(eval_steps))
                label = f"{model} {method} seed {train_seed}"
                timing[label] = time.perf_counter() - t1
                _log(f"B {label}: loss {st['first_loss']:.3f} -> {st['final_loss']:.4f}, FD(pixel PCA) "
                     f"{curves[(model, method, 'pixel_pca', 0)][-1]:.3f} -> "
                     f"{curves[(model, method, 'pixel_pca', eval_steps[-1])][-1]:.3f} ({timing[label]:.0f}s)")
    return {"curves": curves, "eval_steps": eval_steps, "methods": [m[0] for m in methods], "models": list(b.conv_models),
            "reference": ref, "reference_source": ref_src, "timing": timing, "pretrain_loss": pretrain_loss,
            "n_src_train": len(src_train), "n_tgt_train": len(tgt_train), "n_tgt_held": len(tgt_held),
            "n_samples": n, "metrics": {k: m.describe() for k, m in metrics.items()}}


def _gcd_of(values) -> int:
    g = 0
    for v in values:
        g = math.gcd(g, v)
    return max(1, g)


# --- targets and report ----------------------------------------------------------------------------
def targets(a: dict, bres: dict) -> list[dict]:
    out = []
    cells = a["cells"]
    for key in METRICS:
        for model in ("eps", "v"):
            rf4 = statistics.fmean(cells[(model, REFLOW, 4, key)])
            ddim50 = statistics.fmean(cells[(model, NATIVE, 50, key)])
            out.append({"target": f"Reflow 4-step FD ≤ 1.2 × native DDIM 50-step FD ({model}, {key})",
                        "value": f"{rf4:.3f} vs 1.2 × {ddim50:.3f} = {1.2 * ddim50:.3f} (ratio {rf4 / ddim50:.2f})",
                        "met": rf4 <= 1.2 * ddim50})
    worst_rel = 0.0
    for (model, row, steps, key), vals in cells.items():
        if row == FLOW:
            for v_flow, v_ddim in zip(vals, cells[(model, NATIVE, steps, key)]):
                worst_rel = max(worst_rel, abs(v_flow - v_ddim) / max(abs(v_ddim), 1e-12))
    worst_dx = max(a["equivalence"].values())
    out.append({"target": "zero-shot flow patch = native DDIM at every step count (|ΔFD| ≤ 1e-3 rel., |Δx| ≤ 1e-4)",
                "value": f"max relative |ΔFD| {worst_rel:.1e}, max |Δx| {worst_dx:.1e}",
                "met": worst_rel <= 1e-3 and worst_dx <= 1e-4})
    return out + convergence_targets(bres)


def convergence_targets(bres: dict) -> list[dict]:
    """Diff2Flow reaches naive FM's final FD within a quarter of naive FM's fine-tune steps."""
    out = []
    curves, steps = bres["curves"], bres["eval_steps"]
    for model, key in ((m, k) for m in bres["models"] for k in METRICS):
        final_naive = statistics.fmean(curves[(model, NAIVE, key, steps[-1])])
        reached = next((s for s in steps if statistics.fmean(curves[(model, D2F, key, s)]) <= final_naive), None)
        out.append({"target": f"Diff2Flow reaches naive FM's final FD within ≤ 1/4 of its {steps[-1]} steps "
                              f"({model}, {key})",
                    "value": (f"naive FM final {final_naive:.3f}; Diff2Flow first ≤ at step "
                              f"{reached if reached is not None else 'never'} (limit {steps[-1] // 4})"),
                    "met": reached is not None and reached <= steps[-1] // 4,
                    "model": model, "metric": key, "naive_final": final_naive, "reached": reached,
                    "limit": steps[-1] // 4})
    return out


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "load_avg": load}


def report(b: BenchConfig, a: dict, bres: dict, tg: list[dict], info: dict) -> str:
    L = [f"# Quality benchmark (CPU) — {info['date']}", "",
         f"Machine: {info['machine_start']['cpu']}, {info['machine_start']['logical_cpus']} logical CPUs, "
         f"torch {info['machine_start']['torch']}, {info['machine_start']['threads']} torch threads; "
         f"load average at start {_load(info['machine_start'])}, at end {_load(info['machine_end'])} "
         "(the machine was shared: wall times are upper bounds). "
         f"Wall time {info['wall_seconds'] / 60:.1f} min (A {info['a_seconds'] / 60:.1f}, B {info['b_seconds'] / 60:.1f}). "
         f"Command: `{info['command']}`.", "",
         "Setting: the demo's (`d2f_app/demo.py`): bundled 8×8 digits upscaled to 16×16, tiny UNet "
         "(394,769 params), SD schedule (T = 1000), native training with EMA, fine-tunes through "
         "`d2f_core.training.trainer.Trainer` (batch 64, cosine LR 5e-4, uniform flow time). Sampling on the host's "
         "`simple` integer-label grid for every row (flow rows: σ_i = φ(ς_{n_i}), start D(σ_0)·ε).", "",
         "Feature spaces (fixed before sampling, `d2f_app/metrics.py`):", ""]
    for key, desc in a["metrics"].items():
        L.append(f"- **{key}**: {desc}")
    L += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    L += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in tg]
    L += ["", "## A. Few-step quality",  "",
          f"Fréchet distance to the {a['n_held']} held-out digits, {b.n_samples} samples per cell; mean ± std over "
          f"{b.seeds} noise sets × {b.train_seeds} training seed(s). Native pretraining {b.steps_train} steps; "
          f"Diff2Flow fine-tune and + scheduled sampling (p 0.5 linear ramp, k ≤ 2 of 25 solver steps) "
          f"{b.finetune_steps} steps from the native EMA model; + Reflow: {b.reflow_pairs} couplings from the "
          f"Diff2Flow fine-tune's 25-step flow Euler, {b.reflow_steps} steps from that fine-tune. All fine-tuned "
          "rows sample with flow Euler."
          + (f" Ablation \"{REFLOW_RAW}\": the same Reflow trained on (x̂0, ε) instead of (x̂0, ε'), "
             "ε' = (D(σ_0)·ε − (1−σ_0)·x̂0)/σ_0 the noise whose straight line passes through the sampler's actual "
             "start D(σ_0)·ε at σ_0 = σ_max = 0.936 (`d2f_app.demo.reflow_couplings`)." if b.reflow_ablation else ""),
          ""]
    rows = ROWS + ((REFLOW_RAW,) if b.reflow_ablation else ())
    for key in METRICS:
        ref = a["reference"][key]
        for model in ("eps", "v"):
            L += [f"**{model}-model, {key}** (real vs real reference: {_fmt(ref)})", "",
                  "| method | " + " | ".join(str(s) for s in STEPS) + " |", "|---|" + "---:|" * len(STEPS)]
            for row in rows:
                L.append(f"| {row} | " + " | ".join(_fmt(a["cells"][(model, row, s, key)]) for s in STEPS) + " |")
            L.append("")
    L += ["Zero-shot vs DDIM, max |x_DDIM − x_flow| over all samples (fp32): "
          + ", ".join(f"{m} {s}: {v:.1e}" for (m, s), v in sorted(a["equivalence"].items())), ""]
    return "\n".join(L + convergence_report(b, bres)) + "\n"


def convergence_report(b: BenchConfig, bres: dict) -> list[str]:
    """Part B as Markdown lines: setting, then one curve table per (model, metric)."""
    steps = bres["eval_steps"]
    L = ["## B. Convergence on a new target (digits 0–4 → 5–9)", "",
          f"{' and '.join(f'{m}-model' for m in bres['models'])} pretrained natively on the {bres['n_src_train']} "
          f"training digits 0–4 ({b.conv_pretrain_steps} steps), "
          f"then fine-tuned on the {bres['n_tgt_train']} training digits 5–9 (Trainer, batch 64, cosine LR "
          f"{b.conv_lr} over {b.conv_steps} steps). FD of {bres['n_samples']} samples ({b.conv_solver_steps}-step flow Euler; "
          f"native: {b.conv_solver_steps}-step DDIM) to the {bres['n_tgt_held']} held-out digits 5–9, mean ± std over "
          f"{b.conv_train_seeds} fine-tune seed(s) (same noise set).", ""]
    for model, key in ((m, k) for k in METRICS for m in bres["models"]):
        L += [f"**{model}-model, {key}** (real 5–9 vs held-out 5–9: {bres['reference'][key]:.3f}; real 0–4 vs "
              f"held-out 5–9: {bres['reference_source'][key]:.3f})", "",
              "| method, at fine-tune step → | " + " | ".join(str(s) for s in steps) + " |",
              "|---|" + "---:|" * len(steps)]
        for method in bres["methods"]:
            L.append(f"| {method} | " + " | ".join(_fmt(bres["curves"][(model, method, key, s)]) for s in steps) + " |")
        L.append("")
    return L


def _load(m: dict) -> str:
    return "n/a" if not m.get("load_avg") else "/".join(f"{v:.1f}" for v in m["load_avg"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="minutes-long smoke run (numbers not meaningful)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--tag", default=None, help="results file name part: quality_TAG.{md,json} (default cpu, quick: cpu_quick)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    p.add_argument("--seeds", type=int, default=None, help="sampling seeds in A (default 3)")
    p.add_argument("--train-seeds", type=int, default=None, help="training seeds in A (default 1)")
    p.add_argument("--conv-train-seeds", type=int, default=None, help="fine-tune seeds in B (default 2)")
    p.add_argument("--no-reflow-ablation", action="store_true", help="A: skip the (x̂0, ε) Reflow ablation row")
    p.add_argument("--naive-output-only", action="store_true",
                   help="B: also the naive-FM variant that keeps the bridge's input and label")
    args = p.parse_args(argv)
    b = BenchConfig.quick() if args.quick else BenchConfig()
    for field, value in (("threads", args.threads), ("seeds", args.seeds), ("train_seeds", args.train_seeds),
                         ("conv_train_seeds", args.conv_train_seeds)):
        if value is not None:
            b = replace(b, **{field: value})
    if args.naive_output_only:
        b = replace(b, naive_output_only=True)
    if args.no_reflow_ablation:
        b = replace(b, reflow_ablation=False)
    tag = args.tag or ("cpu_quick" if args.quick else "cpu")
    torch.set_num_threads(b.threads)
    schedule = DiscreteSchedule.stable_diffusion()
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine_start": machine(),
            "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))}
    t0 = time.perf_counter()
    a = quality(b, schedule)
    info["a_seconds"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    bres = convergence(b, schedule)
    info["b_seconds"] = time.perf_counter() - t1
    info["wall_seconds"] = time.perf_counter() - t0
    info["machine_end"] = machine()
    tg = targets(a, bres)
    md = report(b, a, bres, tg, info)
    os.makedirs(args.out, exist_ok=True)
    md_path, json_path = os.path.join(args.out, f"quality_{tag}.md"), os.path.join(args.out, f"quality_{tag}.json")
    with open(md_path, "w") as f:
        f.write(md)
    data = {"info": info, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(b).items()},
            "targets": tg, "steps": list(STEPS), "rows": list(ROWS) + ([REFLOW_RAW] if b.reflow_ablation else []),
            "quality": [{"model": m, "row": r, "steps": s, "metric": k, "fd": v, "mean": _mean_std(v)[0],
                         "std": _mean_std(v)[1]} for (m, r, s, k), v in a["cells"].items()],
            "quality_reference": a["reference"], "quality_metrics": a["metrics"],
            "equivalence_max_abs_diff": [{"model": m, "steps": s, "max_abs_diff": v}
                                         for (m, s), v in a["equivalence"].items()],
            "quality_timing": a["timing"],
            "convergence": [{"model": mo, "method": meth, "metric": k, "step": s, "fd": v, "mean": _mean_std(v)[0],
                             "std": _mean_std(v)[1]} for (mo, meth, k, s), v in bres["curves"].items()],
            "convergence_pretrain_loss": bres["pretrain_loss"],
            "convergence_reference": {"target_train_vs_held": bres["reference"],
                                      "source_train_vs_target_held": bres["reference_source"]},
            "convergence_timing": bres["timing"]}
    with open(json_path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    print(md)
    print(f"written: {md_path}, {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
