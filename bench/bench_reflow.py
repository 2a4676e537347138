"""Reflow pair generation speed: D2FReflowPairs vs the stock KSampler (euler), one process, same model and settings.

    python bench/bench_reflow.py --out DIR           # GPU: SD1.5 layout, random fp16 weights, 512 px, 25 steps, cfg 7, batch 8
    python bench/bench_reflow.py --tiny --out DIR    # CPU smoke run (tiny UNet, 64 px, 3 steps)

Both sides run through the host's node code on one random-weight UNet (real SD1.5 architecture, fp16 file
loaded by the host's own loader), the same random prompt / negative, 25 steps, cfg 7, batch 8:

* stock: ``KSampler`` (sampler euler, scheduler simple) on the model as loaded, and on the D2FFlowPatch'ed
  model (the same ODE D2FReflowPairs solves), each call timed between ``cuda.synchronize()``s after one
  warm-up call; samples/s = batch / median seconds per call;
* ours: one ``D2FReflowPairs`` run making ``batch × (chunks)`` pairs, called as the executor calls it.
  Steady state: pairs/s from the progress-hook times at chunk boundaries (synchronised there only), the
  first chunk (model load) excluded. End to end: the node's wall time (model fingerprint, model load,
  sampling, chunk files on disk, reloading the folder). Re-run: the same node again on the finished folder
  (what the executor does after a completed run: nothing is sampled).

It prints numbers and ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_train  # noqa: E402  (host boot, random full-size UNets, executor-style node calls)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--chunks", type=int, default=4, help="D2FReflowPairs chunks (the first is warm-up)")
    ap.add_argument("--calls", type=int, default=3, help="timed stock calls per model (after one warm-up)")
    ap.add_argument("--out", default=os.path.join(bench_train.ROOT, "bench", "out"))
    args = ap.parse_args(argv)

    import torch
    nodes = bench_train.boot_host()
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    config, px = (bench_train.TINY_SD15, 64) if args.tiny else (bench_train.SD15, 512)
    steps = args.steps or (3 if args.tiny else 25)
    batch = args.batch
    work = tempfile.mkdtemp(prefix="d2f-bench-reflow-")
    path = os.path.join(work, "sd15.safetensors")
    bench_train.write_unet(path, config, device)
    model = comfy.sd.load_diffusion_model(path)
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def call_v1(node_id, **inputs):
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        with torch.inference_mode():
            return getattr(cls(), cls.FUNCTION)(**inputs)

    with torch.inference_mode():
        flow = nodes.NODE_CLASS_MAPPINGS["D2FFlowPatch"].execute(model=model, prediction="auto", label_offset=0).result[0]
    latent = call_v1("EmptyLatentImage", width=px, height=px, batch_size=batch)[0]

    def stock(m):
        sync()
        t0 = time.perf_counter()
        call_v1("KSampler", model=m, seed=0, steps=steps, cfg=args.cfg, sampler_name="euler", scheduler="simple",
                positive=positive, negative=negative, latent_image=latent, denoise=1.0)
        sync()
        return time.perf_counter() - t0

    results = {"stock": {}, "d2f": {}}
    for label, m in (("native", model), ("flow_patched", flow)):
        stock(m)  # warm-up (load, cudnn autotune)
        times = [stock(m) for _ in range(args.calls)]
        results["stock"][label] = {"seconds_per_call": times, "samples_per_s": batch / statistics.median(times)}
        print(json.dumps({"stock": label, **results["stock"][label]}), flush=True)

    # ours: chunk-boundary clock through the progress hook
    per_chunk = batch * steps
    marks: list[tuple[float, int]] = []

    def clock(value, total, preview, prompt_id=None, node_id=None):
        if value % per_chunk == 0:
            sync()
            marks.append((time.perf_counter(), int(value)))

    count = batch * args.chunks
    comfy.utils.set_progress_bar_global_hook(clock)
    sync()
    t_start = time.perf_counter()
    out = bench_train.run_node(nodes, "D2FReflowPairs", model=model, positive=positive, negative=negative, count=count,
                               width=px, height=px, steps=steps, cfg=args.cfg, seed=0, batch_size=batch, shift=1.0,
                               name="bench")
    sync()
    wall = time.perf_counter() - t_start
    comfy.utils.set_progress_bar_global_hook(None)
    couplings = out.result[0] if hasattr(out, "result") else out[0]
    chunk_ends = [t for t, _ in marks]
    chunk_times = [b - a for a, b in zip(chunk_ends, chunk_ends[1:])]  # chunks 2…: steady state
    t0 = time.perf_counter()
    bench_train.run_node(nodes, "D2FReflowPairs", model=model, positive=positive, negative=negative, count=count,
                         width=px, height=px, steps=steps, cfg=args.cfg, seed=0, batch_size=batch, shift=1.0, name="bench")
    rerun = time.perf_counter() - t0
    results["d2f"] = {"pairs": len(couplings), "wall_s": wall, "pairs_per_s_end_to_end": len(couplings) / wall,
                      "first_chunk_s": chunk_ends[0] - t_start if chunk_ends else None,
                      "steady_seconds_per_chunk": chunk_times,
                      "pairs_per_s_steady": batch / statistics.median(chunk_times) if chunk_times else None,
                      "rerun_finished_folder_s": rerun,
                      "bytes_per_pair": sum(os.path.getsize(os.path.join(couplings.folder, f))
                                            for f in os.listdir(couplings.folder)) / len(couplings)}
    print(json.dumps({"d2f": results["d2f"]}), flush=True)

    ours = results["d2f"]["pairs_per_s_steady"]
    native = results["stock"]["native"]["samples_per_s"]
    patched = results["stock"]["flow_patched"]["samples_per_s"]
    meta = {"device": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny,
            "resolution": px, "steps": steps, "cfg": args.cfg, "batch": batch, "weights": "random fp16 (SD1.5 layout)"}
    ratios = {"steady_vs_native_ksampler": ours / native if ours else None,
              "steady_vs_patched_ksampler": ours / patched if ours else None,
              "end_to_end_vs_native_ksampler": results["d2f"]["pairs_per_s_end_to_end"] / native}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "reflow_bench.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "ratios": ratios}, f, indent=1)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        f"Reflow pair generation, {gpu}, torch {torch.__version__}, {meta['date']}: SD1.5 layout random fp16 weights, "
        f"{px} px, {steps} steps, cfg {args.cfg:g}, batch {batch}", "",
        "| what | samples (pairs)/s | vs stock KSampler euler |", "|---|---|---|",
        f"| stock KSampler euler, model as loaded | {fmt(native)} | 1.00× |",
        f"| stock KSampler euler, D2FFlowPatch'ed model | {fmt(patched)} | {fmt(patched / native)}× |",
        f"| D2FReflowPairs, steady state (chunks 2–{args.chunks}) | {fmt(ours)} | {fmt(ratios['steady_vs_native_ksampler'])}× |",
        f"| D2FReflowPairs, end to end ({len(couplings)} pairs incl. fingerprint, load, files) | "
        f"{fmt(results['d2f']['pairs_per_s_end_to_end'])} | {fmt(ratios['end_to_end_vs_native_ksampler'])}× |",
        "", f"Re-running the node on the finished folder: {rerun:.2f} s (nothing sampled). "
            f"Disk: {results['d2f']['bytes_per_pair'] / 1024:.0f} KiB per pair."]
    table = "\n".join(lines)
    with open(os.path.join(args.out, "reflow_bench.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    mm.unload_all_models()


if __name__ == "__main__":
    main()
