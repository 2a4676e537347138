"""In-process ComfyUI host for the pack's tests: find it, boot it once, build tiny checkpoints.

Host discovery (``find_host``): ``$COMFYUI_PATH``, else ``~/ComfyUI``, else the ComfyUI whose
``custom_nodes/`` holds this pack. No host → the tests that need one skip, with the reason.

Boot (``boot_host``, DESIGN §5): the host directory goes first on ``sys.path`` (ComfyUI's top-level
``nodes`` module must win over this pack's ``nodes/`` package), ``comfy.cli_args.args.cpu = True``
before ``comfy.model_management`` is imported, the core extras the tests use are loaded the way the
host loads them, then the pack through ``nodes.load_custom_node`` exactly as ComfyUI does at start-up.
Output/temp/input/user directories and the model folders the tests write to live under a tmp dir,
so nothing is written into the host's own tree.

Tiny checkpoints (``tiny_unet_state_dict``, ``write_*``): UNets in the real key layouts that the
host's detector recognises as SD1.5 / SDXL, with random weights and the time embedding scaled up so
a wrong time label changes the output visibly; and a full SD1.5 checkpoint file with real-layout
CLIP-L and VAE weights, loadable by ``CheckpointLoaderSimple``.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Core extras the tests call (KSamplerSelect, BasicScheduler, SamplerCustomAdvanced, CFGGuider,
# RandomNoise, ModelSamplingDiscrete/SD3/Flux, RescaleCFG). Loaded like init_builtin_extra_nodes does.
CORE_EXTRAS = ("nodes_custom_sampler.py", "nodes_model_advanced.py")

PACK_NODE_IDS = ("D2FFlowPatch", "D2FFlowScheduler", "D2FEulerFlowSampler", "D2FRescaleCFG")


# ---------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------
def _is_comfyui(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in ("nodes.py", "folder_paths.py", "comfy/model_management.py"))


@dataclass
class HostLocation:
    path: str | None
    how: str  # where it was found, or why none was

    def __bool__(self):
        return self.path is not None


def find_host() -> HostLocation:
    """$COMFYUI_PATH, else ~/ComfyUI, else the ComfyUI containing this pack (custom_nodes/<pack>)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = os.path.abspath(os.path.expanduser(env))
        if _is_comfyui(path):
            return HostLocation(path, f"$COMFYUI_PATH={env}")
        # An explicit choice that is wrong is reported, not silently replaced by another host.
        return HostLocation(None, f"$COMFYUI_PATH={env} is not a ComfyUI checkout (no nodes.py, folder_paths.py, "
                                  "comfy/model_management.py there)")
    home = os.path.expanduser("~/ComfyUI")
    if _is_comfyui(home):
        return HostLocation(home, "~/ComfyUI")
    tried = ["$COMFYUI_PATH (unset)", home]
    # The pack as ComfyUI sees it: <host>/custom_nodes/<pack>. Try the path as given (it may be a
    # symlink into custom_nodes) and its resolved form.
    for pack in dict.fromkeys((PACK_DIR, os.path.realpath(PACK_DIR))):
        parent = os.path.dirname(pack)
        candidate = os.path.dirname(parent)
        if os.path.basename(parent) != "custom_nodes":
            tried.append(f"the ComfyUI containing this pack ({pack} is not in a custom_nodes/ folder)")
        elif _is_comfyui(candidate):
            return HostLocation(candidate, f"the ComfyUI containing this pack ({pack})")
        else:
            tried.append(candidate)
    return HostLocation(None, "no ComfyUI host found (tried " + ", ".join(tried) +
                              "); set COMFYUI_PATH to a ComfyUI checkout to run the host tests")


# ---------------------------------------------------------------------------------------------
# boot
# ---------------------------------------------------------------------------------------------
class Host:
    """The booted host: its modules and a node runner that calls nodes the way the executor does."""

    def __init__(self, path: str, work_dir: str, pack_module_path: str):
        import comfy
        import comfy.model_management
        import comfy.samplers
        import folder_paths
        import nodes

        self.path = path
        self.work_dir = work_dir
        self.pack_module_path = pack_module_path
        self.nodes = nodes
        self.comfy = comfy
        self.folder_paths = folder_paths
        self.mm = comfy.model_management
        self.unet_dir = os.path.join(work_dir, "models", "diffusion_models")
        self.checkpoint_dir = os.path.join(work_dir, "models", "checkpoints")

    def node_class(self, node_id: str):
        try:
            return self.nodes.NODE_CLASS_MAPPINGS[node_id]
        except KeyError:
            raise KeyError(f"node '{node_id}' is not registered in the host") from None

    def _execute(self, node_id: str, **inputs):
        """Execute one node as ComfyUI's executor does (V3: validated, class clone, locked method;
        V1: an instance's FUNCTION), under ``torch.inference_mode()``. Returns what the node returned."""
        import torch
        from comfy_api.internal import _ComfyNodeInternal, make_locked_method_func

        cls = self.node_class(node_id)
        if isinstance(cls, type) and issubclass(cls, _ComfyNodeInternal):
            cls.VALIDATE_CLASS()
            cls.GET_SCHEMA()
            fn = make_locked_method_func(cls, cls.FUNCTION, cls.PREPARE_CLASS_CLONE(None))
        else:
            fn = getattr(cls(), cls.FUNCTION)
        with torch.inference_mode():
            out = fn(**inputs)
            if inspect.isawaitable(out):
                out = asyncio.run(out)
        return out

    def run(self, node_id: str, **inputs) -> tuple:
        """``_execute``, returning the node's output tuple."""
        out = self._execute(node_id, **inputs)
        if hasattr(out, "result"):  # V3 NodeOutput
            return tuple(out.result)
        if isinstance(out, dict):  # V1 {"ui": ..., "result": ...}
            return tuple(out.get("result", ()))
        return tuple(out)

    def run1(self, node_id: str, **inputs):
        """``run`` for a node with one output: that output."""
        return self.run(node_id, **inputs)[0]

    def run_output_node(self, node_id: str, **inputs):
        """``run`` for output nodes (SaveLoRA, LossGraphNode, CheckpointSave, …), whose V3 ``NodeOutput``
        may carry no result at all: returns ``(result tuple, ui dict or None)``."""
        out = self._execute(node_id, **inputs)
        if hasattr(out, "result"):  # V3 NodeOutput
            ui = out.ui.as_dict() if hasattr(out.ui, "as_dict") else out.ui
            return tuple(out.result or ()), ui
        if isinstance(out, dict):  # V1 {"ui": ..., "result": ...}
            return tuple(out.get("result", ())), out.get("ui")
        return tuple(out), None


_BOOTED: Host | None = None


def _pack_path_as_host_sees_it(host_dir: str) -> str:
    """custom_nodes/<name> when that entry is this pack (e.g. a symlink to it), else the pack dir."""
    custom = os.path.join(host_dir, "custom_nodes")
    real = os.path.realpath(PACK_DIR)
    if os.path.isdir(custom):
        for name in sorted(os.listdir(custom)):
            entry = os.path.join(custom, name)
            if os.path.isdir(entry) and os.path.realpath(entry) == real:
                return entry
    return PACK_DIR


def boot_host(host_dir: str, work_dir: str) -> Host:
    """Boot ComfyUI in this process (once), load the core extras the tests need and this pack."""
    global _BOOTED
    if _BOOTED is not None:
        if os.path.realpath(_BOOTED.path) != os.path.realpath(host_dir):
            raise RuntimeError(f"a host is already booted from {_BOOTED.path}; cannot boot {host_dir} too")
        return _BOOTED

    host_dir = os.path.abspath(host_dir)
    loaded = sys.modules.get("nodes")
    if loaded is not None and os.path.realpath(getattr(loaded, "__file__", "") or "") != os.path.realpath(os.path.join(host_dir, "nodes.py")):
        raise RuntimeError(f"a module named 'nodes' is already imported from {getattr(loaded, '__file__', loaded)}; "
                           "ComfyUI's top-level nodes.py must be the one imported (never `import nodes` for this "
                           "pack's nodes/ package; import it relatively)")
    while host_dir in sys.path:
        sys.path.remove(host_dir)
    sys.path.insert(0, host_dir)

    already = "comfy.model_management" in sys.modules
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    comfy.cli_args.args.preview_method = comfy.cli_args.LatentPreviewMethod.NoPreviews
    import comfy.model_management
    if already and comfy.model_management.cpu_state != comfy.model_management.CPUState.CPU:
        raise RuntimeError("comfy.model_management was imported before the test host was booted, without --cpu; "
                           "boot the host (comfy_host.session_host / the `host` fixture) before importing comfy")
    import comfy.utils
    import folder_paths

    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars in test logs (the samplers' disable_pbar)

    for kind in ("output", "temp", "input", "user"):
        os.makedirs(os.path.join(work_dir, kind), exist_ok=True)
    folder_paths.set_output_directory(os.path.join(work_dir, "output"))
    folder_paths.set_temp_directory(os.path.join(work_dir, "temp"))
    folder_paths.set_input_directory(os.path.join(work_dir, "input"))
    folder_paths.set_user_directory(os.path.join(work_dir, "user"))

    import nodes
    extras_dir = os.path.join(host_dir, "comfy_extras")
    for extra in CORE_EXTRAS:
        if not asyncio.run(nodes.load_custom_node(os.path.join(extras_dir, extra), module_parent="comfy_extras")):
            raise RuntimeError(f"the host could not load its own comfy_extras/{extra}")

    pack_path = _pack_path_as_host_sees_it(host_dir)
    if not asyncio.run(nodes.load_custom_node(pack_path)):
        raise RuntimeError(f"ComfyUI failed to load the pack from {pack_path} (see the log above)")
    missing = [n for n in PACK_NODE_IDS if n not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise RuntimeError(f"the pack loaded but did not register {missing}")

    host = Host(host_dir, work_dir, pack_path)
    for folder in (host.unet_dir, host.checkpoint_dir):
        os.makedirs(folder, exist_ok=True)
    folder_paths.add_model_folder_path("diffusion_models", host.unet_dir, is_default=True)
    folder_paths.add_model_folder_path("checkpoints", host.checkpoint_dir, is_default=True)
    _BOOTED = host
    return host


_OWNED_WORK_DIR: str | None = None


def session_host() -> Host:
    """The host of this test session, booted on first use with a fresh temporary work dir (removed by
    ``cleanup``). Raises RuntimeError when there is no host: callers check ``find_host()`` first."""
    global _OWNED_WORK_DIR
    if _BOOTED is not None:
        return _BOOTED
    location = find_host()
    if not location:
        raise RuntimeError(location.how)
    _OWNED_WORK_DIR = tempfile.mkdtemp(prefix="d2f_comfyui_host_")
    return boot_host(location.path, _OWNED_WORK_DIR)


def cleanup() -> None:
    """Remove the work dir ``session_host`` made (output/temp dirs, tiny checkpoint files)."""
    global _OWNED_WORK_DIR
    if _OWNED_WORK_DIR is not None:
        shutil.rmtree(_OWNED_WORK_DIR, ignore_errors=True)
        _OWNED_WORK_DIR = None


# ---------------------------------------------------------------------------------------------
# tiny checkpoints in real key layouts
# ---------------------------------------------------------------------------------------------
_UNET_COMMON = dict(in_channels=4, out_channels=4, image_size=32, use_spatial_transformer=True, legacy=False,
                    use_checkpoint=False, use_temporal_attention=False, use_temporal_resblock=False)

# One level, one res block, one transformer block: detected as SD15 (DESIGN §5). 25.8 M parameters.
SD15_UNET_CONFIG = dict(_UNET_COMMON, model_channels=320, channel_mult=[1], num_res_blocks=[1],
                        transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
                        context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
                        adm_in_channels=None)

# SDXL's detector keys (model_channels 320, transformer_depth [0,0,2,2,10,10], context 2048, adm 2816,
# linear transformers) with every level at 320 channels and no output/middle transformers: detected
# as SDXL, 136 M parameters instead of 2.6 B.
SDXL_UNET_CONFIG = dict(_UNET_COMMON, model_channels=320, channel_mult=[1, 1, 1], num_res_blocks=[2, 2, 2],
                        transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0] * 9,
                        transformer_depth_middle=0, context_dim=2048, num_heads=-1, num_head_channels=64,
                        use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential")

# Random weights barely depend on the timestep. Scaling time_embed.* alone does not change that
# (measured: ×1, ×20 and ×100 all give ≈0.5% output change per unit label: downstream GroupNorms
# normalise the embedding's size away); weakening the input convolution does (≈3.5% per label, 18% over
# the schedule) while the output still depends strongly on x. Both are applied.
TIME_EMBED_SCALE = 20.0
INPUT_CONV_SCALE = 0.1


def _random_like_layout(shapes: dict, seed: int, dtype, scale_prefixes: dict | None = None) -> dict:
    """Deterministic random weights for a key→shape layout: matrices/convs ~ N(0, 1/fan_in),
    norm weights ~ 1 + N(0, 0.1²), biases and other vectors ~ N(0, 0.05²)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        elif key.endswith("weight") and ("norm" in key or "ln_" in key):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = 0.05 * torch.randn(shape, generator=gen)
        for prefix, factor in (scale_prefixes or {}).items():
            if key.startswith(prefix):
                t = t * factor
        out[key] = t.to(dtype).contiguous()
    return out


def tiny_unet_state_dict(unet_config: dict, expect: str, seed: int = 0, time_embed_scale: float = TIME_EMBED_SCALE,
                         input_conv_scale: float = INPUT_CONV_SCALE, dtype=None) -> dict:
    """A UNet state dict (keys as in ``model.diffusion_model.*`` without the prefix) for ``unet_config``,
    checked to be detected by the host as ``expect`` (e.g. "SD15", "SDXL"). ``time_embed.*`` is scaled
    by ``time_embed_scale`` and the input convolution by ``input_conv_scale`` so that the output
    depends visibly on the time label (see ``INPUT_CONV_SCALE``)."""
    import comfy.model_detection
    import torch

    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if config is None or type(config).__name__ != expect:
        raise RuntimeError(f"the host detects this UNet config as {type(config).__name__}, not {expect}")
    model = config.get_model({})
    shapes = {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}
    del model
    sd = _random_like_layout(shapes, seed, dtype or torch.float32, {"time_embed.": time_embed_scale, "input_blocks.0.0.": input_conv_scale})
    detected = comfy.model_detection.model_config_from_unet(sd, "")
    if detected is None or type(detected).__name__ != expect:
        raise RuntimeError(f"the written UNet state dict is detected as {type(detected).__name__}, not {expect}")
    return sd


def save_safetensors(sd: dict, path: str, metadata: dict | None = None) -> str:
    import safetensors.torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part"
    safetensors.torch.save_file(sd, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def clip_l_layout() -> dict:
    """Key→shape of the host's own SD1 CLIP-L text model, as a checkpoint stores it
    (``cond_stage_model.transformer.text_model.*``)."""
    import comfy.sd1_clip
    import torch

    clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
    shapes = {"cond_stage_model." + k: tuple(v.shape) for k, v in clip.state_dict().items()
              if k.startswith("transformer.text_model.")}
    return shapes


def vae_layout() -> dict:
    """Key→shape of the host's SD VAE (``AutoencoderKL`` with the SD ddconfig), as ``first_stage_model.*``."""
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    return {"first_stage_model." + k: tuple(v.shape) for k, v in vae.state_dict().items()}


def write_pattern_png(path: str, rgb, size: int = 64) -> str:
    """A size×size RGB PNG with a gradient pattern around ``rgb`` (not flat: an encoder sees structure)."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    Image.fromarray(np.stack([(xx * 4 + rgb[0]) % 256, (yy * 4 + rgb[1]) % 256, np.full_like(xx, rgb[2])],
                             -1).astype("uint8")).save(path)
    return path


def write_training_folder(folder: str) -> str:
    """The example workflows' training folder: two captioned images (img0/1.png + .txt), as core
    LoadImageTextSetFromFolder reads them."""
    os.makedirs(folder, exist_ok=True)
    for i, (rgb, caption) in enumerate((((200, 40, 40), "a red pattern"), ((30, 160, 60), "a green pattern"))):
        write_pattern_png(os.path.join(folder, f"img{i}.png"), rgb)
        with open(os.path.join(folder, f"img{i}.txt"), "w") as f:
            f.write(caption)
    return folder


def write_sd15_checkpoint(path: str, unet_sd: dict, seed: int = 1) -> str:
    """A full SD1.5 checkpoint: ``model.diffusion_model.*`` (the given tiny UNet) + a real-layout CLIP-L
    (``cond_stage_model.transformer.text_model.*``, 123 M parameters) + a real-layout VAE
    (``first_stage_model.*``, 84 M parameters), CLIP/VAE random in fp16. The host fixes CLIP-L's and the
    VAE's architecture, so these two cannot be made smaller and still load without missing keys."""
    import torch

    sd = {"model.diffusion_model." + k: v for k, v in unet_sd.items()}
    sd.update(_random_like_layout(clip_l_layout(), seed, torch.float16))
    sd.update(_random_like_layout(vae_layout(), seed + 1, torch.float16))
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    if key in sd:
        sd[key] = torch.arange(sd[key].shape[-1]).reshape(sd[key].shape)
    return save_safetensors(sd, path)


# ---------------------------------------------------------------------------------------------
# more of the host's own nodes, on demand
# ---------------------------------------------------------------------------------------------
_EXTRAS_LOADED: set[str] = set()


def load_core_extras(host: Host, *files: str) -> None:
    """Load more ``comfy_extras/*.py`` modules of the host (as ``init_builtin_extra_nodes`` does), each
    once per session, e.g. ``nodes_train.py`` (SaveLoRA, LoraModelLoader, LossGraphNode),
    ``nodes_dataset.py`` (MakeTrainingDataset, ResolutionBucket), ``nodes_model_merging.py``
    (CheckpointSave)."""
    for extra in files:
        if extra in _EXTRAS_LOADED or extra in CORE_EXTRAS:
            continue
        path = os.path.join(host.path, "comfy_extras", extra)
        if not asyncio.run(host.nodes.load_custom_node(path, module_parent="comfy_extras")):
            raise RuntimeError(f"the host could not load its own comfy_extras/{extra}")
        _EXTRAS_LOADED.add(extra)


def add_model_folder(host: Host, kind: str, path: str) -> str:
    """Register ``path`` as one more folder of model kind ``kind`` ("loras", "checkpoints", …), the way
    ``extra_model_paths.yaml`` does, so the core loaders find files written there (e.g. into output/)."""
    os.makedirs(path, exist_ok=True)
    if path not in host.folder_paths.get_folder_paths(kind):
        host.folder_paths.add_model_folder_path(kind, path)
    return path


def d2f_train_inputs(host: Host, settings: dict) -> dict:
    """D2FTrain's inputs for settings named flat, as its files (and its widgets before issue 12) name them:
    its own widgets stay; each group of its option nodes' settings (D2FTrainAdvanced, D2FScheduledSampling)
    becomes that node's output, the rest of the group at the node's defaults, on D2FTrain's advanced /
    scheduled_sampling input: the way an old workflow is migrated (``d2f_host.migrate``, whose table is read
    here directly: child processes of the tests import this module without the pack's folder on their path)."""
    import json

    with open(os.path.join(PACK_DIR, "web", "legacy_widgets.json"), encoding="utf-8") as f:
        moved = json.load(f)["D2FTrain"]["moved"]
    out = dict(settings)
    own = {i.id for i in host.node_class("D2FTrain").GET_SCHEMA().inputs}
    for option_type, spec in moved.items():
        schema = host.node_class(option_type).GET_SCHEMA().inputs
        given = {new: out.pop(old) for old, new in spec["widgets"].items() if old in out}
        # settings the option node gained after the old layouts (sharding) go by their own name
        given.update({i.id: out.pop(i.id) for i in schema if i.id in out and i.id not in own})
        if given:
            values = {i.id: i.default for i in schema}
            values.update(given)
            out[spec["input"]] = host.run1(option_type, **values)
    return out
