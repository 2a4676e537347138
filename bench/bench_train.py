"""Training throughput: D2FTrain vs ComfyUI's own TrainLoraNode, one process, same model and data.

    python bench/bench_train.py --arch sd15 sdxl --out DIR        # on the GPU machine (full-size UNets)
    python bench/bench_train.py --tiny --out DIR                   # CPU smoke run (tiny UNets)

Both nodes run through the host's executor path on the same random-weight UNet (real SD1.5 / SDXL
architecture, fp16 checkpoint loaded by the host's own loader), the same latents and captions,
LoRA rank 16, bf16. Throughput is read from the host's progress-bar hook (timestamps of step counts,
warm-up steps excluded): samples/s = Δsteps·batch / Δt. Peak memory is torch's max allocated for
the whole run, model weights included. MFU = 3 × forward FLOPs per sample × samples/s / device peak.
This is a benchmark: it prints numbers and ratios; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Full-size architectures (the host's detector recognises these as SD15 / SDXL).
COMMON = dict(in_channels=4, out_channels=4, image_size=32, use_spatial_transformer=True, legacy=False,
              use_checkpoint=False, use_temporal_attention=False, use_temporal_resblock=False)
SD15 = dict(COMMON, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            transformer_depth_middle=1, context_dim=768, num_heads=8, num_head_channels=-1,
            use_linear_in_transformer=False, adm_in_channels=None)
SDXL = dict(COMMON, model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2],
            transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
            transformer_depth_middle=10, context_dim=2048, num_heads=-1, num_head_channels=64,
            use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential")
TINY_SD15 = dict(COMMON, model_channels=320, channel_mult=[1], num_res_blocks=[1], transformer_depth=[1],
                 transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768, num_heads=8,
                 num_head_channels=-1, use_linear_in_transformer=False, adm_in_channels=None)
TINY_SDXL = dict(COMMON, model_channels=320, channel_mult=[1, 1, 1], num_res_blocks=[2, 2, 2],
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0] * 9, transformer_depth_middle=0,
                 context_dim=2048, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True,
                 adm_in_channels=2816, num_classes="sequential")

# Dense bf16 peaks from the vendor's data sheets (SXM parts).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12}


def boot_host():
    host = os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/ComfyUI")
    sys.path.insert(0, host)
    import comfy.cli_args
    import torch
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import nodes
    import folder_paths
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    asyncio.run(nodes.load_custom_node(ROOT))
    folder_paths.set_output_directory(tempfile.mkdtemp(prefix="d2f-bench-out-"))
    import comfy.utils
    comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL = 0.0  # every update reaches the hook: we time with it
    comfy.utils.PROGRESS_THROTTLE_MIN_PERCENT = 0.0
    return nodes


def run_node(nodes, node_id: str, lists: tuple[str, ...] = (), **inputs):
    """Call a node as the executor does (V3: class clone + locked method), inputs as lists
    (both trainers are list-input nodes; the inputs named in ``lists`` are given as lists already),
    schema defaults for what is not given."""
    import torch
    from comfy_api.internal import make_locked_method_func
    if node_id == "D2FTrain":
        inputs = with_option_nodes(nodes, inputs)
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    cls.VALIDATE_CLASS()
    schema = cls.GET_SCHEMA()
    for inp in schema.inputs:
        if inp.id not in inputs and getattr(inp, "default", None) is not None:
            inputs[inp.id] = inp.default
    fn = make_locked_method_func(cls, cls.FUNCTION, cls.PREPARE_CLASS_CLONE(None))
    with torch.inference_mode():
        return fn(**{k: v if k in lists else [v] for k, v in inputs.items()})


def with_option_nodes(nodes, settings: dict) -> dict:
    """D2FTrain's inputs for settings named flat (its widgets before issue 12): each group of settings that moved
    to an option node (web/legacy_widgets.json) becomes that node's output on D2FTrain's input, the rest of the
    group at the node's defaults, as a migrated workflow runs."""
    with open(os.path.join(ROOT, "web", "legacy_widgets.json"), encoding="utf-8") as f:
        moved = json.load(f)["D2FTrain"]["moved"]
    out = dict(settings)
    for option_type, spec in moved.items():
        given = {new: out.pop(old) for old, new in spec["widgets"].items() if old in out}
        if given:
            values = {i.id: i.default for i in nodes.NODE_CLASS_MAPPINGS[option_type].GET_SCHEMA().inputs}
            values.update(given)
            result = run_node(nodes, option_type, lists=tuple(values), **values)  # not a list-input node
            out[spec["input"]] = result.args[0] if hasattr(result, "args") else result[0]
    return out


def write_unet(path: str, config: dict, device) -> None:
    """A random-weight UNet file in the real key layout, written as fp16 like a released checkpoint."""
    import comfy.model_detection
    import comfy.utils
    import torch
    model_config = comfy.model_detection.model_config_from_unet_config(dict(config))
    with torch.device("meta"):
        unet = model_config.get_model({}).diffusion_model
        shapes = {k: v.shape for k, v in unet.state_dict().items()}
    # Norm scales are 1 (a zero scale, e.g. the output GroupNorm "out.0", would make the output and every
    # gradient exactly zero). Found by module type: not every norm has "norm" in its key.
    norms = {f"{name}.weight" for name, m in unet.named_modules()
             if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or "Norm" in type(m).__name__}
    g = torch.Generator(device=device).manual_seed(0)
    sd = {}
    for k, shape in shapes.items():
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        if len(shape) > 1:
            t = torch.randn(shape, generator=g, device=device) / fan_in ** 0.5
        elif k in norms:
            t = torch.ones(shape, device=device)
        else:
            t = torch.zeros(shape, device=device)
        sd[k] = t.half().cpu()
    comfy.utils.save_torch_file(sd, path)


class StepClock:
    """Records (time, step) from the host's progress hook."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def __call__(self, value, total, preview, prompt_id=None, node_id=None):
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), int(value)))

    def steps_per_second(self, skip: int) -> float | None:
        marks = [m for m in self.marks if m[1] >= skip]
        if len(marks) < 2 or marks[-1][1] == marks[0][1]:
            return None
        return (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])


def measure(nodes, trainer: str, model, latents, conds, batch: int, ckpt: bool, steps: int, skip: int,
            compile_unet: bool = False, mode: str = "lora", graphs: bool = True, targets: str = "attention"):
    import comfy.model_management as mm
    import comfy.utils
    import torch
    mm.unload_all_models()
    mm.soft_empty_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    comfy.utils.set_progress_bar_global_hook(clock)
    t0 = time.perf_counter()
    error = None
    try:
        if trainer == "d2f":
            run_node(nodes, "D2FTrain", model=model, latents={"samples": latents}, positive=conds, mode=mode,
                     steps=steps, batch_size=batch, rank=16, alpha=16.0, learning_rate=1e-4 if mode == "lora" else 1e-5,
                     gradient_checkpointing=ckpt, training_dtype="bf16", seed=0, run_name="bench",
                     compile=compile_unet, cuda_graphs=graphs, lora_targets=targets)
        else:
            run_node(nodes, "TrainLoraNode", model=model, latents={"samples": latents}, positive=conds,
                     batch_size=batch, steps=steps, rank=16, learning_rate=1e-4, training_dtype="bf16",
                     lora_dtype="bf16", gradient_checkpointing=ckpt, seed=0, existing_lora="[None]")
    except torch.OutOfMemoryError:
        error = "out of memory"
    except RuntimeError as exc:
        error = "out of memory" if "out of memory" in str(exc) else f"error: {str(exc)[:200]}"
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
    # CUDA-graph pools hold their activations outside "allocated" between replays: reserved is the upper bound
    reserved = torch.cuda.max_memory_reserved() / 2 ** 30 if torch.cuda.is_available() else None
    rate = None if error else clock.steps_per_second(skip)
    mm.unload_all_models()
    mm.soft_empty_cache()
    return {"samples_per_s": rate * batch if rate else None, "peak_gib": peak, "reserved_gib": reserved,
            "wall_s": wall, "error": error}


@contextlib.contextmanager
def snapshots_in(where: str):
    """``device``: swap D2FTrain's host-memory snapshot ring for device copies (how full mode kept them
    before), to measure what the ring saves. ``host``: the node as it is."""
    train_node = sys.modules[next(m for m in sys.modules if m.endswith("nodes.train_node"))]
    real = train_node.HostSnapshots

    class DeviceCopies:
        def __init__(self, named, slots=2):
            self.named = named

        def take(self):
            return {k: t.detach().clone() for k, t in self.named.items()}
    if where == "device":
        train_node.HostSnapshots = DeviceCopies
    try:
        yield
    finally:
        train_node.HostSnapshots = real


def forward_flops(model, latents, conds) -> float | None:
    """UNet forward FLOPs for one sample, counted by torch's FLOP counter on the real module."""
    import comfy.model_management as mm
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    mm.load_models_gpu([model], force_full_load=True)
    unet = model.model.diffusion_model
    device = mm.get_torch_device()
    dtype = model.model.get_dtype()
    x = latents[:1].to(device, dtype)
    ctx = conds[0][0].to(device, dtype)
    y = torch.zeros(1, unet.label_emb[0][0].in_features, device=device, dtype=dtype) if unet.num_classes is not None else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500.0], device=device), context=ctx, y=y)
    mm.unload_all_models()
    return float(counter.get_total_flops())


def frozen_ceiling(model, latents, conds, batch: int, ckpt: bool, iters: int = 30, warmup: int = 5) -> float:
    """Samples/s of the plain frozen UNet step a LoRA step cannot beat: forward and the input-gradient backward
    (``requires_grad`` on the input only, no weight gradients), in bf16 channels-last like D2FTrain's private
    copy, eager, with the same activation checkpointing. Measured on a private reload of the model."""
    import comfy.model_management as mm
    import torch
    engine = {n.rsplit(".", 1)[-1]: m for n, m in sys.modules.items() if ".d2f_core." in n}  # the loaded pack's
    blocks_by_class_name, checkpointed = engine["checkpointing"].blocks_by_class_name, engine["checkpointing"].checkpointed
    cast_for_training = engine["precision"].cast_for_training
    mm.unload_all_models()
    private = model.clone(force_deepcopy=True)
    mm.load_models_gpu([private], force_full_load=True)
    unet = private.model.diffusion_model
    unet.requires_grad_(False)
    device = mm.get_torch_device()
    cast_for_training(unet, torch.bfloat16, channels_last=device.type == "cuda")
    x = latents[:batch].to(device, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ctx = torch.cat([c[0] for c in conds[:batch]]).to(device, torch.bfloat16)
    y = (torch.zeros(batch, unet.label_emb[0][0].in_features, device=device, dtype=torch.bfloat16)
         if unet.num_classes is not None else None)
    t = torch.full((batch,), 500.0, device=device)
    blocks = blocks_by_class_name(unet, ("ResBlock", "SpatialTransformer")) if ckpt else []
    with torch.inference_mode(False), checkpointed(blocks):
        x = x.clone().requires_grad_(True)
        for i in range(warmup + iters):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            out = unet(x, t, context=ctx, y=y)
            torch.autograd.grad(out.float().square().mean(), x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    mm.unload_model_and_clones(private)
    mm.soft_empty_cache()
    return batch * iters / seconds


def like_for_like(nodes, model, latents, conds, arch: str, batches, ckpts, repeats: int, flops, peak, out_dir):
    """D2FTrain with ``lora_targets=all`` vs TrainLoraNode (every layer), rank 16, bf16, 30 measured steps each
    side after their warm-up, ``repeats`` runs each, in this one process; D2FTrain's attention-only default
    beside it; and the frozen fwd+bwd ceiling. A frozen-base LoRA step does ≈ 2× forward FLOPs (forward and
    input-gradient backward; the adapters' weight gradients are negligible), so utilisation = 2·F·samples/s
    / peak."""
    import statistics
    rows = []
    for batch in batches:
        for ckpt in ckpts:
            row = {"arch": arch, "batch": batch, "checkpointing": ckpt}
            for name, trainer, targets, steps, skip in (("d2f_all", "d2f", "all", 40, 10),
                                                        ("d2f_attention", "d2f", "attention", 40, 10),
                                                        ("core", "core", None, 34, 4)):
                runs = [measure(nodes, trainer, model, latents, conds, batch, ckpt, steps, skip,
                                targets=targets or "attention") for _ in range(repeats)]
                rates = [r["samples_per_s"] for r in runs if r["samples_per_s"]]
                errors = sorted({r["error"] for r in runs if r["error"]})
                row[name] = {"runs": runs, "median": statistics.median(rates) if rates else None,
                             "min": min(rates, default=None), "max": max(rates, default=None),
                             "peak_gib": max((r["peak_gib"] or 0) for r in runs), "error": errors[0] if errors else None}
                print(json.dumps({"arch": arch, "batch": batch, "ckpt": ckpt, "trainer": name,
                                  **{k: v for k, v in row[name].items() if k != "runs"}}), flush=True)
            row["ceiling"] = frozen_ceiling(model, latents, conds, batch, ckpt)
            d, c = row["d2f_all"]["median"], row["core"]["median"]
            row["speedup"] = d / c if d and c else None
            if flops and peak and d:
                row["utilisation"] = 2 * flops * d / peak
            row["of_ceiling"] = d / row["ceiling"] if d else None
            print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), flush=True)
            rows.append(row)
    return rows


def like_for_like_table(rows, gpu, torch_version, date, repeats) -> str:
    def rate(r):
        if r.get("error") and not r.get("median"):
            return r["error"]
        return f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})"
    lines = [f"Like for like, {gpu}, torch {torch_version}, {date}: LoRA rank 16 on every layer both sides "
             f"(D2FTrain lora_targets=all, TrainLoraNode), bf16, 30 measured steps per run after warm-up, "
             f"median (min–max) of {repeats} runs, samples/s", "",
             "| model | batch | ckpt | D2FTrain all | TrainLoraNode | speed-up | D2FTrain attention (default) "
             "| frozen fwd+bwd ceiling | D2FTrain all / ceiling | utilisation (2×fwd FLOPs) | D2F / core peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = f"{r['speedup']:.1f}×" if r.get("speedup") else "-"
        util = f"{r['utilisation']:.1%}" if r.get("utilisation") else "-"
        ofc = f"{r['of_ceiling']:.2f}" if r.get("of_ceiling") else "-"
        lines.append(f"| {r['arch']} | {r['batch']} | {'on' if r['checkpointing'] else 'off'} | {rate(r['d2f_all'])} | "
                     f"{rate(r['core'])} | {sp} | {rate(r['d2f_attention'])} | {r['ceiling']:.2f} | {ofc} | {util} | "
                     f"{r['d2f_all']['peak_gib']:.1f} / {r['core']['peak_gib']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    ap.add_argument("--tiny", action="store_true", help="tiny UNets and latents (CPU smoke run)")
    ap.add_argument("--batches", type=str, default=None, help="override batch sizes, e.g. 1,4")
    ap.add_argument("--only", choices=["d2f", "core"], default=None)
    ap.add_argument("--ckpt", choices=["both", "on", "off"], default="both", help="gradient checkpointing settings")
    ap.add_argument("--graphs", choices=["on", "off"], default="on", help="D2FTrain's cuda_graphs input")
    ap.add_argument("--graph-eager-first", type=int, default=None,
                    help="diagnostic: eager calls per shape before CUDA-graph capture (the node's default: 1)")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora",
                    help="D2FTrain mode (full: no core counterpart, use with --only d2f)")
    ap.add_argument("--snapshots", choices=["host", "device", "both"], default="host",
                    help="full mode: NaN-recovery snapshots in host memory (the node's way) or on the device")
    ap.add_argument("--compile", action="store_true",
                    help="D2FTrain with compile=True (the first measured step waits for the compiler: more warm-up)")
    ap.add_argument("--like-for-like", action="store_true",
                    help="D2FTrain lora_targets=all vs TrainLoraNode, 30 measured steps each, --repeats runs, with the "
                         "attention-only default and the frozen fwd+bwd ceiling beside (the README's headline table)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    args = ap.parse_args(argv)

    import torch
    nodes = boot_host()
    if args.graph_eager_first is not None:
        for name, mod in list(sys.modules.items()):
            if name.endswith("d2f_core.training.graphs"):
                init = mod.GraphedNet.__init__
                mod.GraphedNet.__init__ = (lambda self, *a, _init=init, **k:
                                           _init(self, *a, **dict(k, eager_first=args.graph_eager_first)))
    import comfy.sd
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="d2f-bench-")
    rows = []
    for arch in args.arch:
        if args.tiny:
            config, size, batches = (TINY_SD15, 8, [1, 2]) if arch == "sd15" else (TINY_SDXL, 8, [1])
        else:
            config, size, batches = (SD15, 64, [1, 4, 8]) if arch == "sd15" else (SDXL, 128, [1, 4])
        if args.batches:
            batches = [int(b) for b in args.batches.split(",")]
        path = os.path.join(work, f"{arch}.safetensors")
        write_unet(path, config, device)
        model = comfy.sd.load_diffusion_model(path)
        g = torch.Generator().manual_seed(0)
        n_images = 16
        latents = torch.randn(n_images, 4, size, size, generator=g)
        ctx_dim = config["context_dim"]
        extras = {"pooled_output": torch.randn(1, 1280, generator=g)} if arch == "sdxl" else {}
        conds = [[torch.randn(1, 77, ctx_dim, generator=g), dict(extras)] for _ in range(n_images)]
        flops = forward_flops(model, latents, conds) if device == "cuda" else None
        if args.like_for_like:
            ckpts = {"both": (True, False), "on": (True,), "off": (False,)}[args.ckpt]
            rows += like_for_like(nodes, model, latents, conds, arch, batches, ckpts, args.repeats, flops, peak, args.out)
            del model
            continue
        for batch in batches:
            for ckpt in {"both": (True, False), "on": (True,), "off": (False,)}[args.ckpt]:
                row = {"arch": arch, "batch": batch, "checkpointing": ckpt}
                for trainer in ("d2f", "core"):
                    if args.only and trainer != args.only:
                        continue
                    steps, skip = ((40, 10) if trainer == "d2f" else (14, 4)) if not args.tiny else (6, 1)
                    by_place = {}
                    for where in ({"both": ("host", "device")}.get(args.snapshots, (args.snapshots,))
                                  if trainer == "d2f" and args.mode == "full" else ("host",)):
                        with snapshots_in(where):
                            by_place[where] = measure(nodes, trainer, model, latents, conds, batch, ckpt, steps, skip,
                                                      compile_unet=args.compile and trainer == "d2f", mode=args.mode,
                                                      graphs=args.graphs == "on")
                    if "device" in by_place:
                        row["d2f_device_snapshots"] = by_place["device"]
                        print(json.dumps({"arch": arch, "batch": batch, "ckpt": ckpt, "snapshots": "device",
                                          **by_place["device"]}), flush=True)
                    r = by_place.get("host", by_place.get("device"))
                    row[trainer] = r
                    if flops and peak and r["samples_per_s"]:
                        r["mfu"] = 3 * flops * r["samples_per_s"] / peak
                    print(json.dumps({"arch": arch, "batch": batch, "ckpt": ckpt, "trainer": trainer, **r}), flush=True)
                d, c = row.get("d2f", {}), row.get("core", {})
                if d.get("samples_per_s") and c.get("samples_per_s"):
                    row["speedup"] = d["samples_per_s"] / c["samples_per_s"]
                rows.append(row)
        del model

    meta = {"device": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "peak_bf16": peak,
            "tiny": args.tiny, "compile": args.compile}
    if args.like_for_like:
        with open(os.path.join(args.out, "train_like_for_like.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        table = like_for_like_table(rows, gpu, torch.__version__, meta["date"], args.repeats)
        with open(os.path.join(args.out, "train_like_for_like.md"), "w") as f:
            f.write(table + "\n")
        print(table)
        return
    if args.compile:  # what the compiler could not take in one graph (each break is a host round trip)
        from torch._dynamo.utils import counters
        meta["graph_breaks"] = {reason[:300]: n for reason, n in counters["graph_break"].items()}
        print("graph breaks:", json.dumps(meta["graph_breaks"], indent=1)[:3000])
    with open(os.path.join(args.out, "train_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"Training throughput, {gpu}, torch {torch.__version__}, {meta['date']} "
             f"({'LoRA rank 16' if args.mode == 'lora' else 'full fine-tune'}, bf16"
             f"{', D2FTrain compiled' if args.compile else ''})", "",
             "| model | batch | ckpt | D2FTrain samples/s | TrainLoraNode samples/s | ratio | D2F peak GiB | D2F reserved GiB "
             "| core peak GiB | D2F MFU |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(r, key, spec):
        if not r:
            return "-"
        if r.get("error"):
            return r["error"]
        v = r.get(key)
        return spec.format(v) if v is not None else "-"
    for row in rows:
        d, c = row.get("d2f", {}), row.get("core", {})
        lines.append(f"| {row['arch']} | {row['batch']} | {'on' if row['checkpointing'] else 'off'} | "
                     f"{fmt(d, 'samples_per_s', '{:.2f}')} | {fmt(c, 'samples_per_s', '{:.2f}')} | "
                     f"{'{:.2f}×'.format(row['speedup']) if 'speedup' in row else '-'} | {fmt(d, 'peak_gib', '{:.1f}')} | "
                     f"{fmt(d, 'reserved_gib', '{:.1f}')} | {fmt(c, 'peak_gib', '{:.1f}')} | {fmt(d, 'mfu', '{:.1%}')} |")
    for row in rows:
        dev = row.get("d2f_device_snapshots")
        if dev:
            lines.append(f"\n{row['arch']} bs{row['batch']} ckpt {'on' if row['checkpointing'] else 'off'}, {args.mode} "
                         f"mode with the snapshots on the device instead: {fmt(dev, 'samples_per_s', '{:.2f}')} samples/s, "
                         f"peak {fmt(dev, 'peak_gib', '{:.1f}')} GiB (reserved {fmt(dev, 'reserved_gib', '{:.1f}')})")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "train_bench.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
