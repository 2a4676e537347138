"""The pack's example workflows (``workflows/*.json``), built against the host's node definitions.

``python -m d2f_host.examples [OUT_DIR]`` boots the host (CPU) and writes them in UI format; the
files in the repository were then loaded into ComfyUI's frontend and saved back from it
(``d2f_host.author``), so they are exactly what the frontend saves. ``EXAMPLES`` also records, per
workflow, which model files it names, so tests can lay out stand-ins under those names.

Layout: each example lists its nodes column by column (``WorkflowBuilder.columns`` stacks them by the
height the frontend draws them at) and its groups by their member nodes (``WorkflowBuilder.group``
wraps them), so every node sits inside its group and no two nodes overlap.
"""

from __future__ import annotations

import os
import sys

from .workflow import WorkflowBuilder, dump

SD15_CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
SDXL_VPRED_CKPT = "sdxl_vpred_checkpoint.safetensors"
TRAIN_FOLDER = "d2f_train_example"
REFLOW_NAME = "d2f_reflow_demo"
IMG2IMG_IMAGE = "example.png"

POSITIVE = "a photograph of a lighthouse on a rocky coast at sunset, dramatic clouds, highly detailed"
NEGATIVE = "blurry, low quality, watermark, text"

PATCH_NOTE = (
    "Diff2Flow Patch makes this ε/v-prediction checkpoint a flow-matching model: x = (1-σ)·x0 + σ·ε, "
    "σ from σ_max (0.936 on SD's schedule) down to 0. It is exact: the same network, read in flow "
    "coordinates. It patches a clone, so the loader's model is untouched. prediction = auto reads ε/v from "
    "the checkpoint. After a run the node shows the detected prediction and the σ range.\n\n"
    "Put it right after the loader (and any LoRA loaders): it must come before samplers, schedulers and "
    "RescaleCFG. Use Diff2Flow RescaleCFG instead of the stock RescaleCFG on a patched model.")


def _common(b: WorkflowBuilder, ckpt: str, *, title="Load Checkpoint"):
    return b.node("CheckpointLoaderSimple", size=[330, 100], title=title, ckpt_name=ckpt)


def _patch(b: WorkflowBuilder, model_src):
    patch = b.node("D2FFlowPatch", size=[330, 110], prediction="auto", label_offset=0)
    b.link(model_src, "MODEL", patch, "model")
    return patch


def _prompts(b: WorkflowBuilder, clip_src, positive=POSITIVE, negative=NEGATIVE):
    pos = b.node("CLIPTextEncode", size=[420, 150], title="Positive prompt", color="#232", bgcolor="#353",
                 text=positive)
    neg = b.node("CLIPTextEncode", size=[420, 130], title="Negative prompt", color="#322",
                 bgcolor="#533", text=negative)
    b.link(clip_src, "CLIP", pos, "clip")
    b.link(clip_src, "CLIP", neg, "clip")
    return pos, neg


def _latent(b: WorkflowBuilder, width=512, height=512):
    return b.node("EmptyLatentImage", size=[330, 110], width=width, height=height, batch_size=1)


def _ksampler(b: WorkflowBuilder, model, positive, negative, latent, *, steps, cfg, denoise=1.0):
    """Stock KSampler (euler, simple, fixed seed 42) fed by (node, output) pairs."""
    ks = b.node("KSampler", size=[330, 270], seed=42, seed__control="fixed", steps=steps, cfg=cfg,
                sampler_name="euler", scheduler="simple", denoise=denoise)
    for (src, out), name in ((model, "model"), (positive, "positive"), (negative, "negative"), (latent, "latent_image")):
        b.link(src, out, ks, name)
    return ks


def _d2f_train(b: WorkflowBuilder, *, steps, batch_size, save_every, preview_every, run_name, ema_decay):
    """D2FTrain with the settings both training examples share (LoRA rank 16, checkpointing when memory needs it),
    and its option nodes: D2FTrainAdvanced at its defaults (bf16; where CPU users set fp32), D2FEMA. Returns
    (train, [option nodes]); the caller links them, so each example can add its own."""
    train = b.node("D2FTrain", size=[400, 700], mode="lora", steps=steps, batch_size=batch_size, grad_accumulation=1,
                   learning_rate=1e-4, rank=16, gradient_checkpointing="auto", seed=0, seed__control="fixed",
                   save_every=save_every, preview_every=preview_every, run_name=run_name, resume_from="")
    advanced = b.node("D2FTrainAdvanced", size=[330, 400], lora_targets="attention", alpha=16.0, loss="diff2flow",
                      time_sampling="uniform", time_shift=1.0, warmup_steps=0, lr_schedule="constant",
                      optimizer="adamw", training_dtype="bf16", cuda_graphs=True, compile=False, caption_dropout=0.0)
    b.link(advanced, "advanced", train, "advanced")
    ema = b.node("D2FEMA", size=[330, 130], decay=ema_decay, warmup=True, dtype="fp32")
    b.link(ema, "ema", train, "ema")
    return train, [advanced, ema]


def _validation(b: WorkflowBuilder, train, *, every_n_steps, cfg):
    """D2FValidation on a split of the training set (10%), linked to ``train``'s validation input: the held-out
    loss as the chart's second series, the 1/2/4/25-step grid (and, for Reflow, straightness)."""
    validation = b.node("D2FValidation", size=[330, 250], every_n_steps=every_n_steps, holdout_fraction=0.1,
                        loss_times=8, grid_steps="1,2,4,25", cfg=cfg, seed=0, images=2, max_seconds=60.0)
    b.link(validation, "validation", train, "validation")
    return validation


def _save_lora_and_loss(b: WorkflowBuilder, train, lora_prefix, loss_prefix):
    """SaveLoRA and Plot Loss Graph on a D2FTrain's outputs."""
    save_lora = b.node("SaveLoRA", size=[330, 110], prefix=lora_prefix, steps=0)
    b.link(train, "lora", save_lora, "lora")
    b.link(train, "steps", save_lora, "steps")
    loss = b.node("LossGraphNode", size=[330, 330], filename_prefix=loss_prefix)
    b.link(train, "loss", loss, "loss")
    return save_lora, loss


def _decode_and_save(b: WorkflowBuilder, samples, vae_src, prefix):
    """VAEDecode of ``samples`` (a (node, output) pair) with the checkpoint's VAE → SaveImage."""
    dec = b.node("VAEDecode", size=[210, 50])
    b.link(*samples, dec, "samples")
    b.link(vae_src, "VAE", dec, "vae")
    save = b.node("SaveImage", size=[420, 470], filename_prefix=prefix)
    b.link(dec, "IMAGE", save, "images")
    return dec, save


GROUP_GAP = 40  # between one group's columns and the next group's, on top of the column gap


def _model_group(b: WorkflowBuilder, columns) -> float:
    """The left part every example shares (loader and Read-me note, then the model and prompt nodes) in
    one group; returns the x where the next group's columns go."""
    x = b.columns(columns)
    b.group("Model and prompts", [n for column in columns for n in column])
    return x + GROUP_GAP


def sd15_txt2img(defs, *, ckpt=SD15_CKPT, width=512, height=512, label="SD1.5", note_extra="", steps=20, cfg=7.0):
    b = WorkflowBuilder(defs)
    ckpt_node = _common(b, ckpt)
    patch = _patch(b, ckpt_node)
    pos, neg = _prompts(b, ckpt_node)
    latent = _latent(b, width, height)
    ks = _ksampler(b, (patch, "MODEL"), (pos, "CONDITIONING"), (neg, "CONDITIONING"), (latent, "LATENT"),
                   steps=steps, cfg=cfg)
    dec, save = _decode_and_save(b, (ks, "LATENT"), ckpt_node, f"d2f/{label.lower().replace('.', '')}_txt2img")
    note = b.note(
        f"Diff2Flow — {label} text-to-image with a stock KSampler\n\n"
        f"1. Load Checkpoint: choose your {label} checkpoint in models/checkpoints ({ckpt} is only the usual "
        "file name).\n\n"
        f"2. {PATCH_NOTE}\n\n"
        "3. KSampler: euler + simple on the patched model is DDIM on the original checkpoint, step for step. "
        "Every stock sampler and scheduler works on the patched model; euler_ancestral takes its "
        "rectified-flow path." + note_extra,
        size=[360, 560], title="Read me: what to set, and why")
    x = _model_group(b, [[ckpt_node, note], [patch, pos, neg, latent]])
    b.columns([[ks, dec], [save]], x=x)
    b.group("Sampling", [ks, dec, save])
    return b.to_json()


def sd15_flow_sampler(defs):
    b = WorkflowBuilder(defs)
    ckpt_node = _common(b, SD15_CKPT)
    patch = _patch(b, ckpt_node)
    pos, neg = _prompts(b, ckpt_node)
    latent = _latent(b)
    noise = b.node("RandomNoise", size=[330, 82], noise_seed=42, noise_seed__control="fixed")
    guider = b.node("CFGGuider", size=[330, 100], cfg=7.0)
    b.link(patch, "MODEL", guider, "model")
    b.link(pos, "CONDITIONING", guider, "positive")
    b.link(neg, "CONDITIONING", guider, "negative")
    sampler = b.node("D2FEulerFlowSampler", size=[330, 30])
    sched = b.node("D2FFlowScheduler", size=[330, 130], steps=20, shift=1.0, denoise=1.0)
    b.link(patch, "MODEL", sched, "model")
    sca = b.node("SamplerCustomAdvanced", size=[300, 110])
    b.link(noise, "NOISE", sca, "noise")
    b.link(guider, "GUIDER", sca, "guider")
    b.link(sampler, "SAMPLER", sca, "sampler")
    b.link(sched, "SIGMAS", sca, "sigmas")
    b.link(latent, "LATENT", sca, "latent_image")
    dec, save = _decode_and_save(b, (sca, 0), ckpt_node, "d2f/sd15_flow_sampler")
    note = b.note(
        "Diff2Flow — SD1.5 with the flow scheduler and the Euler flow sampler\n\n"
        f"1. Load Checkpoint: choose your SD1.5 checkpoint ({SD15_CKPT} is only the usual file name).\n\n"
        f"2. {PATCH_NOTE}\n\n"
        "3. Diff2Flow Scheduler: flow times from σ_max to 0, uniform in flow time (shift 1). shift > 1 spends "
        "more steps at high noise (SD3 uses 3); denoise < 1 keeps only the last part (img2img).\n\n"
        "4. Diff2Flow Euler Flow Sampler: x ← x + (σ_next - σ)·(x - x̂0)/σ. CFGGuider works unchanged: CFG "
        "commutes with the bridge.\n\n"
        "Stock KSamplerSelect and BasicScheduler work on the patched model as well.",
        size=[360, 620], title="Read me: what to set, and why")
    x = _model_group(b, [[ckpt_node, note], [patch, pos, neg, latent]])
    b.columns([[noise, guider, sampler, sched], [sca, dec], [save]], x=x)
    b.group("Flow sampling", [noise, guider, sampler, sched, sca, dec, save])
    return b.to_json()


def sdxl_eps(defs):
    return sd15_txt2img(
        defs, ckpt=SDXL_CKPT, width=1024, height=1024, label="SDXL", steps=25, cfg=6.0,
        note_extra="\n\nSDXL works at 1024×1024 (or 1152×896, 896×1152, 1216×832, …). This is the ε-prediction "
                   "SDXL base; for v-prediction SDXL models see the v-pred workflow.")


def sdxl_vpred(defs):
    b = WorkflowBuilder(defs)
    ckpt_node = _common(b, SDXL_VPRED_CKPT, title="Load Checkpoint (v-prediction SDXL)")
    msd = b.node("ModelSamplingDiscrete", size=[330, 82], sampling="v_prediction", zsnr=False)
    b.link(ckpt_node, "MODEL", msd, "model")
    patch = _patch(b, msd)
    pos, neg = _prompts(b, ckpt_node)
    latent = _latent(b, 1024, 1024)
    ks = _ksampler(b, (patch, "MODEL"), (pos, "CONDITIONING"), (neg, "CONDITIONING"), (latent, "LATENT"),
                   steps=25, cfg=5.0)
    dec, save = _decode_and_save(b, (ks, "LATENT"), ckpt_node, "d2f/sdxl_vpred_txt2img")
    note = b.note(
        "Diff2Flow — v-prediction SDXL\n\n"
        "1. Load Checkpoint: choose your v-prediction SDXL checkpoint (the file name here is a placeholder).\n\n"
        "2. ModelSamplingDiscrete = v_prediction tells ComfyUI the network predicts v. Many v-pred checkpoints "
        "say so in their metadata and are detected anyway; this node makes sure, and it must come BEFORE the "
        "patch, which reads the prediction type from the model (alternatively set the patch's prediction to "
        "v_prediction and drop this node). zsnr: turn on only for checkpoints trained with zero terminal SNR.\n\n"
        f"3. {PATCH_NOTE}\n\n"
        "4. KSampler: euler + simple equals DDIM on the original v-prediction model. Lower CFG (4–6) suits most "
        "v-pred SDXL models.",
        size=[360, 640], title="Read me: what to set, and why")
    x = _model_group(b, [[ckpt_node, note], [msd, patch, pos, neg, latent]])
    b.columns([[ks, dec], [save]], x=x)
    b.group("Sampling", [ks, dec, save])
    return b.to_json()


def sd15_img2img(defs):
    b = WorkflowBuilder(defs)
    ckpt_node = _common(b, SD15_CKPT)
    patch = _patch(b, ckpt_node)
    pos, neg = _prompts(b, ckpt_node, positive="an oil painting of the same scene, impasto, warm light")
    load = b.node("LoadImage", size=[330, 330], image=IMG2IMG_IMAGE)
    enc = b.node("VAEEncode", size=[210, 50])
    b.link(load, "IMAGE", enc, "pixels")
    b.link(ckpt_node, "VAE", enc, "vae")
    ks = _ksampler(b, (patch, "MODEL"), (pos, "CONDITIONING"), (neg, "CONDITIONING"), (enc, "LATENT"),
                   steps=20, cfg=7.0, denoise=0.6)
    dec, save = _decode_and_save(b, (ks, "LATENT"), ckpt_node, "d2f/sd15_img2img")
    note = b.note(
        "Diff2Flow — SD1.5 image-to-image\n\n"
        f"1. Load Checkpoint: choose your SD1.5 checkpoint ({SD15_CKPT} is only the usual file name).\n\n"
        "2. Load Image: any picture from ComfyUI/input (example.png ships with ComfyUI). It is encoded by the "
        "checkpoint's VAE.\n\n"
        f"3. {PATCH_NOTE}\n\n"
        "4. KSampler denoise 0.6: starts at flow time σ ≈ 0.6·σ_max from x = (1-σ)·image + σ·noise, the flow "
        "interpolant, and runs the last 60% of the schedule. Lower keeps more of the image.",
        size=[360, 380], title="Read me: what to set, and why")
    x = _model_group(b, [[ckpt_node, note, load], [patch, pos, neg, enc]])
    b.columns([[ks, dec], [save]], x=x)
    b.group("Sampling", [ks, dec, save])
    return b.to_json()


def sd15_train_lora(defs):
    b = WorkflowBuilder(defs)
    ckpt_node = _common(b, SD15_CKPT)
    patch = _patch(b, ckpt_node)
    data = b.node("LoadImageTextDataSetFromFolder", size=[330, 80], folder=TRAIN_FOLDER)
    make = b.node("MakeTrainingDataset", size=[330, 100])
    b.link(data, "images", make, "images")
    b.link(ckpt_node, "VAE", make, "vae")
    b.link(ckpt_node, "CLIP", make, "clip")
    b.link(data, "texts", make, "texts")
    empty = b.node("CLIPTextEncode", size=[330, 110], title="Empty prompt (CFG / caption dropout)",
                   color="#322", bgcolor="#533", text="")
    b.link(ckpt_node, "CLIP", empty, "clip")
    # EMA over ~100 steps (D2FEMA's advice for runs of a few hundred steps); scheduled sampling shown, off.
    train, options = _d2f_train(b, steps=500, batch_size=1, save_every=100, preview_every=50,
                                run_name="d2f_sd15_lora", ema_decay=0.99)
    ss = b.node("D2FScheduledSampling", size=[330, 180], probability=0.0, ramp="linear", max_offset=0,
                strategy="uniform", solver_steps=20)
    b.link(ss, "scheduled_sampling", train, "scheduled_sampling")
    options.append(ss)
    options.append(_validation(b, train, every_n_steps=100, cfg=6.0))
    b.link(patch, "MODEL", train, "model")
    b.link(make, "latents", train, "latents")
    b.link(make, "conditioning", train, "positive")
    b.link(empty, "CONDITIONING", train, "empty_conditioning")
    save_lora, loss = _save_lora_and_loss(b, train, "loras/d2f_sd15_lora", "d2f/loss_graph")
    pos = b.node("CLIPTextEncode", size=[330, 130], title="Preview prompt", color="#232", bgcolor="#353",
                 text="a photo in the style of the training images")
    b.link(ckpt_node, "CLIP", pos, "clip")
    latent = _latent(b)
    ks = _ksampler(b, (train, "model"), (pos, "CONDITIONING"), (empty, "CONDITIONING"), (latent, "LATENT"),
                   steps=20, cfg=6.0)
    dec, save = _decode_and_save(b, (ks, "LATENT"), ckpt_node, "d2f/trained_preview")
    note = b.note(
        "Diff2Flow — LoRA fine-tune of SD1.5 toward flow matching\n\n"
        f"1. Load Checkpoint: your SD1.5 checkpoint ({SD15_CKPT} is only the usual file name).\n\n"
        f"2. Training images: put them in ComfyUI/input/{TRAIN_FOLDER}/ (PNG/JPG/WEBP), each with a caption in a "
        "same-name .txt file; kohya-style subfolders (10_name) repeat their images. Refresh (R) and pick the "
        "folder in Load Image-Text. 512×512 images suit SD1.5; other sizes are bucketed by resolution.\n\n"
        "3. Diff2Flow Train minimises the Diff2Flow loss ‖v̂ - (ε - x0)‖² through the flow patch. LoRA rank 16, "
        "learning rate 1e-4 and 500 steps are a start for 10–50 images. The node draws the loss, samples/s and ETA live while it trains; save_every "
        "writes the LoRA and a resumable state (output/loras, output/d2f_states), preview_every shows a sample "
        "on the node.\n\n"
        "Options (small nodes left of it): Train Advanced holds the rarely changed settings (bf16 needs a GPU; on "
        "CPU set its training_dtype to fp32); EMA averages the weights of the last ~100 steps, which the previews "
        "and saved LoRAs use; Scheduled Sampling is off (probability and max_offset 0): raise both to train on "
        "the model's own sampling states (corrects exposure bias, one extra forward pass per rollout step); "
        "Validation holds 10% of the images out and every 100 steps draws their loss as the chart's second series "
        "and saves a fixed-seed grid at 1, 2, 4 and 25 steps in the run's folder (output/d2f_states/…).\n\n"
        "4. Save LoRA writes the final LoRA (loras/d2f_sd15_lora…), which the core LoRA loaders read; put "
        "Diff2Flow Patch after the LoRA loader when you use it. Plot Loss Graph saves the loss curve. The "
        "KSampler samples the trained model (already flow-patched) right away.",
        size=[360, 530], title="Read me: what to set, and why")
    x = b.columns([[ckpt_node, note, data], [patch, make, empty]])
    b.group("Model and data", [ckpt_node, note, data, patch, make, empty])
    x = b.columns([options, [train]], x=x + GROUP_GAP)
    b.columns([[save_lora, loss, pos, latent], [ks, dec], [save]], x=x + GROUP_GAP)
    b.group("Train", options + [train])
    b.group("Save and preview", [save_lora, loss, pos, latent, ks, dec, save])
    return b.to_json()


def sd15_reflow(defs):
    b = WorkflowBuilder(defs)
    ckpt_node = _common(b, SD15_CKPT)
    patch = _patch(b, ckpt_node)
    pos, neg = _prompts(b, ckpt_node)
    pairs = b.node("D2FReflowPairs", size=[330, 330], count=64, width=512, height=512, steps=25, cfg=7.0,
                   seed=0, seed__control="fixed", batch_size=8, shift=1.0, name=REFLOW_NAME)
    b.link(patch, "MODEL", pairs, "model")
    b.link(pos, "CONDITIONING", pairs, "positive")
    b.link(neg, "CONDITIONING", pairs, "negative")
    train, options = _d2f_train(b, steps=1000, batch_size=4, save_every=250, preview_every=100,
                                run_name="d2f_sd15_reflow", ema_decay=0.995)
    b.link(patch, "MODEL", train, "model")
    b.link(pairs, "couplings", train, "couplings")
    options.append(_validation(b, train, every_n_steps=250, cfg=1.0))
    save_lora, loss = _save_lora_and_loss(b, train, "loras/d2f_sd15_reflow", "d2f/reflow_loss_graph")
    latent = _latent(b)
    ks = _ksampler(b, (train, "model"), (pos, "CONDITIONING"), (neg, "CONDITIONING"), (latent, "LATENT"),
                   steps=4, cfg=1.0)
    dec, save = _decode_and_save(b, (ks, "LATENT"), ckpt_node, "d2f/sd15_reflow_4steps")
    note = b.note(
        "Diff2Flow — Reflow: straight paths, 4-step sampling (SD1.5)\n\n"
        f"1. Load Checkpoint: your SD1.5 checkpoint ({SD15_CKPT} is only the usual file name).\n\n"
        "2. Positive prompt: what the pairs (and so the reflowed model) should show; the negative is used "
        "for CFG while the pairs are made.\n\n"
        "3. Diff2Flow Reflow Pairs: for each seeded noise ε it solves the model's own ODE (25 Euler steps, "
        f"CFG 7) to its image x̂0 and stores (ε, x̂0, prompt) in output/d2f_couplings/{REFLOW_NAME}. count = "
        "64 is a demo; a few hundred to a few thousand pairs give a model that generalises. Chunks are "
        "saved as they are made: stop and run again with the same inputs to continue, or raise count to "
        "add pairs. Change the name when you change model, prompt, steps or CFG.\n\n"
        "4. Diff2Flow Train (couplings connected, latents/positive left empty) trains on the straight line "
        "x = (1-σ)·x̂0 + σ·ε' with target ε' - x̂0, ε' being the noise whose line passes through the state the "
        "sampler started from (D(σ_max)·ε). Why: the ODE's curved paths are what need 20+ steps; "
        "Reflow makes them straight, so 2–4 Euler steps land where the full ODE lands. Train Advanced holds "
        "the rarely changed settings (bf16 needs a GPU; on CPU set its training_dtype to fp32); EMA averages "
        "the weights of the last ~200 steps for the saved LoRAs and the sampler. Validation holds 10% of the pairs "
        "out: every 250 steps their loss, a 1/2/4/25-step grid and the straightness (how far the 1-step result is "
        "from the 25-step one on the same noise; it falls as the paths straighten) go to the chart and the run's "
        "folder.\n\n"
        "5. KSampler: 4 steps euler + simple on the trained model. CFG 1: the pairs were made with CFG 7, "
        "so the guidance is already in what the model learned. Save LoRA writes loras/d2f_sd15_reflow…; "
        "Plot Loss Graph saves the loss curve.",
        size=[360, 640], title="Read me: what to set, and why")
    x = _model_group(b, [[ckpt_node, note], [patch, pos, neg]])
    x = b.columns([[pairs]], x=x)
    x = b.columns([options, [train]], x=x + GROUP_GAP)
    b.columns([[save_lora, loss, latent], [ks, dec], [save]], x=x + GROUP_GAP)
    b.group("Reflow pairs", [pairs])
    b.group("Train", options + [train])
    b.group("Save and sample (4 steps)", [save_lora, loss, latent, ks, dec, save])
    return b.to_json()


EXAMPLES = {
    # name: (builder, {model folder: [file names the workflow names]}, {input files/folders it names})
    "d2f_sd15_txt2img": (sd15_txt2img, {"checkpoints": [SD15_CKPT]}, {}),
    "d2f_sd15_flow_sampler": (sd15_flow_sampler, {"checkpoints": [SD15_CKPT]}, {}),
    "d2f_sdxl_txt2img": (sdxl_eps, {"checkpoints": [SDXL_CKPT]}, {}),
    "d2f_sdxl_vpred_txt2img": (sdxl_vpred, {"checkpoints": [SDXL_VPRED_CKPT]}, {}),
    "d2f_sd15_img2img": (sd15_img2img, {"checkpoints": [SD15_CKPT]}, {"image": IMG2IMG_IMAGE}),
    "d2f_sd15_train_lora": (sd15_train_lora, {"checkpoints": [SD15_CKPT]}, {"folder": TRAIN_FOLDER}),
    "d2f_sd15_reflow": (sd15_reflow, {"checkpoints": [SD15_CKPT]}, {}),
}


def build_all(defs) -> dict:
    return {name: build(defs) for name, (build, _, _) in EXAMPLES.items()}


def main(argv=None) -> int:
    from .host import boot, object_info

    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
    boot(cpu=True, custom_nodes=False)
    defs = object_info()
    for name, workflow in build_all(defs).items():
        dump(workflow, os.path.join(out, f"{name}.json"))
        print(f"wrote {os.path.join(out, name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
