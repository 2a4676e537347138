"""Trainable adaptations of a frozen, shared module (DESIGN §3: training must never change shared weights).

The diffusion UNet handed to a node is shared with every other clone of the model and with the loader's
cache, so neither class below writes, re-registers or re-flags any of its parameters.

* :class:`LoraAdapters` — bypass LoRA on every selected ``nn.Linear`` / ``nn.Conv2d`` (and subclasses,
  e.g. ComfyUI's ``comfy.ops.*.Linear``)::

      y = base(x) + (α/r) · up(down(x))

  added by forward hooks; ``W + ΔW`` is never materialised, so it also works when the host streams or
  casts the base weights per layer. Exported in ComfyUI's LoRA format, whose merge
  ``W' = W + (α/r) · (up.flatten(1) @ down.flatten(1)).reshape(W.shape)`` (:func:`merge_lora_into`)
  reproduces the bypass output.

* :class:`FullAdapters` — full fine-tune of trainable copies ``θ'`` of the selected parameters, run through
  ``torch.func.functional_call(root, θ', …)``; exported as weight differences ``Δ = θ' - θ`` that
  ComfyUI applies as ``("diff", (Δ,))`` patches.

Pure torch: nothing here imports ComfyUI.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
import zlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import copy_into, full_tensor

__all__ = ["LoraAdapters", "FullAdapters", "attention_only", "merge_lora_into", "ATTENTION_MARKERS"]

Include = Callable[[str, nn.Module], bool]

#: Name fragments of the modules inside SD/SDXL transformer blocks (see :func:`attention_only`). ``attn``
#: also picks the DiTs' attention: PixArt's ``blocks.N.attn.{qkv,proj}`` and ``blocks.N.cross_attn.{q,kv}_linear/
#: proj``, HunyuanDiT's ``blocks.N.attn1.{Wqkv,out_proj}`` and ``blocks.N.attn2.{q,kv,out}_proj``; none of their
#: other linears (embedders, block MLPs, modulation, pooler, final layer) carries one of these fragments.
ATTENTION_MARKERS = ("transformer_blocks", "attn", "proj_in", "proj_out", "ff.net")


def attention_only(name: str, module: nn.Module) -> bool:
    """``include`` predicate for lighter LoRAs: keep modules inside the transformer blocks only
    (qualified name contains one of :data:`ATTENTION_MARKERS`); skips ResNet convs, time/label embeddings
    and the in/out convs. On the DiTs (PixArt, HunyuanDiT): their self- and cross-attention linears only."""
    return any(marker in name for marker in ATTENTION_MARKERS)


def merge_lora_into(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                    alpha: float | torch.Tensor | None, strength: float = 1.0) -> torch.Tensor:
    """ComfyUI's LoRA merge (``comfy/weight_adapter/lora.py``), pure torch, returns a new tensor::

        W' = W + strength · (α / r) · (up.flatten(1) @ down.flatten(1)).reshape(W.shape),  r = down.shape[0]

    ``α = None`` means scale 1, as in ComfyUI for files without ``.alpha``. Computed in float32 (float64
    for a float64 weight) like the host's intermediate dtype, returned in ``weight.dtype``.
    """
    rank = down.shape[0]
    scale = 1.0 if alpha is None else float(alpha) / rank
    ct = torch.float64 if weight.dtype == torch.float64 else torch.float32
    diff = torch.mm(up.to(weight.device, ct).flatten(1), down.to(weight.device, ct).flatten(1))
    return (weight.to(ct) + (strength * scale) * diff.reshape(weight.shape)).to(weight.dtype)


# ---------------------------------------------------------------------------------------------- helpers

def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no per-device query
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _key(prefix: str, name: str, suffix: str = "") -> str:
    """prefix + name + "." + suffix, without the stray dots an empty name (root itself) or prefix
    would leave: "diffusion_model..lora_up.weight" would match nothing."""
    base = prefix + name if name else prefix.rstrip(".")
    return f"{base}.{suffix}" if base and suffix else (base or suffix)


def _module_seed(seed: int, name: str) -> int:
    # Per-module seeds: a module's initial LoRA does not depend on which other modules `include` kept.
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode("utf-8"))) % (2 ** 63)


def _cpu_copy(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # clone(): on CPU `.to()` may return the live tensor itself, and an export must be a snapshot.
    return t.detach().to("cpu", dtype or t.dtype).clone().contiguous()


def _check_keys(got, expected, what: str) -> None:
    got, expected = set(got), set(expected)
    if got == expected:
        return
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})")
    raise ValueError(f"{what}: keys do not match these adapters: " + "; ".join(parts)
                     + ". Was it made for another model, key_prefix, include filter or adapter type?")


def _check_shape(key: str, got: torch.Tensor, expected: torch.Size) -> None:
    if tuple(got.shape) != tuple(expected):
        raise ValueError(f"'{key}': shape {tuple(got.shape)} does not match the adapter's {tuple(expected)}"
                         " (different rank or model?)")


def _remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


def _warn_if_base_trainable(root: nn.Module) -> None:
    # Not ours to change (the module is shared), but grads of a requires_grad base would be written into
    # the shared parameters' .grad and cost memory.
    if any(p.requires_grad for p in root.parameters()):
        warnings.warn("the base module has parameters with requires_grad=True; their gradients will be "
                      "computed and stored in the shared module. Freeze it (requires_grad_(False)) first.",
                      stacklevel=3)


class _AdaptersBase:
    root: nn.Module
    key_prefix: str

    def parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _named_trainables(self) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def named_trainables(self) -> dict[str, nn.Parameter]:
        """The live trainable tensors by the stable names of :meth:`state_tensors` (not copies)."""
        return self._named_trainables()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Trainable tensors by stable name, detached copies (a snapshot that later steps do not change). Sharded
        (FSDP): gathered whole, a collective every rank makes."""
        return {k: full_tensor(p.detach()).clone() for k, p in self._named_trainables().items()}

    def load_state_tensors(self, d: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors` (strict keys and shapes; dtype/device converted)."""
        named = self._named_trainables()
        _check_keys(d.keys(), named.keys(), "load_state_tensors")
        for k, p in named.items():
            _check_shape(k, d[k], p.shape)
        # Nodes call this under inference_mode; the copy must not turn the parameters into inference
        # tensors (autograd refuses those), and it must not be recorded either.
        with torch.inference_mode(False), torch.no_grad():
            for k, p in named.items():
                copy_into(p, d[k])  # a sharded tensor (FSDP) takes its rows of the whole one

    def attach(self) -> None:
        pass

    def detach(self) -> None:
        pass

    @property
    def is_attached(self) -> bool:
        return True

    @contextlib.contextmanager
    def attached(self) -> Iterator["_AdaptersBase"]:
        """``with adapters.attached(): …`` — attached inside, previous state restored on exit."""
        was = self.is_attached
        self.attach()
        try:
            yield self
        finally:
            if not was:
                self.detach()

    def __enter__(self):
        self._cm = self.attached()
        return self._cm.__enter__()

    def __exit__(self, *exc):
        cm, self._cm = self._cm, None
        return cm.__exit__(*exc)


# ------------------------------------------------------------------------------------------------ LoRA

class _LoraPair(nn.Module):
    """down/up factors of one target; ``delta(x) = up(down(x))`` with the target's conv geometry."""

    def __init__(self, module: nn.Module, rank: int, dtype: torch.dtype, device, generator, scale: float):
        super().__init__()
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            down = torch.empty(rank, module.in_channels, kh, kw, dtype=torch.float32)
            up = torch.zeros(module.out_channels, rank, 1, 1, dtype=torch.float32)
            self.is_conv = True
            self.stride, self.dilation = module.stride, module.dilation
            self.padding, self.padding_mode = module.padding, module.padding_mode
            self.reversed_padding = module._reversed_padding_repeated_twice
        else:
            down = torch.empty(rank, module.in_features, dtype=torch.float32)
            up = torch.zeros(module.out_features, rank, dtype=torch.float32)
            self.is_conv = False
        # Initialised in float32 on the CPU so a seed gives the same LoRA on every device and dtype.
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.down = nn.Parameter(down.to(device=device, dtype=dtype))
        self.up = nn.Parameter(up.to(device=device, dtype=dtype))
        self.scale = scale

    def delta(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(α/r)·up(down(x)), with the factors cast (differentiably) to ``dtype`` when given: the
        low-rank path then runs in the activations' precision, as autocast would run it, and the scale
        is folded into the small up factor rather than applied to the activations."""
        down, up = self.down, self.up * self.scale
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        if not self.is_conv:
            return F.linear(F.linear(x, down), up)
        if self.padding_mode != "zeros":
            # Same padding as nn.Conv2d._conv_forward, so merged and bypass weights see the same pixels.
            h = F.conv2d(F.pad(x, self.reversed_padding, mode=self.padding_mode), down, None,
                         self.stride, 0, self.dilation)
        else:
            h = F.conv2d(x, down, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, up)


def _lora_hook(pair: _LoraPair):
    # The closure holds the pair, never the LoraAdapters object, so a forgotten attach cannot keep the
    # adapters alive and the weakref finalizer can still remove the hooks.
    def hook(module, inputs, output):
        if not inputs:
            raise RuntimeError(f"LoRA hook on {type(module).__name__}: input passed by keyword; "
                               "bypass LoRA needs it positional")
        x = inputs[0]
        # Under autocast the ops cast both sides themselves; otherwise compute in the activations' dtype.
        dtype = None if _autocast_enabled(x.device.type) else x.dtype
        return output + pair.delta(x, dtype).to(output.dtype)
    return hook


class LoraAdapters(_AdaptersBase):
    """Bypass LoRA on a frozen shared module.

    For each target ``m`` (every ``nn.Linear`` / ``nn.Conv2d`` under ``root``, subclasses included, whose
    qualified name passes ``include``)::

        m'(x) = m(x) + (α / r) · up(down(x))

    Linear: ``down = Linear(in, r)``, ``up = Linear(r, out)`` (no bias). Conv2d: ``down = Conv2d(in, r,
    kernel, stride, padding, dilation, padding_mode)``, ``up = Conv2d(r, out, 1)``. ``down`` is
    kaiming-uniform (a = √5) from a per-module generator seeded by ``seed`` and the module's name, ``up``
    is zero, so before the first step the output is exactly the base output.

    Skipped (listed in :attr:`skipped`): grouped convolutions (the LoRA product has no grouped form) and
    the ``out_proj`` of ``nn.MultiheadAttention``, whose weight is read directly, never called, so a hook
    would never fire while a merge would still apply it.

    ``device=None`` puts each pair on its target's weight device; pass the compute device when the host
    keeps weights offloaded. ``alpha`` is rounded to float32 once, the precision a saved ``.alpha`` has,
    so the bypass scale equals the scale ComfyUI computes from the exported file.
    """

    def __init__(self, root: nn.Module, rank: int = 16, alpha: float | None = None,
                 dtype: torch.dtype = torch.float32, device=None, include: Include | None = None,
                 key_prefix: str = "diffusion_model.", seed: int | None = 0):
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.root = root
        self.rank = int(rank)
        self.alpha = float(torch.tensor(float(self.rank if alpha is None else alpha), dtype=torch.float32))
        self.dtype = dtype
        self.key_prefix = key_prefix
        self.seed = seed
        self.skipped: list[tuple[str, str]] = []
        self._targets: dict[str, nn.Module] = {}
        self._pairs: dict[str, _LoraPair] = {}
        self._alphas: dict[str, float] = {}

        never_called = set()
        for name, m in root.named_modules():
            if isinstance(m, nn.MultiheadAttention):
                never_called.add(f"{name}.out_proj" if name else "out_proj")

        # Under a node's inference_mode the factors would be inference tensors, which autograd refuses.
        with torch.inference_mode(False):
            for name, m in root.named_modules():
                if not isinstance(m, (nn.Linear, nn.Conv2d)):
                    continue
                if include is not None and not include(name, m):
                    continue
                if name in never_called:
                    self.skipped.append((name, "MultiheadAttention.out_proj is never called"))
                    continue
                if isinstance(m, nn.Conv2d) and m.groups != 1:
                    self.skipped.append((name, f"grouped conv (groups={m.groups})"))
                    continue
                gen = None if seed is None else torch.Generator().manual_seed(_module_seed(seed, name))
                w = getattr(m, "weight", None)
                dev = device if device is not None else (w.device if isinstance(w, torch.Tensor) else "cpu")
                self._targets[name] = m
                self._pairs[name] = _LoraPair(m, self.rank, dtype, dev, gen, self.alpha / self.rank)
                self._alphas[name] = self.alpha
        if not self._pairs:
            raise ValueError("LoraAdapters: no nn.Linear/nn.Conv2d module under root passed `include`")
        _warn_if_base_trainable(root)
        self._handles: list = []
        # Hooks must not outlive the adapters on a shared module, even when detach() is forgotten.
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)

    # -- introspection
    @property
    def names(self) -> list[str]:
        """Qualified names (under root) of the adapted modules, in module order."""
        return list(self._pairs)

    def parameters(self) -> list[nn.Parameter]:
        return [p for pair in self._pairs.values() for p in (pair.down, pair.up)]

    def _named_trainables(self) -> dict[str, nn.Parameter]:
        out = {}
        for name, pair in self._pairs.items():
            out[f"{name}.lora_down.weight"] = pair.down
            out[f"{name}.lora_up.weight"] = pair.up
        return out

    def to(self, device=None, dtype: torch.dtype | None = None) -> "LoraAdapters":
        """Move/cast the factors in place (Parameter objects kept, so optimizers stay valid)."""
        for pair in self._pairs.values():
            pair.to(device=device, dtype=dtype)
        if dtype is not None:
            self.dtype = dtype
        return self

    # -- hooks
    @property
    def is_attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        """Register the forward hooks on root's modules (idempotent)."""
        if self._handles:
            return
        for name, pair in self._pairs.items():
            self._handles.append(self._targets[name].register_forward_hook(_lora_hook(pair), with_kwargs=False))

    def detach(self) -> None:
        """Remove every hook this object registered (idempotent); root behaves as the base again.
        Not while a backward that recomputes checkpointed segments is still pending."""
        _remove_handles(self._handles)

    def __call__(self, *args, **kwargs):
        """``root(*args, **kwargs)`` with the LoRA active. Requires :meth:`attach` (or ``attached()``): a
        temporary attach here would be gone when a checkpointed block inside root recomputes during
        backward, which would then silently run without the LoRA."""
        if not self._handles:
            raise RuntimeError("LoraAdapters are not attached: call attach() or use `with adapters.attached():`")
        return self.root(*args, **kwargs)

    # -- ComfyUI LoRA format
    def export(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """ComfyUI ``LORA_MODEL`` dict (what ``SaveLoRA`` writes, ``LoraLoader``/``LoraModelLoader`` read)::

            {prefix}{N}.lora_up.weight    [out, r] or [out, r, 1, 1]
            {prefix}{N}.lora_down.weight  [r, in] or [r, in, kh, kw]
            {prefix}{N}.alpha             0-dim float32 α

        Detached CPU copies in ``dtype`` (None keeps the factors' dtype); α stays float32 whatever
        ``dtype`` is, so the merge scale is the bypass scale exactly.
        """
        sd = {}
        for name, pair in self._pairs.items():
            sd[_key(self.key_prefix, name, "lora_up.weight")] = _cpu_copy(pair.up, dtype)
            sd[_key(self.key_prefix, name, "lora_down.weight")] = _cpu_copy(pair.down, dtype)
            sd[_key(self.key_prefix, name, "alpha")] = torch.tensor(self._alphas[name], dtype=torch.float32)
        return sd

    def load(self, sd: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export` (resume): strict key and shape check (ValueError naming the keys).
        A file's α replaces this module's α, so the loaded LoRA acts exactly as it did when saved."""
        expected = {}
        for name, pair in self._pairs.items():
            expected[_key(self.key_prefix, name, "lora_up.weight")] = (name, "up", pair.up.shape)
            expected[_key(self.key_prefix, name, "lora_down.weight")] = (name, "down", pair.down.shape)
            expected[_key(self.key_prefix, name, "alpha")] = (name, "alpha", torch.Size([]))
        _check_keys(sd.keys(), expected.keys(), "LoraAdapters.load")
        for key, (_, _, shape) in expected.items():
            t = sd[key]
            if shape == torch.Size([]):
                if t.numel() != 1:
                    raise ValueError(f"'{key}': alpha must be a scalar, got shape {tuple(t.shape)}")
            else:
                _check_shape(key, t, shape)
        with torch.inference_mode(False), torch.no_grad():
            for key, (name, part, _) in expected.items():
                pair = self._pairs[name]
                if part == "alpha":
                    a = float(sd[key].detach().float().reshape(()).item())
                    self._alphas[name] = a
                    pair.scale = a / self.rank
                else:
                    getattr(pair, part).copy_(sd[key])


# ------------------------------------------------------------------------------------------------ full

class FullAdapters(_AdaptersBase):
    """Full fine-tune on cloned parameters.

    Trains copies ``θ'_p`` (in ``dtype``, on ``device`` or the parameter's own) of every floating
    parameter owned directly by a module that passes ``include`` (default: all). The forward is::

        y = functional_call(root, {p: θ'_p}, args, kwargs)

    so the shared module's tensors are never written; the masters are cast to each base parameter's dtype
    on the way in (differentiably) unless autocast is on, so an fp16 UNet keeps running in fp16.

    Differences are taken against a snapshot ``θ_p`` made at construction (``snapshot_device``, default
    CPU, base dtype): the host may replace or merge patches into the shared tensors later, and the diff
    must stay relative to the model this fine-tune started from::

        Δ_p = θ'_p - θ_p      (float32, float64 if the masters are float64)

    Caveat: ``functional_call`` swaps the tensors in only for the duration of the call. Gradient
    checkpointing must therefore wrap the whole call (``checkpoint(adapters, …)``); a checkpoint placed
    inside root recomputes during backward, after the swap is undone, with the base tensors: torch
    raises ``CheckpointError`` (saved-tensor count differs; seen with a frozen base) or, where the counts
    happen to match, the gradients are silently wrong. On a root nobody else uses (a private copy),
    :meth:`installed` puts the trained tensors into the modules themselves, which checkpointing respects.
    """

    def __init__(self, root: nn.Module, dtype: torch.dtype = torch.float32, device=None,
                 include: Include | None = None, key_prefix: str = "diffusion_model.",
                 snapshot_device="cpu"):
        self.root = root
        self.dtype = dtype
        self.key_prefix = key_prefix
        self._masters: dict[str, nn.Parameter] = {}
        self._snapshot: dict[str, torch.Tensor] = {}
        self._base_dtype: dict[str, torch.dtype] = {}
        self._export_key: dict[str, str] = {}
        seen: set[int] = set()
        with torch.inference_mode(False), torch.no_grad():
            for mod_name, mod in root.named_modules():
                if include is not None and not include(mod_name, mod):
                    continue
                own = dict(mod.named_parameters(recurse=False))
                for pname, p in own.items():
                    # Tied parameters are trained once; functional_call(tie_weights=True) feeds every alias.
                    if not p.is_floating_point() or id(p) in seen:
                        continue
                    seen.add(id(p))
                    full = f"{mod_name}.{pname}" if mod_name else pname
                    self._masters[full] = nn.Parameter(
                        p.detach().to(device=device if device is not None else p.device, dtype=dtype, copy=True))
                    self._snapshot[full] = p.detach().to(
                        device=snapshot_device if snapshot_device is not None else p.device, copy=True)
                    self._base_dtype[full] = p.dtype
                    # ComfyUI's load_lora: "{module}.diff" patches .weight, "{module}.diff_b" its .bias,
                    # "{key}.diff" any other parameter key (its generic non-.weight mapping).
                    if pname == "weight":
                        ek = _key(key_prefix, mod_name, "diff")
                    elif pname == "bias" and isinstance(own.get("weight"), torch.Tensor):
                        ek = _key(key_prefix, mod_name, "diff_b")
                    else:
                        ek = _key(key_prefix, full, "diff")
                    self._export_key[full] = ek
        if not self._masters:
            raise ValueError("FullAdapters: no floating parameter under root passed `include`")
        _warn_if_base_trainable(root)

    @property
    def names(self) -> list[str]:
        """Qualified names (under root) of the trained parameters."""
        return list(self._masters)

    def parameters(self) -> list[nn.Parameter]:
        return list(self._masters.values())

    def _named_trainables(self) -> dict[str, nn.Parameter]:
        return dict(self._masters)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "FullAdapters":
        """Move/cast the masters in place (Parameter objects kept, so optimizers stay valid)."""
        with torch.no_grad():
            for p in self._masters.values():
                p.data = p.data.to(device=device, dtype=dtype)
        if dtype is not None:
            self.dtype = dtype
        return self

    @contextlib.contextmanager
    def installed(self) -> Iterator["FullAdapters"]:
        """Put the trained copies into root's own modules for the duration (and the originals back on
        exit), so that calling root directly uses them, also when a checkpoint inside root recomputes
        in backward. Only for a root nobody else uses meanwhile (e.g. a private copy of the model)."""
        if getattr(self, "_sharded", False):  # installed for good by shard()
            yield self
            return
        originals = []
        try:
            for full, master in self._masters.items():
                mod_name, _, pname = full.rpartition(".")
                mod = self.root.get_submodule(mod_name) if mod_name else self.root
                originals.append((mod, pname, mod._parameters[pname]))
                mod._parameters[pname] = master
            self._installed = True
            yield self
        finally:
            for mod, pname, original in reversed(originals):
                mod._parameters[pname] = original
            self._installed = False

    def shard(self, dist, blocks, compute_dtype: torch.dtype) -> nn.Module:
        """Train sharded over ``dist``'s ranks (FSDP2; :meth:`DistributedContext.fully_shard
        <d2f_core.training.distributed.DistributedContext.fully_shard>`), for good: the masters are installed in
        root's modules (root must be a private copy nobody else uses), the base tensors they replace are let go
        (with nothing else holding them their device memory is freed: the base weights are the snapshot's), and
        ``blocks`` then root are sharded. The masters become the DTensor parameters FSDP registers, so
        :meth:`parameters` is what the optimizer steps; calls run root itself, whose FSDP hooks gather each
        block's weights in ``compute_dtype``. Exports, :meth:`state_tensors` and :meth:`load` see whole tensors
        (gathers and scatters every rank makes alike). Returns the sharded root (the Trainer's ``sharded``).

        The masters should be on the CPU here (``device="cpu"``): FSDP moves each to the ranks' device as it
        shards it, so no device ever holds all of them."""
        for full, master in self._masters.items():
            mod_name, _, pname = full.rpartition(".")
            mod = self.root.get_submodule(mod_name) if mod_name else self.root
            mod._parameters[pname] = master
        root = dist.fully_shard(self.root, blocks, compute_dtype)
        for full in self._masters:
            mod_name, _, pname = full.rpartition(".")
            mod = self.root.get_submodule(mod_name) if mod_name else self.root
            self._masters[full] = mod._parameters[pname]
        self._installed = True
        self._sharded = True
        return root

    def __call__(self, *args, **kwargs):
        """``functional_call(root, trained, args, kwargs)`` (a plain call of root while ``installed``)."""
        if getattr(self, "_installed", False):
            return self.root(*args, **kwargs)
        params = {}
        for name, m in self._masters.items():
            params[name] = m if _autocast_enabled(m.device.type) else m.to(self._base_dtype[name])
        return torch.func.functional_call(self.root, params, args, kwargs, tie_weights=True, strict=False)

    def _diffs(self) -> dict[str, torch.Tensor]:
        out = {}
        with torch.no_grad():
            for name, m in self._masters.items():
                snap = self._snapshot[name]
                ct = torch.promote_types(torch.float32, m.dtype)
                # sharded (FSDP): gathered whole on every rank (a collective), one tensor at a time
                out[name] = full_tensor(m.detach()).to(snap.device, ct) - snap.to(ct)
        return out

    def export(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``LORA_MODEL``-style weight diffs, CPU, ``dtype`` (None keeps float32)::

            {prefix}{module}.diff    Δ of module.weight
            {prefix}{module}.diff_b  Δ of module.bias
            {prefix}{param}.diff     Δ of any other parameter
        """
        return {self._export_key[name]: _cpu_copy(d, dtype) for name, d in self._diffs().items()}

    def patches(self, dtype: torch.dtype | None = None) -> dict[str, tuple]:
        """``ModelPatcher.add_patches`` input: ``{f"{prefix}{param}": ("diff", (Δ,))}``, Δ on CPU."""
        return {_key(self.key_prefix, name): ("diff", (_cpu_copy(d, dtype),))
                for name, d in self._diffs().items()}

    def load(self, sd: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export` (resume): θ' = θ + Δ; strict key and shape check (ValueError)."""
        by_key = {ek: name for name, ek in self._export_key.items()}
        _check_keys(sd.keys(), by_key.keys(), "FullAdapters.load")
        for ek, name in by_key.items():
            _check_shape(ek, sd[ek], self._masters[name].shape)
        with torch.inference_mode(False), torch.no_grad():
            for ek, name in by_key.items():
                m, snap = self._masters[name], self._snapshot[name]
                ct = torch.promote_types(torch.float32, m.dtype)
                copy_into(m, snap.to(ct) + sd[ek].to(snap.device, ct))  # sharded: this rank's rows
