"""Memory pre-flight: a training run's peak GPU memory, estimated before anything big is loaded.

Everything here is arithmetic on counts read from the module tree (no tensor is allocated, no device is
touched) and a few per-family constants calibrated against measured peaks. Notation (bytes unless said):

    N     parameters of the network            s_w   bytes per weight/activation element in the training
    P     trained parameters (LoRA: Σ_targets r·(fan_in + fan_out); full: N)     dtype (bf16 2, fp32 4)
    b     batch size per process               HW_k  latent pixels of resolution bucket k
    s_ld  bytes per weight as the host loaded the model (its stored dtype: fp16 2, fp32 4, …)

Training peak (the sum of what lives on the device while the largest step runs)::

    M_train = W + S + K + D + A + C
    W = N·s_w                                the private copy, cast to the training dtype
    S = P·(4 + 4 + k_opt + s_ema) + 4P·g + 4P·[world > 1] + 2·(4P + P·s_ema)·[lora]
        4 master/factor (fp32) + 4 persistent gradient + optimizer states (k_opt = 8 for Adam/AdamW's m, v;
        4 for SGD momentum) + the EMA (s_ema = 0 off, 4 fp32, s_w "training"), + the static gradient outputs of
        each captured CUDA graph (g = graphs held, ≤ 4, one per bucket shape; 0 without CUDA graphs: D2FTrain
        replays them only for LoRA without checkpointing, compile or DDP) + DDP's
        gradient buckets; LoRA also keeps its two NaN-recovery snapshots on the device (full mode keeps them in
        host memory).
    K = s_w·N                 (full, bf16 autocast, checkpointing off: every weight's bf16 copy is saved for
        s_w·(N_out + N_blk)   backward;  checkpointing on: only those outside the checkpointed blocks, N_out,
        0                     and one block's, N_blk = the largest, during its recomputation; LoRA / fp32: none)
    D = Σ_k n_k·(C·HW_k·4·(1 + [couplings]) + cond_k·s_w)     the dataset, kept on the device (fp32 latents
        and Reflow noise, conditioning in the training dtype)
    A = Σ_{k ∈ graphed} A_k + max_{k ∉ graphed} A_k          activations: every captured CUDA graph keeps its own
        memory pool, as large as its step's activations; without CUDA graphs (or on the CPU) A = max_k A_k
    A_k = b·HW_k·(α_fam(ckpt)·f_mode·s_w/2 + r·s_w·τ·γ) + b·r·s_w·L_ctx·T_ctx·γ
        α_fam(ckpt)  bytes per latent pixel per sample (bf16) of the family's LoRA-on-attention step, with or
                     without gradient checkpointing (the calibrated constants, table below)
        f_mode       1 for LoRA on the attention layers; F_ALL for LoRA on every layer (each adapted layer saves
                     its input); F_FULL_OFF / F_FULL_ON for a full fine-tune (every layer saves its input and, under
                     autocast, the norms' float32 outputs)
        τ            Σ over adapted layers of tokens per latent pixel (1/4 per UNet level below the first), for
                     the rank-r intermediate each adapted layer saves; L_ctx adapted layers read the T_ctx context
                     tokens instead (cross-attention keys/values); γ = α_fam(on)/α_fam(off) with checkpointing
    C = C_OVERHEAD            library workspaces (cuBLAS/cuDNN), CUDA-graph static inputs, loss and optimizer
                              temporaries: a constant

Peak of the run: ``M = max(M_train, N·s_ld + C)`` (the private copy as loaded, before its cast).

Sharded full fine-tune (FSDP over n ranks, per rank; not yet calibrated against a measured multi-GPU peak)::

    W = s_w·(N_out + 2·N_blk)       the parameters outside the sharded blocks, whole for the step, and two blocks
                                    (the one computed, the next prefetched), gathered in the training dtype
    S = P·(4 + 4 + k_opt + s_ema)/n + 4P·[grad_accumulation > 1]      shards of masters, gradients, moments, EMA;
                                    accumulating micro-batches keep whole float32 gradients until the last
    K = 0                           (autograd saves the gathered training-dtype weights, already in W)

so a full fine-tune of N = P parameters needs about (16 + s_ema)·P/n + W + D + A + C: ``sharding = auto`` picks
it when the replicated run does not fit and this does.

Calibration (peaks are torch's max_memory_allocated over whole D2FTrain runs of bench/bench_train.py in
bench/results, random-weight real-architecture UNets, LoRA rank 16 on the attention layers unless said, bf16,
CUDA graphs on, one bucket, NVIDIA H200 unless said; SD1.5 at 512 px = 64×64 latents, SDXL at 1024 px = 128×128;
N = 859.5 M / 2567.5 M, P = 6.78 M / 42.56 M). ``python bench/bench_memory.py --history`` reprints this table:

    file (commit)                             setting                  measured  estimated  error
    train_h200_sd15_eager_bs8_16 (17404f6)    SD1.5 bs8  ckpt off          9.12      9.45    +3.7%
                                              SD1.5 bs16 ckpt off         16.58     16.87    +1.8%
    train_like_for_like_h100 (9b21b0d), H100  SD1.5 bs1  ckpt off          3.78      2.96   -21.7%  (*)
                                              SD1.5 bs4  ckpt off          6.90      5.74   -16.8%  (*)
                                              SD1.5 bs1  ckpt off, all     3.54      3.36    -5.2%
                                              SD1.5 bs4  ckpt off, all     7.11      6.53    -8.0%
    train_h200_run2 (063a821)                 SD1.5 bs1  ckpt on           2.00      2.24   +11.9%
                                              SD1.5 bs4  ckpt on           2.79      2.88    +3.0%
                                              SD1.5 bs8  ckpt on           4.46      3.72   -16.6%  (*)
                                              SD1.5 bs1  ckpt off          2.87      2.96    +3.0%
                                              SD1.5 bs4  ckpt off          7.38      5.74   -22.2%  (*)
                                              SD1.5 bs8  ckpt off         11.14      9.45   -15.2%  (*)
    train_h200_sd15 (a736957)                 SD1.5 bs1  ckpt on           2.00      2.24   +11.9%
                                              SD1.5 bs4  ckpt on           2.69      2.88    +6.9%
                                              SD1.5 bs8  ckpt on           3.49      3.72    +6.7%
                                              SD1.5 bs1  ckpt off          4.52      2.96   -34.5%  (*)
                                              SD1.5 bs4  ckpt off          7.38      5.74   -22.2%  (*)
                                              SD1.5 bs8  ckpt off         11.14      9.45   -15.2%  (*)
    train_h200_sd15_compiled_ckpt_on (4764ec2) SD1.5 bs8 ckpt on, compiled 3.35      3.72   +11.3%
    train_h200_lora_sdxl (46be3fb)            SDXL  bs1  ckpt on           6.70      6.96    +3.9%
                                              SDXL  bs4  ckpt on           9.16      9.40    +2.6%
    train_h200_sdxl (a736957)                 SDXL  bs1  ckpt off         12.05     12.52    +4.0%
                                              SDXL  bs4  ckpt off         31.31     31.65    +1.1%
    train_h200_run2 (063a821)                 SDXL  bs1  ckpt off         17.38     12.52   -27.9%  (*)
                                              SDXL  bs4  ckpt off         36.45     31.65   -13.2%  (*)
    train_h200_full_sd15 (46be3fb)            SD1.5 full bs1 ckpt on      18.01     18.29    +1.5%
                                              SD1.5 full bs4 ckpt on      31.44     18.98   -39.6%  (**)
    train_h200_full_sdxl (46be3fb)            SDXL  full bs1 ckpt on      53.68     54.46    +1.5%

18 of 28 points within 15%. (*) These runs carry a constant on top of the batch-proportional term, present in
some runs and absent from others of the same settings (SD1.5 ckpt off bs1: 2.87 GiB in one run, 4.52 in another;
SDXL ckpt off bs1: 12.05 vs 17.38): about 1.9 GiB for SD1.5 and 5.3 GiB for SDXL on the H200 (≈ 1.1 × the bf16
weights, both), 1.1–1.4 GiB for SD1.5 on the H100, nearly always with checkpointing off, and its batch slope is
the model's (SD1.5: 0.93–0.95 GiB per sample in every series). It is not in the model: the recorded peaks cannot
tell what it is (older code; a capture that fell back to eager in some runs, or a library workspace taken when
memory is plentiful, would both look like this). (**) Unexplained: 13.4 GiB more than bs1 for 3 more samples,
18× the LoRA runs' per-sample cost with the same checkpointing; measured when checkpointed blocks were still
captured in CUDA graphs, whose recomputation inside a capture fails (aa9a52a: D2FTrain now runs those eagerly) —
a capture that failed part-way and kept its pool would look like this. bench/bench_memory.py re-measures these
settings on the current code, step by step (where the peak happens, what stays held), and prints the constants
that fit them; the full fine-tune without checkpointing (F_FULL_OFF) has no recorded point at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch
from torch import nn

GiB = 2 ** 30
MiB = 2 ** 20


class MemoryPreflightError(RuntimeError):
    """A run whose estimated peak memory exceeds what its device has: refused before anything is loaded."""


# --- calibrated constants (see the module docstring) ----------------------------------------------------------
#: α_fam: bytes per latent pixel per sample of a bf16 LoRA-on-attention step, (checkpointing off, on). SD1.5:
#: the ckpt-off batch slope 0.93 GiB/sample at 64×64 (17404f6: (16.58 − 9.12)/8; run2 and a736957 alike),
#: ckpt on 0.22 GiB/sample (run2 bs1→bs4, a736957 bs1→bs8). SDXL: 6.39 / 0.82 GiB per sample at 128×128
#: (a736957 and run2 bs1→bs4 agree within 1%; 46be3fb bs1→bs4 ckpt on). The rank-16 term is taken out.
FAMILY_ACTIVATIONS: dict[str, tuple[float, float]] = {
    "sd15": (241_000.0, 55_000.0),
    "sdxl": (416_000.0, 53_000.0),
}
#: Activation factor of LoRA on every layer vs attention only: the per-sample slopes of the H100 like-for-like
#: table (SD1.5, ckpt off, lora_targets all vs attention: (7.11 − 3.54)/3 vs (6.90 − 3.78)/3 GiB).
F_ALL = 1.14
#: Full fine-tune, checkpointing on: the block inputs it saves are those of a LoRA run; measured at bs1 only
#: (SD1.5, SDXL, 46be3fb). Checkpointing off: not measured yet (every layer saves its input as with F_ALL, and
#: autocast keeps the norms' outputs in float32): a deliberate over-estimate until bench_memory measures it.
F_FULL_ON = 1.1
F_FULL_OFF = 1.6
#: Workspaces, graph static inputs, loss and optimizer temporaries.
C_OVERHEAD = 0.25 * GiB
#: ComfyUI's models by config class name → family whose constants apply, and whether they were measured on it.
HOST_FAMILIES: dict[str, tuple[str, bool]] = {
    "SD15": ("sd15", True), "SD15_instructpix2pix": ("sd15", False), "SD20": ("sd15", False),
    "SD21UnclipL": ("sd15", False), "SD21UnclipH": ("sd15", False), "LotusD": ("sd15", False),
    "SD_X4Upscaler": ("sd15", False),
    "SDXL": ("sdxl", True), "SDXLRefiner": ("sdxl", False), "SSD1B": ("sdxl", False), "Segmind_Vega": ("sdxl", False),
    "KOALA_700M": ("sdxl", False), "KOALA_1B": ("sdxl", False), "SDXL_instructpix2pix": ("sdxl", False),
}
#: Families without constants of their own use the larger (SDXL's) per-pixel costs.
FALLBACK_FAMILY = "sdxl"
#: Optimizer state bytes per trained parameter.
OPTIMIZER_BYTES = {"adamw": 8, "adam": 8, "sgd": 4}
#: CUDA graphs captured at most (``GraphedNet.max_graphs``); later bucket shapes run eagerly.
MAX_GRAPHS = 4


def family_of(config_class_names: Iterable[str]) -> tuple[str, bool, str]:
    """(family, calibrated, the host class it was recognised by) for a host model config, given the names of
    its class and bases (most derived first). Unknown models get :data:`FALLBACK_FAMILY`, not calibrated."""
    names = list(config_class_names)
    for name in names:
        if name in HOST_FAMILIES:
            family, measured = HOST_FAMILIES[name]
            return family, measured and name == names[0], name
    return FALLBACK_FAMILY, False, names[0] if names else "unknown"


# --- what the module tree tells ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetworkFacts:
    """Counts read from the network's module tree (no device work): see :func:`network_facts`. The LoRA
    counts are per unit of rank (the LoRA of rank r has r times as many) for one choice of targets."""
    params: int                 # N
    stored_bytes: int           # Σ numel·element_size as loaded (the private copy before its cast)
    outside_blocks: int = 0     # N_out: parameters outside the checkpointed blocks
    largest_block: int = 0      # N_blk
    lora_params: int = 0        # P / r
    lora_tokens: float = 0.0    # τ: Σ over adapted layers of tokens per latent pixel
    lora_context_layers: int = 0  # L_ctx: adapted layers fed by the context


def _lora_targets(root: nn.Module, include: Callable[[str, nn.Module], bool] | None):
    """The modules :class:`~d2f_core.training.adapters.LoraAdapters` adapts, by the same rules."""
    never_called = {f"{n}.out_proj" if n else "out_proj" for n, m in root.named_modules()
                    if isinstance(m, nn.MultiheadAttention)}
    for name, m in root.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or (include is not None and not include(name, m)):
            continue
        if name in never_called or (isinstance(m, nn.Conv2d) and m.groups != 1):
            continue
        yield name, m


def lora_parameter_count(root: nn.Module, rank: int, include=None) -> int:
    """P of ``LoraAdapters(root, rank, include=include)``: r·(in·kh·kw + out) per conv, r·(in + out) per linear."""
    total = 0
    for _, m in _lora_targets(root, include):
        if isinstance(m, nn.Conv2d):
            total += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
        else:
            total += rank * (m.in_features + m.out_features)
    return total


def token_fractions(root: nn.Module) -> dict[str, float]:
    """Tokens per latent pixel of each module under a UNet (``input_blocks`` / ``middle_block`` /
    ``output_blocks``, as SD's): 1 at the first level, ¼ below each ``Downsample`` and ×4 after each
    ``Upsample``. Other networks: {} (every module then counts as one token per latent pixel)."""
    if not all(hasattr(root, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        return {}
    out: dict[str, float] = {}
    scale = 1.0

    def mark(prefix: str, block: nn.Module, s: float):
        for name, _ in block.named_modules():
            out[f"{prefix}.{name}" if name else prefix] = s

    def has(block: nn.Module, kind: str) -> bool:
        return any(type(m).__name__ == kind for m in block.modules())

    for i, block in enumerate(root.input_blocks):
        mark(f"input_blocks.{i}", block, scale)
        if has(block, "Downsample"):
            scale /= 4.0
    mark("middle_block", root.middle_block, scale)
    for i, block in enumerate(root.output_blocks):
        mark(f"output_blocks.{i}", block, scale)
        if has(block, "Upsample"):
            scale *= 4.0
    return out


def is_context_layer(name: str) -> bool:
    """Cross-attention keys/values: they read the prompt's tokens, not the image's."""
    return name.endswith(("attn2.to_k", "attn2.to_v"))


def network_facts(root: nn.Module, blocks: Iterable[nn.Module] = (), include=None) -> NetworkFacts:
    """Counts of ``root`` for :func:`estimate`: parameters (and their stored bytes), those outside the
    checkpointable ``blocks`` and the largest block's, and per unit of rank the LoRA on the modules ``include``
    keeps (None: all): its parameters and where its adapted layers sit."""
    params = stored = 0
    for p in root.parameters():
        if p.is_floating_point():
            params += p.numel()
            stored += p.numel() * p.element_size()
    sizes = [sum(p.numel() for p in b.parameters() if p.is_floating_point()) for b in blocks]
    fractions = token_fractions(root)
    tokens = 0.0
    context_layers = 0
    for name, _ in _lora_targets(root, include):
        if is_context_layer(name):
            context_layers += 1
        else:
            tokens += fractions.get(name, 1.0)
    return NetworkFacts(params=params, stored_bytes=stored, outside_blocks=params - sum(sizes),
                        largest_block=max(sizes, default=0), lora_params=lora_parameter_count(root, 1, include),
                        lora_tokens=tokens, lora_context_layers=context_layers)


def data_bytes(buckets, cond_bytes: int) -> tuple[int, list[tuple[int, int]]]:
    """Device bytes of the training data (``LatentBuckets``: fp32 latents and Reflow noise, conditioning at
    ``cond_bytes`` per element) and each bucket's latent (height, width). ``buckets``: (latents (N, C, H, W),
    per-sample conditioning dicts, [noise]) tuples, as D2FTrain assembles them."""
    total = 0
    shapes = []
    for bucket in buckets:
        latents, conds = bucket[0], bucket[1]
        total += latents.numel() * 4
        if len(bucket) > 2 and bucket[2] is not None:
            total += bucket[2].numel() * 4
        items = conds.values() if isinstance(conds, dict) else (v for c in conds for v in c.values())
        total += sum(v.numel() for v in items if isinstance(v, torch.Tensor)) * cond_bytes
        if latents.shape[0] > 0:
            shapes.append((int(latents.shape[-2]), int(latents.shape[-1])))
    return total, shapes


# --- the estimate -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSettings:
    """What of a run's settings memory depends on."""
    mode: str = "lora"                      # lora | full
    rank: int = 16                          # LoRA rank
    batch_size: int = 1                     # per process
    shapes: tuple[tuple[int, int], ...] = ((64, 64),)  # latent (H, W) of each bucket
    checkpointing: bool = False
    weight_bytes: int = 2                   # s_w: 2 bf16, 4 fp32
    lora_targets: str = "attention"         # attention | all
    optimizer: str = "adamw"
    ema_bytes: int = 0                      # 0: no EMA, 4: fp32, else the training dtype's
    cuda_graphs: bool = True                # only on a CUDA device
    graphs_with_checkpointing: bool = False # whether they also replay with checkpointing on (D2FTrain: no)
    world_size: int = 1
    sharded: bool = False                   # full mode under FSDP over world_size ranks
    grad_accumulation: int = 1
    data_bytes: int = 0
    context_tokens: int = 77


@dataclass(frozen=True)
class MemoryEstimate:
    terms: dict = field(default_factory=dict)  # name → bytes (the training peak's parts)
    load_peak: int = 0
    stored_bytes: int = 0                      # the private copy as loaded
    family: str = ""
    calibrated: bool = True

    @property
    def train_peak(self) -> int:
        return int(sum(self.terms.values()))

    @property
    def total(self) -> int:
        return max(self.train_peak, self.load_peak)

    def describe(self) -> str:
        """'12.3 GiB (weights 4.8, …)': the peak and its parts in GiB."""
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.terms.items() if v >= 0.005 * GiB)
        return f"{self.total / GiB:.1f} GiB ({parts})"


def activation_bytes(facts: NetworkFacts, s: RunSettings, family: str, hw: int) -> float:
    """A_k of one bucket of ``hw`` latent pixels (see the module docstring)."""
    a_off, a_on = FAMILY_ACTIVATIONS[family]
    alpha = a_on if s.checkpointing else a_off
    gamma = a_on / a_off if s.checkpointing else 1.0
    if s.mode == "full":
        f_mode = F_FULL_ON if s.checkpointing else F_FULL_OFF
    else:
        f_mode = F_ALL if s.lora_targets == "all" else 1.0
    per_pixel = alpha * f_mode * s.weight_bytes / 2.0
    rank_term = 0.0
    if s.mode == "lora":
        rank_term = s.weight_bytes * gamma * s.rank * (facts.lora_tokens * hw
                                                        + facts.lora_context_layers * s.context_tokens)
    return s.batch_size * (hw * per_pixel + rank_term)


def estimate(facts: NetworkFacts, s: RunSettings, family: str = FALLBACK_FAMILY, calibrated: bool = True) -> MemoryEstimate:
    """The peak GPU memory of a run (bytes, with its parts): the model of the module docstring."""
    if s.mode not in ("lora", "full"):
        raise ValueError(f"mode must be lora or full, got {s.mode!r}")
    if family not in FAMILY_ACTIVATIONS:
        family, calibrated = FALLBACK_FAMILY, False
    lora = s.mode == "lora"
    P = facts.lora_params * s.rank if lora else facts.params
    shapes = sorted({(int(h), int(w)) for h, w in s.shapes} or {(64, 64)}, key=lambda t: -t[0] * t[1])
    replay = s.cuda_graphs and (s.graphs_with_checkpointing or not s.checkpointing)
    graphs = min(len(shapes), MAX_GRAPHS) if replay else 0
    acts = [activation_bytes(facts, s, family, h * w) for h, w in shapes]
    activations = sum(acts[:graphs]) + max(acts[graphs:], default=0.0)
    ema = P * s.ema_bytes
    autocast = not lora and s.weight_bytes < 4
    casts = 0
    if autocast:
        casts = s.weight_bytes * (facts.outside_blocks + facts.largest_block if s.checkpointing else facts.params)
    if s.sharded and not lora and s.world_size > 1:
        # FSDP (see the module docstring's sharded terms): masters, gradients, moments and EMA split over the ranks;
        # of the weights only the blocks being computed are whole (the parameters outside the blocks for the whole
        # step, the current block and the next one prefetched), gathered in the training dtype, which is also what
        # autograd saves: no separate casts. Accumulating micro-batches hold whole float32 gradients until the
        # last one reduce-scatters them.
        n = s.world_size
        terms = {
            "weights": s.weight_bytes * (facts.outside_blocks + 2 * facts.largest_block),
            "trained": 4 * P / n,
            "gradients": 4 * P / n + (4 * P if s.grad_accumulation > 1 else 0),
            "optimizer": OPTIMIZER_BYTES.get(s.optimizer, 8) * P / n,
            "ema": ema / n,
            "snapshots": 0,
            "weight casts": 0,
            "data": s.data_bytes,
            "activations": int(activations),
            "overhead": int(C_OVERHEAD),
        }
        return MemoryEstimate(terms={k: int(v) for k, v in terms.items()},
                              load_peak=int(facts.stored_bytes + C_OVERHEAD), stored_bytes=int(facts.stored_bytes),
                              family=family, calibrated=calibrated)
    terms = {
        "weights": facts.params * s.weight_bytes,
        "trained": 4 * P,
        "gradients": 4 * P * (1 + graphs + (1 if s.world_size > 1 else 0)),
        "optimizer": OPTIMIZER_BYTES.get(s.optimizer, 8) * P,
        "ema": ema,
        "snapshots": 2 * (4 * P + ema) if lora else 0,
        "weight casts": casts,
        "data": s.data_bytes,
        "activations": int(activations),
        "overhead": int(C_OVERHEAD),
    }
    return MemoryEstimate(terms={k: int(v) for k, v in terms.items()}, load_peak=int(facts.stored_bytes + C_OVERHEAD),
                          stored_bytes=int(facts.stored_bytes), family=family, calibrated=calibrated)


# --- the decision -----------------------------------------------------------------------------------------------
#: ``fits``: the estimate plus this share of it plus RESERVE must be free (the estimate is good to ~15%).
SAFETY = 0.15
RESERVE = 256 * MiB
CHECKPOINTING_CHOICES = ("auto", "on", "off")


def checkpointing_choice(value) -> str:
    """The gradient_checkpointing input as one of auto/on/off; saved workflows of earlier versions hold a
    boolean (True → on, False → off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.strip().lower() in CHECKPOINTING_CHOICES:
        return value.strip().lower()
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # a boolean gone through text
        return "on" if value.strip().lower() == "true" else "off"
    raise ValueError(f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING_CHOICES)} "
                     f"(or a saved workflow's true/false), got {value!r}")


def fits(required: int, available: int | None) -> bool:
    """Whether ``required`` bytes fit in ``available`` with the safety margin (None: no known limit)."""
    return available is None or required * (1 + SAFETY) + RESERVE <= available


@dataclass
class Preflight:
    """The outcome of :func:`preflight`: the checkpointing to use, the estimates, and why."""
    checkpointing: bool
    choice: str
    estimate: MemoryEstimate           # of the run as it will go
    without: MemoryEstimate            # checkpointing off
    with_: MemoryEstimate              # checkpointing on
    available: int | None
    refusal: str | None = None         # the message when the run cannot fit
    sharding: str = "ddp"              # ddp (replicated) | fsdp: set by the host's choice (nodes/memory_check.plan)

    @property
    def memory_required(self) -> int:
        """Bytes the run needs beyond the loaded copy of the model (what a host asked to load the model should
        keep free for the training that follows)."""
        return max(0, self.estimate.total - self.estimate.stored_bytes)

    def summary(self) -> str:
        where = "no device limit known" if self.available is None else f"{self.available / GiB:.1f} GiB available"
        note = "" if self.estimate.calibrated else f" (family {self.estimate.family}'s constants, not measured on this model)"
        return (f"memory estimate {self.estimate.describe()}{note}; {where}; gradient checkpointing "
                f"{'on' if self.checkpointing else 'off'} ({self.choice}; off {self.without.total / GiB:.1f} GiB, "
                f"on {self.with_.total / GiB:.1f} GiB)")


def preflight(facts_for: Callable[[str], NetworkFacts], settings: RunSettings, choice: str,
              available: int | None, family: str = FALLBACK_FAMILY, calibrated: bool = True) -> Preflight:
    """Decide gradient checkpointing and whether the run can fit.

    ``facts_for(lora_targets)`` gives the network's counts (:func:`network_facts`) for a choice of LoRA targets;
    ``choice``: auto | on | off (or a legacy boolean); ``available``: bytes the run may use on its device (None:
    no limit known, e.g. the CPU: nothing is refused and auto means off).

    auto: checkpointing on only when the run without it does not :func:`fits` (estimate + margin). A run is
    refused when its estimate itself exceeds ``available``: with checkpointing when that is on or auto, without
    when it was set off.
    """
    choice = checkpointing_choice(choice)

    def est(**changes) -> MemoryEstimate:
        s = replace(settings, **changes)
        return estimate(facts_for(s.lora_targets), s, family, calibrated)
    off, on = est(checkpointing=False), est(checkpointing=True)
    if choice == "auto":
        ckpt = available is not None and not fits(off.total, available)
    else:
        ckpt = choice == "on"
    chosen = on if ckpt else off
    result = Preflight(ckpt, choice, chosen, off, on, available)
    if available is not None and chosen.total > available:
        result.refusal = refusal_message(result, settings, est, available)
    return result


def _largest(valid: Callable[[int], bool], below: int) -> int | None:
    """The largest n in [1, below) with ``valid(n)`` (valid is monotone: true up to some n), or None."""
    lo, hi = 0, below
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if valid(mid):
            lo = mid
        else:
            hi = mid
    return lo or None


def refusal_message(result: Preflight, s: RunSettings, est: Callable[..., MemoryEstimate], available: int) -> str:
    """Why the run cannot fit, and which lower settings would, each alone (with the run's checkpointing)."""
    ckpt = result.checkpointing
    lines = [f"D2FTrain would need about {result.estimate.describe()} of GPU memory with gradient checkpointing "
             f"{'on' if ckpt else 'off'}, but about {available / GiB:.1f} GiB are available on this device: "
             "stopped before loading the model."]
    ways = []
    if not ckpt and result.with_.total <= available:
        ways.append(f"gradient_checkpointing auto or on (about {result.with_.total / GiB:.1f} GiB)")

    def ok(**changes) -> bool:  # with the checkpointing the run would use
        return est(checkpointing=ckpt, **changes).total <= available
    if s.batch_size > 1:
        b = _largest(lambda n: ok(batch_size=n), s.batch_size)
        if b:
            ways.append(f"batch_size {b} (grad_accumulation keeps the effective batch)")
    if s.shapes:
        h0, w0 = max(s.shapes, key=lambda t: t[0] * t[1])
        k = _largest(lambda k: ok(shapes=tuple((max(1, h * k // 16), max(1, w * k // 16)) for h, w in s.shapes)), 16)
        if k:
            h, w = max(1, h0 * k // 16), max(1, w0 * k // 16)
            ways.append(f"a lower resolution (images up to about {8 * w}×{8 * h} px, latents {w}×{h}; now {w0}×{h0})")
    if s.mode == "lora":
        if s.rank > 1:
            r = _largest(lambda n: ok(rank=n), s.rank)
            if r:
                ways.append(f"rank {r}")
        if s.lora_targets == "all" and ok(lora_targets="attention"):
            ways.append("lora_targets attention")
    else:
        if ok(mode="lora"):
            ways.append("mode lora")
        if s.ema_bytes > 2 and ok(ema_bytes=2):
            ways.append("the EMA in the training dtype")
        elif s.ema_bytes and ok(ema_bytes=0):
            ways.append("no EMA")
    if s.cuda_graphs and ok(cuda_graphs=False):
        ways.append("cuda_graphs off")
    if len(s.shapes) > 1 and ok(shapes=(max(s.shapes, key=lambda t: t[0] * t[1]),)):
        ways.append(f"fewer resolution buckets ({len(s.shapes)} now; each captured CUDA graph keeps its own memory)")
    if ways:
        lines.append("Any one of these would fit: " + "; ".join(ways) + ".")
    else:
        lines.append("No lower setting fits: free GPU memory (other programs, other loaded models) or use a larger GPU.")
    return " ".join(lines)
