"""Every legacy family the host loads, at full size: sampling patched vs native, and D2FTrain LoRA (issue 13 part 4).

    python bench/bench_families.py --out DIR                                   # GPU machine (full-size models)
    python bench/bench_families.py --families sdxl_eps pixart_sigma --out DIR  # a subset
    python bench/bench_families.py --tiny --families sd2_512_eps koala_700m --out DIR   # CPU smoke run

The families, their key layouts, conditioning and file writer come from ``tests/test_families.py`` (imported:
the tests folder is put on ``sys.path``, so the layouts are not duplicated here; that module needs pytest
importable and finds the host as the tests do, ``$COMFYUI_PATH`` or ``~/ComfyUI``). Full size: each family's
real architecture (the UNet configs are the host's own, read from ``comfy.model_detection``'s table of
diffusers configs; the ×4 upscaler's from its released yaml; the DiTs at 28 / 40 blocks), random weights
written as an fp16 file in the family's file layout and loaded by the host's own loader
(``load_checkpoint_guess_config`` / ``load_diffusion_model``), so ``comfy.model_detection`` decides the family.
``--tiny`` uses the tests' smallest detected configs and latents instead (CPU, a couple of minutes).

Per family, at its native resolution (``NATIVE``, latent side):

(a) sampling, one image, cfg 4: D2FFlowPatch + stock KSampler ``euler``/``simple`` vs the unpatched model
    through stock KSampler with ``--native-sampler``/``--native-scheduler`` (default euler/simple: the grid on
    which the two are the same DDIM solve), same steps. One warm-up run each (2 steps), then ``--repeats`` timed
    runs each, alternating; the best time is kept. ratio = patched / native.
(b) D2FTrain LoRA (rank 16, bf16, batch 1, one image, the node's defaults otherwise, through
    ``bench_train.run_node``: settings that moved to option nodes go through them): s/step from the host's
    progress hook (first step excluded) and torch.cuda.max_memory_allocated over the run (model included).
    The ×4 upscaler and LotusD are refused by D2FTrain: their rows record the refusal.

A row that fails records its error and the run goes on. This is a benchmark: it prints and writes numbers;
it asserts nothing. Output: ``families_<gpu>.json`` and ``families_<gpu>.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import bench_train  # noqa: E402  (boot_host, run_node, StepClock)

# Native latent side per family (image side / 8; the ×4 upscaler's latent is its low-res input image).
NATIVE = {"sd2_512_eps": 64, "sd2_768_v": 96, "sd21_unclip_l": 96, "sd21_unclip_h": 96, "lotus_d": 96,
          "sd_x4_upscaler": 128, "sdxl_refiner": 128, "ssd_1b": 128, "segmind_vega": 128, "koala_700m": 128,
          "koala_1b": 128, "sdxl_eps": 128, "sdxl_vpred": 128, "sdxl_vpred_zsnr": 128, "sd15_ip2p": 64,
          "sdxl_ip2p": 128, "pixart_alpha": 128, "pixart_sigma": 128, "hunyuan_dit_1_0": 128, "hunyuan_dit_1_1": 128}

# Family → the host's full diffusers-table config (comfy.model_detection.unet_config_from_diffusers_unet), with changes.
HOST_TABLE = {"sd2_512_eps": ("SD21", {}), "sd2_768_v": ("SD21", {}), "sd21_unclip_l": ("SD21_unclipl", {}),
              "sd21_unclip_h": ("SD21_uncliph", {}),
              "lotus_d": ("SD21", {"adm_in_channels": 4, "num_classes": "sequential"}),
              "sdxl_refiner": ("SDXL_refiner", {}), "ssd_1b": ("SSD_1B", {}), "segmind_vega": ("Segmind_Vega", {}),
              "koala_700m": ("KOALA_700M", {}), "koala_1b": ("KOALA_1B", {}), "sdxl_eps": ("SDXL", {}),
              "sdxl_vpred": ("SDXL", {}), "sdxl_vpred_zsnr": ("SDXL", {}), "sd15_ip2p": ("SD15", {"in_channels": 8}),
              "sdxl_ip2p": ("SDXL_diffusers_ip2p", {})}
# x4-upscaling.yaml: 256 ch, mult [1,2,2,4], 2 res blocks, attention at ds 2/4/8, 8 heads, class embedding 1000.
X4_UPSCALER = dict(in_channels=7, out_channels=4, image_size=128, use_spatial_transformer=True, legacy=False,
                   use_checkpoint=False, use_temporal_attention=False, use_temporal_resblock=False,
                   model_channels=256, channel_mult=[1, 2, 2, 4], num_res_blocks=[2, 2, 2, 2],
                   transformer_depth=[0, 0, 1, 1, 1, 1, 1, 1], transformer_depth_output=[1] * 9 + [0] * 3,
                   transformer_depth_middle=1, context_dim=1024, num_heads=8, num_head_channels=-1,
                   use_linear_in_transformer=True, adm_in_channels=None)
DIT_DEPTH = {"pixart_alpha": 28, "pixart_sigma": 28, "hunyuan_dit_1_0": 40, "hunyuan_dit_1_1": 40}
REFUSED = {"sd_x4_upscaler", "lotus_d"}  # D2FTrain refuses them (tests/test_families_train.py)
CFG = 4.0


def host_diffusers_table(host_dir: str) -> dict:
    """The named full UNet configs in the host's ``unet_config_from_diffusers_unet`` (literal dicts)."""
    with open(os.path.join(host_dir, "comfy", "model_detection.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "unet_config_from_diffusers_unet")
    table = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            config = {}
            for k, v in zip(node.value.keys, node.value.values):
                try:  # non-literal entries ('dtype': dtype) are left out
                    config[ast.literal_eval(k)] = ast.literal_eval(v)
                except (ValueError, TypeError):
                    pass
            table[node.targets[0].id] = config
    return table


def full_config(family, table: dict) -> dict:
    if family.id == "sd_x4_upscaler":
        return dict(X4_UPSCALER)
    if family.dit:
        return dict(family.config, depth=DIT_DEPTH[family.id])
    name, changes = HOST_TABLE[family.id]
    config = dict(table[name], **changes)
    for k in ("use_temporal_attention", "use_temporal_resblock"):
        config.setdefault(k, False)
    return config


def write_file(fams, family, config: dict, folder: str, seed: int = 0) -> str:
    """``test_families.write_family_file`` with a given config, fp16 (as released checkpoints are)."""
    import comfy_host
    import torch
    sd = fams.layout_state_dict(family.host_class, config, seed, unet=not family.dit, dtype=torch.float16)
    if family.v_weights:  # SD2-768-v's detection from the weights (std of this bias > 0.09)
        gen = torch.Generator().manual_seed(seed + 100)
        bias = torch.randn(sd[fams._V_KEY].shape, generator=gen)
        sd[fams._V_KEY] = (0.15 * (bias - bias.mean()) / bias.std(unbiased=False)).half()
    markers = {k: torch.tensor([]) for k in family.markers}
    if not family.dit:
        sd = {"model.diffusion_model." + k: v for k, v in sd.items()}
    sd.update(markers)
    path = os.path.join(folder, f"bench_family_{family.id}.safetensors")
    comfy_host.save_safetensors(sd, path)
    return path


def load_file(family, path: str):
    import comfy.sd
    if family.dit:  # what UNETLoader does with weight_dtype "default"
        return comfy.sd.load_diffusion_model(path)
    return comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]


def native_conds(fams, family, side: int | None):
    """The tests' conditioning, image inputs (×4 upscaler's low-res image, InstructPix2Pix's source latent)
    resized to the latent."""
    import torch
    pos, neg = fams.conditioning(family, seed=1)
    if side is None:
        return pos, neg
    gen = torch.Generator().manual_seed(3)
    for cond in (pos, neg):
        extra = cond[0][1]
        for key in ("concat_image", "concat_latent_image"):
            if key in extra:
                c = extra[key].shape[1]
                extra[key] = torch.rand(1, c, side, side, generator=gen) if key == "concat_image" \
                    else torch.randn(1, c, side, side, generator=gen)
    return pos, neg


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sample_times(host, model, flow, conds, latent, steps: int, repeats: int, native_sampler: str, native_scheduler: str):
    pos, neg = conds

    def run(m, sampler, scheduler, n):
        sync()
        t0 = time.perf_counter()
        out = host.run1("KSampler", model=m, seed=7, steps=n, cfg=CFG, sampler_name=sampler, scheduler=scheduler,
                        positive=pos, negative=neg, latent_image=latent, denoise=1.0)["samples"]
        sync()
        return time.perf_counter() - t0, out

    sides = {"patched": (flow, "euler", "simple"), "native": (model, native_sampler, native_scheduler)}
    for m, sampler, scheduler in sides.values():  # warm-up: weights loaded, kernels chosen
        run(m, sampler, scheduler, min(2, steps))
    times = {k: [] for k in sides}
    outs = {}
    for _ in range(repeats):
        for k, (m, sampler, scheduler) in sides.items():
            t, outs[k] = run(m, sampler, scheduler, steps)
            times[k].append(t)
    p, n = min(times["patched"]), min(times["native"])
    finite = all(bool(o.isfinite().all()) for o in outs.values())
    return {"patched_s": p, "native_s": n, "ratio": p / n, "patched_s_per_step": p / steps,
            "native_s_per_step": n / steps, "times": times, "outputs_finite": finite}


def train_row(nodes, model, latent, positive, steps: int):
    import comfy.model_management as mm
    import comfy.utils
    import torch
    mm.unload_all_models()
    mm.soft_empty_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    clock = bench_train.StepClock()
    comfy.utils.set_progress_bar_global_hook(clock)
    t0 = time.perf_counter()
    try:
        out = bench_train.run_node(nodes, "D2FTrain", model=model, latents=latent, positive=positive, mode="lora",
                                   steps=steps, batch_size=1, rank=16, alpha=16.0, learning_rate=1e-4,
                                   training_dtype="bf16", seed=0, run_name="bench_families")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    wall = time.perf_counter() - t0
    rate = clock.steps_per_second(skip=1)
    result = out.result if hasattr(out, "result") else out
    losses = None
    try:
        losses = [float(x) for x in result[2]["loss"]]
    except Exception:  # noqa: BLE001  (the loss map's shape is not what is measured here)
        pass
    row = {"s_per_step": 1.0 / rate if rate else None, "wall_s": wall, "steps": steps,
           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None,
           "loss_first_last": [losses[0], losses[-1]] if losses else None}
    mm.unload_all_models()
    mm.soft_empty_cache()
    return row


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def bench_family(host, nodes, fams, family, table, args, work: str) -> dict:
    import comfy.model_management as mm
    import torch
    row = {"family": family.id, "host_class": family.host_class}
    side = None if args.tiny else NATIVE[family.id]
    latent_hw = tuple(family.latent) if args.tiny else (side, side)
    row["latent"] = list(latent_hw)
    path = model = flow = None
    try:
        config = family.config if args.tiny else full_config(family, table)
        t0 = time.perf_counter()
        path = write_file(fams, family, config, work)
        model = load_file(family, path)
        row["write_load_s"] = time.perf_counter() - t0
        row["detected"] = type(model.model.model_config).__name__
        row["params_m"] = sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6
        row["weight_dtype"] = str(model.model.get_dtype()).replace("torch.", "")
    except Exception as exc:  # noqa: BLE001
        row["error"] = "load: " + error_text(exc)
        traceback.print_exc()
        return row
    conds = native_conds(fams, family, side)
    latent = {"samples": torch.zeros((1, 4) + latent_hw)}
    try:
        flow = host.run1("D2FFlowPatch", model=model, prediction="auto", label_offset=0)
        row["sampling"] = sample_times(host, model, flow, conds, latent, args.steps, args.repeats,
                                       args.native_sampler, args.native_scheduler)
    except Exception as exc:  # noqa: BLE001
        row["sampling"] = {"error": error_text(exc)}
        traceback.print_exc()
    print(json.dumps({"family": family.id, "sampling": {k: v for k, v in row["sampling"].items() if k != "times"}}),
          flush=True)
    del flow
    if args.train_steps > 0:
        train_latent = {"samples": 4.0 * torch.randn((1, 4) + latent_hw, generator=torch.Generator().manual_seed(2))}
        try:
            row["train"] = train_row(nodes, model, train_latent, conds[0], args.train_steps)
        except Exception as exc:  # noqa: BLE001
            key = "refused" if isinstance(exc, ValueError) and family.id in REFUSED else "error"
            row["train"] = {key: error_text(exc)}
            if key == "error":
                traceback.print_exc()
        print(json.dumps({"family": family.id, "train": row["train"]}), flush=True)
    del model
    mm.unload_all_models()
    mm.soft_empty_cache()
    gc.collect()
    if path and os.path.exists(path):
        os.remove(path)
    return row


def gpu_slug(name: str) -> str:
    m = re.search(r"\b([AHBL]\d{2,3}|RTX ?\d{4})\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")).replace(" ", "").lower()


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001  (a copy without .git)
        return "unknown"


def table_md(rows, meta) -> str:
    def f(v, spec):
        return spec.format(v) if isinstance(v, (int, float)) else "-"
    lines = [f"Legacy families, {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}"
             f"{' (TINY smoke configs)' if meta['tiny'] else ''}: random weights (fp16 file), one image, cfg {CFG:g}, "
             f"{meta['steps']} steps; patched = D2FFlowPatch + KSampler euler/simple, native = KSampler "
             f"{meta['native_sampler']}/{meta['native_scheduler']}; D2FTrain LoRA rank 16 bf16 batch 1, "
             f"{meta['train_steps']} steps", "",
             "| family | detected | params M | latent | patched s | native s | ratio | train s/step | train peak GiB | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, t = r.get("sampling", {}), r.get("train", {})
        notes = "; ".join(x for x in (r.get("error"), s.get("error") and f"sampling {s['error']}",
                                      t.get("refused") and f"training refused: {t['refused']}",
                                      t.get("error") and f"training {t['error']}") if x)
        lines.append(f"| {r['family']} | {r.get('detected', '-')} | {f(r.get('params_m'), '{:.0f}')} | "
                     f"{'×'.join(map(str, r.get('latent', [])))} | {f(s.get('patched_s'), '{:.3f}')} | "
                     f"{f(s.get('native_s'), '{:.3f}')} | {f(s.get('ratio'), '{:.3f}')} | "
                     f"{f(t.get('s_per_step'), '{:.3f}')} | {f(t.get('peak_gib'), '{:.1f}')} | {notes.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    ap.add_argument("--families", nargs="+", default=None, help="family ids (tests/test_families.py FAMILIES)")
    ap.add_argument("--tiny", action="store_true", help="the tests' smallest detected configs and latents (CPU smoke)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; --tiny 2)")
    ap.add_argument("--train-steps", type=int, default=None, help="D2FTrain steps (default 10; --tiny 3; 0: none)")
    ap.add_argument("--repeats", type=int, default=None, help="timed sampling runs per side (default 2; --tiny 1)")
    ap.add_argument("--native-sampler", default="euler")
    ap.add_argument("--native-scheduler", default="simple")
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 20)
    args.train_steps = args.train_steps if args.train_steps is not None else (3 if args.tiny else 10)
    args.repeats = args.repeats or (1 if args.tiny else 2)

    import torch
    nodes = bench_train.boot_host()
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    import comfy_host
    import test_families as fams
    host_dir = os.path.dirname(os.path.abspath(nodes.__file__))
    work = tempfile.mkdtemp(prefix="d2f-bench-families-")
    host = comfy_host.Host(host_dir, work, ROOT)  # its node runner (V1 and V3 nodes as the executor calls them)
    table = host_diffusers_table(host_dir)
    if args.tiny and not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    families = fams.FAMILIES if not args.families else [fams.BY_ID[i] for i in args.families]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    meta = {"device": gpu, "torch": torch.__version__, "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "tiny": args.tiny, "steps": args.steps, "train_steps": args.train_steps, "repeats": args.repeats,
            "native_sampler": args.native_sampler, "native_scheduler": args.native_scheduler, "cfg": CFG}
    rows = []
    for family in families:
        print(f"== {family.id}", flush=True)
        rows.append(bench_family(host, nodes, fams, family, table, args, work))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"families_{gpu_slug(gpu)}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = table_md(rows, meta)
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
