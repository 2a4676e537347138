"""Part B of the quality benchmark alone (convergence on a new target), swept over fine-tuning learning rates.

    python bench/bench_convergence.py --lrs 5e-4 1e-4 --threads 16 --tag lr_sweep

Diff2Flow starts from a model that already samples well through the bridge; naive flow matching starts from
the same weights read as a flow model without the bridge, and must first relearn its input, time and output
conventions. How much that costs depends on how far one fine-tuning step can move the weights: at a
pretraining-sized learning rate a tiny UNet relearns them in a few steps, at a fine-tuning-sized one it
cannot. This sweep measures the paper's comparison at several learning rates, everything else as in
``bench_quality.py`` part B (same data split, seeds, evaluation), and checks the target at each.
Results: ``OUT/convergence_TAG.md`` and ``.json``. A benchmark: it prints numbers, it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_quality import (ROOT, BenchConfig, _mean_std, convergence, convergence_report,  # noqa: E402
                           convergence_targets, machine)
from d2f_core.flow.schedule import DiscreteSchedule  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-4], help="peak fine-tuning learning rates")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--conv-train-seeds", type=int, default=None, help="fine-tune seeds (default 2)")
    p.add_argument("--quick", action="store_true", help="smoke run (numbers not meaningful)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--tag", default="lr_sweep")
    args = p.parse_args(argv)
    base = BenchConfig.quick() if args.quick else BenchConfig()
    base = replace(base, threads=args.threads)
    if args.conv_train_seeds is not None:
        base = replace(base, conv_train_seeds=args.conv_train_seeds)
    torch.set_num_threads(base.threads)
    schedule = DiscreteSchedule.stable_diffusion()
    start = machine()
    lines = [f"# Convergence on a new target, learning-rate sweep — "
             f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}", "",
             f"Machine: {start['cpu']}, {start['logical_cpus']} logical CPUs, torch {start['torch']}, "
             f"{start['threads']} torch threads. Command: `{' '.join(['bench_convergence.py'] + (argv or sys.argv[1:]))}`.",
             "", "| peak LR | model | metric | naive FM final FD | Diff2Flow first ≤ it at step | limit | met |",
             "|---|---|---|---:|---:|---:|---|"]
    sections, records = [], []
    for lr in args.lrs:
        b = replace(base, conv_lr=lr)
        t0 = time.perf_counter()
        bres = convergence(b, schedule)
        seconds = time.perf_counter() - t0
        for t in convergence_targets(bres):
            lines.append(f"| {lr:g} | {t['model']} | {t['metric']} | {t['naive_final']:.3f} | "
                         f"{t['reached'] if t['reached'] is not None else 'never'} | {t['limit']} | "
                         f"{'yes' if t['met'] else '**no**'} |")
            records.append({"lr": lr, **t})
        sections += [f"### Peak LR {lr:g} ({seconds / 60:.1f} min)", ""] + convergence_report(b, bres)[2:]
        records.append({"lr": lr, "seconds": seconds,
                        "curves": [{"model": mo, "method": me, "metric": k, "step": s, "fd": v,
                                    "mean": _mean_std(v)[0], "std": _mean_std(v)[1]}
                                   for (mo, me, k, s), v in bres["curves"].items()]})
    md = "\n".join(lines + [""] + sections) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"convergence_{args.tag}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, f"convergence_{args.tag}.json"), "w") as f:
        json.dump({"machine": start, "lrs": args.lrs, "records": records}, f, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
