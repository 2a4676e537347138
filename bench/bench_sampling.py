#!/usr/bin/env python3
"""Sampling benchmark: the D2FFlowPatch model vs native ComfyUI (and a peer pack), in ONE process.

Not a test. Builds full-size, real-architecture UNets with random fp16 weights (SD1.5 @512 and
SDXL @1024 layouts, detected by ComfyUI's own loader from the state dict), then samples each with
the stock KSampler path (``nodes.common_ksampler`` → ``comfy.sample.sample``), euler, 20 steps,
cfg 7, ``simple`` scheduler (an integer-label grid, where patched and native must agree to float
error), native vs patched on the same model, same noise, same conds.

Reported per config: median seconds per run (after warm-up, ``torch.cuda.synchronize`` around
each run), it/s, patched/native time ratio, max relative output difference; host syncs per step
counted two ways (``torch.cuda.set_sync_debug_mode("warn")`` and the torch profiler), from the
difference of a 20-step and a 10-step run; host cost per call of the model_sampling methods.

Optionally times Koratahiu's ComfyUI-Diff2Flow ``Diff2FlowODESampler`` (``--peer DIR``) on the
same model. It patches the shared BaseModel in place (registers buffers and methods on it), so it
runs LAST on each config's model, which is discarded afterwards.

Usage (GPU):  python bench/bench_sampling.py --out DIR [--peer .peer/ComfyUI-Diff2Flow]
Usage (CPU smoke test, tiny UNets, 2 steps):  python bench/bench_sampling.py --tiny
The host is found at $COMFYUI_PATH, else ~/ComfyUI.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Full configs exactly as comfy.model_detection.detect_unet_config reads them from real checkpoints.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
# Tiny variants for the CPU smoke test. The SD1.5 one is accepted by the real detector; the SDXL
# one is not (depths differ), so it is built from comfy.supported_models.SDXL directly.
SD15_TINY = dict(SD15_UNET, num_res_blocks=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                 channel_mult=[1], transformer_depth_middle=1)
SDXL_TINY = dict(SDXL_UNET, model_channels=64, num_res_blocks=[1, 1], transformer_depth=[0, 1],
                 transformer_depth_output=[0, 0, 1, 1], channel_mult=[1, 2], transformer_depth_middle=1)

CONFIGS = {  # name: (layout, batch, latent side, timed native/patched pairs)
    "sd15_512_b1": ("sd15", 1, 64, 8),
    "sd15_512_b4": ("sd15", 4, 64, 5),
    "sdxl_1024_b1": ("sdxl", 1, 128, 5),
}
TINY_CONFIGS = {
    "sd15_tiny_b1": ("sd15", 1, 8, 2),
    "sd15_tiny_b2": ("sd15", 2, 8, 1),
    "sdxl_tiny_b1": ("sdxl", 1, 8, 1),
}


def log(*a):
    print(f"[bench {time.strftime('%H:%M:%S')}]", *a, flush=True)


# --------------------------------------------------------------------------------------------- host
def bootstrap(args):
    host = os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/ComfyUI")
    if not os.path.isfile(os.path.join(host, "comfy", "model_sampling.py")):
        sys.exit(f"no ComfyUI host at {host} (set COMFYUI_PATH)")
    sys.path.insert(0, host)
    import torch
    import comfy.cli_args
    if args.cpu:
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (after args.cpu)
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars in the KSampler path (both sides alike)
    import nodes as host_nodes
    ok = asyncio.run(host_nodes.load_custom_node(str(REPO)))
    if not ok or "D2FFlowPatch" not in host_nodes.NODE_CLASS_MAPPINGS:
        sys.exit("could not load the Diff2Flow Bridge pack as a custom node")
    peer_ok, peer_err = False, None
    if args.peer:
        try:
            peer_ok = asyncio.run(host_nodes.load_custom_node(str(Path(args.peer).resolve())))
            peer_ok = peer_ok and "Diff2FlowODESampler" in host_nodes.NODE_CLASS_MAPPINGS
            if not peer_ok:
                peer_err = "load_custom_node failed (see log above; needs torchdiffeq)"
        except Exception as exc:  # noqa: BLE001
            peer_err = repr(exc)
    return host, torch, host_nodes, peer_ok, peer_err


# -------------------------------------------------------------------------------------------- model
def random_init_(module, seed, gen_device):
    """torch's default init (uniform ±1/sqrt(fan_in)) for linear/conv, ones/zeros for norms;
    ComfyUI's ops skip init, so the fresh model holds uninitialised memory otherwise."""
    import torch
    g = torch.Generator(device=gen_device).manual_seed(seed)
    done = set()

    def fill(p, lo, hi):
        t = torch.empty(p.shape, device=gen_device, dtype=torch.float32).uniform_(lo, hi, generator=g)
        p.data.copy_(t)
        done.add(id(p))

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.data.fill_(1.0); done.add(id(m.weight))
                if getattr(m, "bias", None) is not None:
                    m.bias.data.zero_(); done.add(id(m.bias))
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                fan_in = m.weight[0].numel()
                b = 1.0 / math.sqrt(fan_in)
                fill(m.weight, -b, b)
                if m.bias is not None:
                    fill(m.bias, -b, b)
        rest = [(n, p) for n, p in module.named_parameters() if id(p) not in done]
        for n, p in rest:
            fill(p, -0.02, 0.02)
    return [n for n, _ in rest]


def build_model(torch, layout, tiny, dtype, seed):
    """A ModelPatcher for a random-weight UNet, through comfy.sd.load_diffusion_model_state_dict
    (the real detector + loader) when the detector accepts the layout."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    cfg = dict((SD15_TINY if tiny else SD15_UNET) if layout == "sd15" else (SDXL_TINY if tiny else SDXL_UNET))
    mc = comfy.model_detection.model_config_from_unet_config(dict(cfg))
    if mc is None:
        mc = (comfy.supported_models.SD15 if layout == "sd15" else comfy.supported_models.SDXL)(dict(cfg))
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({})
    gen_device = "cuda" if torch.cuda.is_available() and not mm.cpu_mode() else "cpu"
    t0 = time.perf_counter()
    leftover = random_init_(model.diffusion_model, seed, gen_device)
    sd = {k: v.to(dtype) for k, v in model.diffusion_model.state_dict().items()}
    n_params = sum(v.numel() for v in sd.values())
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": dtype})
    how = "comfy.sd.load_diffusion_model_state_dict (real detector)"
    if patcher is None or type(patcher.model.model_config).__name__ != type(mc).__name__:
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        how = f"direct {type(mc).__name__}.get_model (detector does not accept this layout)"
    else:
        del model
    del sd
    gc.collect()
    info = {"built_via": how, "model_config": type(patcher.model.model_config).__name__,
            "model_base": type(patcher.model).__name__, "model_sampling": type(patcher.model.model_sampling).__name__,
            "params": n_params, "dtype": str(dtype), "init_other_params": leftover,
            "build_s": round(time.perf_counter() - t0, 2)}
    return patcher, info


def make_conds(torch, layout, side, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "sd15":
        return [[torch.randn(1, 77, 768, generator=g), {}]], [[torch.randn(1, 77, 768, generator=g), {}]]
    px = side * 8

    def c():
        return [[torch.randn(1, 77, 2048, generator=g),
                 {"pooled_output": torch.randn(1, 1280, generator=g), "width": px, "height": px,
                  "crop_w": 0, "crop_h": 0, "target_width": px, "target_height": px}]]
    return c(), c()


# -------------------------------------------------------------------------------------------- runs
class Runner:
    def __init__(self, torch, host_nodes, steps, cfg, seed, pos, neg, latent):
        self.torch, self.nodes = torch, host_nodes
        self.steps, self.cfg, self.seed = steps, cfg, seed
        self.pos, self.neg, self.latent = pos, neg, latent
        import comfy.utils
        self.comfy_utils = comfy.utils

    def sync(self):
        if self.torch.cuda.is_available():
            self.torch.cuda.synchronize()

    def ksampler(self, model, steps=None, scheduler="simple", sampler="euler", events=None):
        """``nodes.common_ksampler`` (the KSampler node) line for line, with the stock preview
        callback wrapped to record one CUDA event per step when ``events`` is given."""
        import comfy.sample
        import latent_preview
        steps = steps or self.steps
        latent_image = comfy.sample.fix_empty_latent_channels(model, self.latent["samples"], None, None)
        noise = comfy.sample.prepare_noise(latent_image, self.seed, None)
        stock = latent_preview.prepare_callback(model, steps)
        if events is None:
            callback = stock
        else:
            def callback(step, x0, x, total_steps):
                events[step].record()
                stock(step, x0, x, total_steps)
        disable_pbar = not self.comfy_utils.PROGRESS_BAR_ENABLED
        return comfy.sample.sample(model, noise, steps, self.cfg, sampler, scheduler, self.pos, self.neg, latent_image,
                                   denoise=1.0, disable_noise=False, start_step=None, last_step=None,
                                   force_full_denoise=False, noise_mask=None, callback=callback,
                                   disable_pbar=disable_pbar, seed=self.seed)

    def measured(self, model):
        """One timed KSampler run: wall s, process CPU s, steady ms/step (CUDA events), GPU state."""
        torch = self.torch
        cuda = torch.cuda.is_available()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(self.steps)] if cuda else None
        self.sync()
        c0, t0 = time.process_time(), time.perf_counter()
        out = self.ksampler(model, events=events)
        self.sync()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        step_ms = None
        if cuda and self.steps >= 3:
            deltas = [events[i].elapsed_time(events[i + 1]) for i in range(1, self.steps - 1)]
            step_ms = statistics.median(deltas)
        return {"wall_s": wall, "cpu_s": cpu, "step_ms": step_ms, "gpu": gpu_state()}, out

    def peer(self, model, steps=None, scheduler="simple"):
        cls = self.nodes.NODE_CLASS_MAPPINGS["Diff2FlowODESampler"]
        out = cls().sample(model, "euler", steps or self.steps, self.cfg, 1.0, self.seed, self.pos, self.neg,
                           self.latent, scheduler, disable_pbar=True)
        return out[0]["samples"]

    def timed(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out


_NVML = {}


def gpu_state():
    """SM clock (MHz), power (W), temperature (C), clock-event reasons bitmask, via NVML when available."""
    try:
        if "h" not in _NVML:
            import pynvml
            pynvml.nvmlInit()
            _NVML["m"], _NVML["h"] = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        m, h = _NVML["m"], _NVML["h"]
        reasons = getattr(m, "nvmlDeviceGetCurrentClocksEventReasons", None) or m.nvmlDeviceGetCurrentClocksThrottleReasons
        return {"sm_mhz": m.nvmlDeviceGetClockInfo(h, m.NVML_CLOCK_SM), "power_w": round(m.nvmlDeviceGetPowerUsage(h) / 1000, 1),
                "temp_c": m.nvmlDeviceGetTemperature(h, m.NVML_TEMPERATURE_GPU), "reasons": int(reasons(h))}
    except Exception as exc:  # noqa: BLE001
        _NVML["h"] = None
        return None if "err" in _NVML else _NVML.setdefault("err", repr(exc))


def diff_stats(torch, a, b):
    """a vs reference b: max|a-b|/max|b| and ||a-b||/||b|| in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    d = (a - b).abs()
    return {"max_rel": float(d.max() / b.abs().max()), "rel_l2": float((a - b).norm() / b.norm()),
            "max_abs": float(d.max()), "ref_max_abs": float(b.abs().max()),
            "finite": bool(torch.isfinite(a).all() and torch.isfinite(b).all())}


def count_sync_warnings(torch, fn):
    """Synchronising CUDA calls made while fn runs, by Python call site."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    sites = collections.Counter()
    for w in rec:
        msg = str(w.message)
        if "synchroniz" not in msg.lower():
            continue
        f = str(w.filename)
        for root in (os.environ.get("COMFYUI_PATH", "~"), str(REPO)):
            if root and f.startswith(root):
                f = os.path.relpath(f, root)
        sites[f"{f}:{w.lineno}"] += 1
    return {"total": sum(sites.values()), "sites": dict(sites.most_common(20))}


def count_profiler(torch, fn):
    """CUDA runtime sync calls and device→host copies recorded by the torch profiler while fn runs."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = collections.Counter(e.name for e in prof.events())
    sync_names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
    # the final torch.cuda.synchronize() above is one cudaDeviceSynchronize: not part of fn
    syncs = {k: names.get(k, 0) for k in sync_names}
    syncs["cudaDeviceSynchronize"] = max(0, syncs["cudaDeviceSynchronize"] - 1)
    dtoh = {k: v for k, v in names.items() if "DtoH" in k or "Device -> Pageable" in k or "Device -> Pinned" in k}
    memcpy_api = {k: v for k, v in names.items() if k.startswith("cudaMemcpy")}
    return {"sync_calls": sum(syncs.values()), "sync_by_name": syncs,
            "dtoh_copies": sum(dtoh.values()), "dtoh_by_name": dtoh, "memcpy_api": memcpy_api}


def call_overheads(torch, base, flow, batch, side, device, iters):
    """Host µs per call of timestep / calculate_input / calculate_denoised, base vs flow model_sampling,
    at the cfg batch (2·B) and latent shape the sampler uses."""
    n = 2 * batch
    x = torch.randn(n, 4, side, side, device=device)
    out = torch.randn(n, 4, side, side, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    res = {}
    for name, ms, sig_val in (("native", base, 5.0), ("patched", flow, 5.0 / 6.0)):
        sig = torch.full((n,), sig_val, device=device)
        calls = {
            "timestep": lambda: ms.timestep(sig),
            "calculate_input": lambda: ms.calculate_input(sig, x),
            "calculate_denoised": lambda: ms.calculate_denoised(sig, out, x),
        }
        r = {}
        for cname, fn in calls.items():
            for _ in range(20):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            host = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.synchronize()
            total = time.perf_counter() - t0
            r[cname] = {"host_us": round(host / iters * 1e6, 2), "wall_us": round(total / iters * 1e6, 2)}
        res[name] = r
    return res


def profile_kernels_per_call(torch, ms, sig, x, out):
    """Kernel launches per timestep / calculate_denoised call."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile
    res = {}
    for cname, fn in (("timestep", lambda: ms.timestep(sig)), ("calculate_input", lambda: ms.calculate_input(sig, x)),
                      ("calculate_denoised", lambda: ms.calculate_denoised(sig, out, x))):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        res[cname] = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    return res


def fp32_control(args, torch, host_nodes, result):
    """SD1.5 layout, bs1, fp32 UNet (TF32 off): patched vs native should agree to fp32 rounding; shows
    whether the fp16 difference is the bridge's math or fp16 rounding amplified by the random net."""
    import comfy.model_management as mm
    side = 8 if args.tiny else 64
    mm_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    c = {"layout": "sd15", "batch": 1, "latent": [1, 4, side, side], "steps": args.steps, "tf32": False}
    result["fp32_control"] = c
    try:
        model, info = build_model(torch, "sd15", args.tiny, torch.float32, seed=1234)
        c["model"] = info
        patched = host_nodes.NODE_CLASS_MAPPINGS["D2FFlowPatch"].execute(model).args[0]
        pos, neg = make_conds(torch, "sd15", side, seed=99)
        run = Runner(torch, host_nodes, args.steps, args.cfg, 42, pos, neg, {"samples": torch.zeros(1, 4, side, side)})
        n = run.ksampler(model)
        p = run.ksampler(patched)
        n2 = run.ksampler(model)
        c["diff_patched_vs_native"] = diff_stats(torch, p, n)
        c["diff_native_repeat"] = diff_stats(torch, n2, n)
        log(f"== fp32 control: patched vs native {c['diff_patched_vs_native']}")
        del model, patched, run
    except Exception:  # noqa: BLE001
        c["error"] = traceback.format_exc()
        log(c["error"])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = mm_tf32
        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()


def bench_config(name, spec, args, torch, host_nodes, peer_ok, result):
    import comfy.model_management as mm
    layout, batch, side, k = spec
    k = args.pairs or k
    steps = args.steps
    dtype = torch.float32 if args.cpu else torch.float16
    r = {"layout": layout, "batch": batch, "latent": [batch, 4, side, side], "pixels": side * 8, "steps": steps,
         "cfg": args.cfg, "sampler": "euler", "scheduler": "simple"}
    result["configs"][name] = r
    log(f"== {name}: building {layout} UNet")
    model, info = build_model(torch, layout, args.tiny, dtype, seed=1234)
    r["model"] = info
    log(f"   {info}")
    patch_cls = host_nodes.NODE_CLASS_MAPPINGS["D2FFlowPatch"]
    patched = patch_cls.execute(model).args[0]
    pos, neg = make_conds(torch, layout, side, seed=99)
    latent = {"samples": torch.zeros(batch, 4, side, side)}
    run = Runner(torch, host_nodes, steps, args.cfg, 42, pos, neg, latent)

    # --- timing: one warm-up each, then pairs in alternating order (AB, BA, AB, …). Every KSampler call
    # detaches and re-patches its clone (comfy.model_management.load_models_gpu), so native and patched
    # pay the same per-call load cost whether or not the other ran just before.
    sides = {"native": model, "patched": patched}
    rec = {"native": [], "patched": []}
    outs, warm = {}, {}
    for sname in ("native", "patched"):
        m_, _o = run.measured(sides[sname])
        warm[sname] = round(m_["wall_s"], 4)
    for i in range(k):
        order = ("native", "patched") if i % 2 == 0 else ("patched", "native")
        for sname in order:
            m_, o_ = run.measured(sides[sname])
            rec[sname].append(m_)
            outs.setdefault(sname, o_)
    for sname in ("native", "patched"):
        w = [x["wall_s"] for x in rec[sname]]
        st = [x["step_ms"] for x in rec[sname] if x["step_ms"] is not None]
        med = statistics.median(w)
        r[sname] = {"median_s": med, "min_s": min(w), "runs_s": [round(x, 4) for x in w],
                    "cpu_s": [round(x["cpu_s"], 4) for x in rec[sname]], "warm_s": warm[sname],
                    "it_per_s": steps / med, "ms_per_step": med / steps * 1e3,
                    "steady_ms_per_step": statistics.median(st) if st else None,
                    "steady_ms_per_step_runs": [round(x, 3) for x in st],
                    "gpu_after_run": [x["gpu"] for x in rec[sname]]}
        log(f"   {sname}: warm {warm[sname]:.3f}s, runs {r[sname]['runs_s']}, steady ms/step {r[sname]['steady_ms_per_step_runs']}")
    pair = [p["wall_s"] / n["wall_s"] for n, p in zip(rec["native"], rec["patched"])]
    r["pair_ratios"] = [round(x, 4) for x in pair]
    r["ratio_patched_over_native"] = statistics.median(pair)
    r["ratio_of_medians"] = r["patched"]["median_s"] / r["native"]["median_s"]
    if r["native"]["steady_ms_per_step"]:
        sp = [p["step_ms"] / n["step_ms"] for n, p in zip(rec["native"], rec["patched"])]
        r["steady_step_ratio"] = statistics.median(sp)
        r["steady_step_pair_ratios"] = [round(x, 4) for x in sp]
    r["diff_patched_vs_native"] = diff_stats(torch, outs["patched"], outs["native"])
    base_ms = model.get_model_object("model_sampling")
    flow_ms = patched.get_model_object("model_sampling")
    from comfy.samplers import calculate_sigmas
    sn = calculate_sigmas(base_ms, "simple", steps).double()
    sp = calculate_sigmas(flow_ms, "simple", steps).double()
    r["sigma_grid_check"] = {"max_abs(phi(native) - patched)": float((sn / (1 + sn) - sp).abs().max()),
                             "native_first": float(sn[0]), "patched_first": float(sp[0])}
    log(f"   ratio (median of pairs) {r['ratio_patched_over_native']:.4f}, of medians {r['ratio_of_medians']:.4f}, "
        f"steady step {r.get('steady_step_ratio')}; diff {r['diff_patched_vs_native']}")

    device = mm.get_torch_device()
    if name == args.sync_config or args.tiny:
        # --- host syncs per step: 20-step minus 10-step run, both sides
        hs = max(1, steps // 2)
        syncs = {}
        r["host_syncs"] = syncs
        for s, m in (("native", model), ("patched", patched)):
            try:
                w20 = count_sync_warnings(torch, lambda: run.ksampler(m, steps=steps))
                w10 = count_sync_warnings(torch, lambda: run.ksampler(m, steps=hs))
                p20 = count_profiler(torch, lambda: run.ksampler(m, steps=steps))
                p10 = count_profiler(torch, lambda: run.ksampler(m, steps=hs))
                syncs[s] = summarize_syncs(w20, w10, p20, p10, steps, hs)
                log(f"   syncs {s}: {json.dumps({k2: v for k2, v in syncs[s].items() if k2.endswith('per_step')})}")
            except Exception:  # noqa: BLE001
                torch.cuda.set_sync_debug_mode(0) if torch.cuda.is_available() else None
                syncs[s] = {"error": traceback.format_exc()}
                log(syncs[s]["error"])
        # --- per-call host cost of the model_sampling methods
        try:
            r["call_overheads_us"] = call_overheads(torch, base_ms, flow_ms, batch, side, device, args.overhead_iters)
            n2 = 2 * batch
            x = torch.randn(n2, 4, side, side, device=device)
            o = torch.randn(n2, 4, side, side, device=device)
            r["kernels_per_call"] = {
                "native": profile_kernels_per_call(torch, base_ms, torch.full((n2,), 5.0, device=device), x, o),
                "patched": profile_kernels_per_call(torch, flow_ms, torch.full((n2,), 5 / 6, device=device), x, o)}
            r["model_sampling_devices"] = {"native_sigmas": str(base_ms.sigmas.device),
                                           "patched_sigmas": str(flow_ms.sigmas.device)}
            log(f"   call overheads {json.dumps(r['call_overheads_us'])}  kernels {json.dumps(r['kernels_per_call'])}")
        except Exception:  # noqa: BLE001
            r["call_overheads_error"] = traceback.format_exc()
            log(r["call_overheads_error"])

    # native again, same inputs: run-to-run repeatability, and it leaves the native clone injected, so that
    # the shared BaseModel's model_sampling is the original one when the peer reads it (see README)
    r["diff_native_repeat"] = diff_stats(torch, run.ksampler(model), outs["native"])

    # --- peer LAST: it mutates the shared BaseModel in place
    if peer_ok:
        pr = {"note": "Diff2FlowODESampler(solver euler, scheduler simple, same steps/cfg/seed/conds); run after all "
                      "native/patched runs on this model because it registers df_* buffers and methods on the shared "
                      "BaseModel in place; the model is discarded afterwards."}
        r["peer"] = pr
        try:
            had = hasattr(model.model, "get_diff2flow_velocity")
            t, o = run.timed(lambda: run.peer(model))
            pr["warm_s"] = round(t, 4)
            pr["mutated_shared_model"] = (not had) and hasattr(model.model, "get_diff2flow_velocity")
            pts = []
            for _ in range(max(args.peer_reps, 1)):
                t, _o = run.timed(lambda: run.peer(model))
                pts.append(t)
            med = statistics.median(pts)
            pr.update({"median_s": med, "min_s": min(pts), "runs_s": [round(x, 4) for x in pts],
                       "it_per_s": steps / med, "ratio_over_native": med / r["native"]["median_s"],
                       "diff_vs_native": diff_stats(torch, o, outs["native"]),
                       "diff_vs_patched": diff_stats(torch, o, outs["patched"])})
            log(f"   peer runs {pr['runs_s']} ratio {pr['ratio_over_native']:.3f} diff {pr['diff_vs_native']}")
            if name == args.sync_config or args.tiny:
                hs = max(1, steps // 2)
                w20 = count_sync_warnings(torch, lambda: run.peer(model, steps=steps))
                w10 = count_sync_warnings(torch, lambda: run.peer(model, steps=hs))
                p20 = count_profiler(torch, lambda: run.peer(model, steps=steps))
                p10 = count_profiler(torch, lambda: run.peer(model, steps=hs))
                pr["host_syncs"] = summarize_syncs(w20, w10, p20, p10, steps, hs)
                log(f"   syncs peer: {json.dumps({k2: v for k2, v in pr['host_syncs'].items() if k2.endswith('per_step')})}")
        except Exception:  # noqa: BLE001
            pr["error"] = traceback.format_exc()
            log(pr["error"])

    del model, patched, run, outs
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


def summarize_syncs(w20, w10, p20, p10, steps, hs):
    d = steps - hs
    s = {}
    if w20 is not None:
        s["sync_debug_warnings_run20"] = w20["total"]
        s["sync_debug_warnings_run10"] = w10["total"]
        s["sync_debug_warnings_per_step"] = (w20["total"] - w10["total"]) / d
        s["sync_debug_sites_run20"] = w20["sites"]
    if p20 is not None:
        s["profiler_sync_calls_run20"] = p20["sync_calls"]
        s["profiler_sync_calls_run10"] = p10["sync_calls"]
        s["profiler_sync_calls_per_step"] = (p20["sync_calls"] - p10["sync_calls"]) / d
        s["profiler_dtoh_copies_run20"] = p20["dtoh_copies"]
        s["profiler_dtoh_copies_run10"] = p10["dtoh_copies"]
        s["profiler_dtoh_copies_per_step"] = (p20["dtoh_copies"] - p10["dtoh_copies"]) / d
        s["profiler_detail_run20"] = {k: p20[k] for k in ("sync_by_name", "dtoh_by_name", "memcpy_api")}
    if not s:
        s["note"] = "no CUDA: sync counting skipped"
    return s


# ------------------------------------------------------------------------------------------ report
def file_digest(paths):
    h = hashlib.sha256()
    for p in paths:
        fp = REPO / p
        h.update(p.encode())
        h.update(fp.read_bytes() if fp.exists() else b"<missing>")
    return h.hexdigest()[:16]


def markdown(result):
    e = result["env"]
    lines = [f"# Sampling benchmark: D2FFlowPatch vs native ComfyUI{' (TINY CPU smoke test)' if result['tiny'] else ''}",
             "",
             f"- machine: {e['device']} ({e.get('device_kind', '?')}), host {e['hostname']}",
             f"- date: {e['date']}; torch {e['torch']} (CUDA {e['cuda']}); ComfyUI {e['comfyui']}; Python {e['python']}",
             f"- pack code digest (flow_sampling/flow_nodes/bridge/schedule): {e['code_digest']}",
             f"- euler, {result['steps']} steps, cfg {result['cfg']}, scheduler simple, KSampler node path, "
             f"random weights, {result['dtype']}; time per run = median after warm-up (torch.cuda.synchronize)",
             "",
             "| config | native s/run (it/s) | patched s/run (it/s) | patched/native: median of pair ratios | ratio of medians | steady ms/step native → patched (ratio) | max rel diff (rel L2) | peer s/run (it/s) | peer/native | peer max rel diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["configs"].items():
        if "native" not in r:
            lines.append(f"| {name} | error: {r.get('error', '?').strip().splitlines()[-1][:100]} |")
            continue
        p = r.get("peer", {})
        peer_cols = (f"{p['median_s']:.3f} ({p['it_per_s']:.2f}) | {p['ratio_over_native']:.3f} | {p['diff_vs_native']['max_rel']:.3g}"
                     if "median_s" in p else ("error | | " if "error" in p else "– | – | –"))
        d = r["diff_patched_vs_native"]
        n, q = r["native"], r["patched"]
        steady = (f"{n['steady_ms_per_step']:.2f} → {q['steady_ms_per_step']:.2f} ({r['steady_step_ratio']:.4f})"
                  if n.get("steady_ms_per_step") else "–")
        lines.append(f"| {name} (bs{r['batch']}, {r['pixels']}px) | {n['median_s']:.4f} ({n['it_per_s']:.2f}) | "
                     f"{q['median_s']:.4f} ({q['it_per_s']:.2f}) | **{r['ratio_patched_over_native']:.4f}** | {r['ratio_of_medians']:.4f} | "
                     f"{steady} | {d['max_rel']:.2e} ({d['rel_l2']:.2e}) | {peer_cols} |")
    c = result.get("fp32_control")
    if c and "diff_patched_vs_native" in c:
        lines += ["", f"fp32 control (SD1.5 layout bs1, fp32 UNet, TF32 off): patched vs native max rel "
                      f"{c['diff_patched_vs_native']['max_rel']:.2e} (rel L2 {c['diff_patched_vs_native']['rel_l2']:.2e}); "
                      f"native repeat {c['diff_native_repeat']['max_rel']:.2e}"]
    lines += ["", f"Host syncs per sampler step = (run of {result['steps']} steps − run of {result['steps'] // 2 or 1} steps)/difference; columns: sync-debug warnings | profiler cudaStream/Device/EventSynchronize | profiler DtoH copies):", ""]
    for name, r in result["configs"].items():
        for who, hs in (("native", r.get("host_syncs", {}).get("native")), ("patched", r.get("host_syncs", {}).get("patched")),
                        ("peer", r.get("peer", {}).get("host_syncs"))):
            if hs and "sync_debug_warnings_per_step" in hs:
                lines.append(f"- {name} {who}: {hs['sync_debug_warnings_per_step']:g} | {hs['profiler_sync_calls_per_step']:g} | "
                             f"{hs['profiler_dtoh_copies_per_step']:g} per step (full-run totals: {hs['sync_debug_warnings_run20']} | "
                             f"{hs['profiler_sync_calls_run20']} | {hs['profiler_dtoh_copies_run20']})")
        if "call_overheads_us" in r:
            lines.append(f"- {name} host µs per call (native → patched): " + ", ".join(
                f"{c} {r['call_overheads_us']['native'][c]['host_us']} → {r['call_overheads_us']['patched'][c]['host_us']}"
                for c in r["call_overheads_us"]["native"]))
        if r.get("kernels_per_call"):
            lines.append(f"- {name} kernels per call (native → patched): " + ", ".join(
                f"{c} {r['kernels_per_call']['native'][c]} → {r['kernels_per_call']['patched'][c]}"
                for c in (r["kernels_per_call"]["native"] or {})))
    return "\n".join(lines) + "\n"


def main():
    os.environ.setdefault("TQDM_DISABLE", "1")  # the peer's own tqdm bars
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny UNets, 2 steps, small latents")
    ap.add_argument("--cpu", action="store_true", help="force ComfyUI's CPU mode (implied by --tiny without CUDA)")
    ap.add_argument("--configs", default=None, help="comma-separated subset of config names")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--peer", default=None, help="path of Koratahiu/ComfyUI-Diff2Flow to load as a custom node")
    ap.add_argument("--peer-reps", type=int, default=3)
    ap.add_argument("--sync-config", default="sd15_512_b1", help="config on which host syncs are counted")
    ap.add_argument("--no-fp32-control", action="store_true")
    ap.add_argument("--pairs", type=int, default=None, help="override the number of timed native/patched pairs")
    ap.add_argument("--overhead-iters", type=int, default=2000)
    ap.add_argument("--device-kind", default=os.environ.get("DEVICE_KIND", "?"))
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "out"))
    args = ap.parse_args()
    if args.tiny:
        args.steps = args.steps or 2
        args.peer_reps = 1
        args.overhead_iters = 50
    args.steps = args.steps or 20

    import torch
    if args.tiny and not torch.cuda.is_available():
        args.cpu = True
    host, torch, host_nodes, peer_ok, peer_err = bootstrap(args)
    import comfyui_version
    configs = TINY_CONFIGS if args.tiny else CONFIGS
    if args.configs:
        configs = {k: v for k, v in configs.items() if k in args.configs.split(",")}
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu else platform.processor() or "cpu"
    result = {
        "tiny": args.tiny, "steps": args.steps, "cfg": args.cfg, "dtype": "float32" if args.cpu else "float16",
        "env": {"device": dev, "device_kind": args.device_kind, "hostname": platform.node(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                "comfyui": comfyui_version.__version__, "comfyui_path": host,
                "code_digest": file_digest(["nodes/flow_sampling.py", "nodes/flow_nodes.py",
                                            "d2f_core/flow/bridge.py", "d2f_core/flow/schedule.py"]),
                "peer": {"path": args.peer, "loaded": peer_ok, "error": peer_err,
                         "commit": (Path(args.peer).resolve().parent / "COMMIT").read_text().strip()
                         if args.peer and (Path(args.peer).resolve().parent / "COMMIT").exists() else None}},
        "configs": {},
    }
    log(json.dumps(result["env"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, spec in configs.items():
        try:
            bench_config(name, spec, args, torch, host_nodes, peer_ok, result)
        except Exception:  # noqa: BLE001
            result["configs"].setdefault(name, {})["error"] = traceback.format_exc()
            log(result["configs"][name]["error"])
            try:
                import comfy.model_management as mm
                mm.unload_all_models(); gc.collect(); mm.soft_empty_cache()
            except Exception:  # noqa: BLE001
                pass
        (out / "bench_sampling.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "bench_sampling.md").write_text(markdown(result))
    if not args.no_fp32_control:
        fp32_control(args, torch, host_nodes, result)
        (out / "bench_sampling.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "bench_sampling.md").write_text(markdown(result))
    print(markdown(result), flush=True)
    errors = [n for n, r in result["configs"].items() if "error" in r]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
