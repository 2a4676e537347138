"""``d2f demo``: Diff2Flow end to end on CPU in a few minutes, on data that ships with the package.

1. Data: the 1797 8×8 digits (``datasets.py``), x0 = 2·p/16 - 1 ∈ [-1, 1], resized to ``size``² (16² by default).
2. Two tiny UNets (``tiny_unet.py``) trained from scratch on the **native** discrete objective of the
   Stable Diffusion schedule (``DiscreteSchedule.stable_diffusion()``, T = 1000): n ~ U{0 … 999},

       x_VP = sqrt(ᾱ_n)·x0 + sqrt(1-ᾱ_n)·ε,   loss ‖ε̂ - ε‖²  (ε-model)  or  ‖v̂ - v‖², v = sqrt(ᾱ_n)·ε - sqrt(1-ᾱ_n)·x0.

   Written through the bridge (DESIGN §2) this is σ = φ(ς_n) = ς_n/(1+ς_n), x = (1-σ)·x0 + σ·ε,
   net input x/D(σ) = x_VP, label n(σ) = n, target ``FlowBridge.native_target`` (= ε or v): the
   same numbers up to float32 rounding of σ (label error < 1e-4).
3. Each model is sampled twice from the same noise over the same integer labels n_0 > … > n_{k-1}
   (the host's ``simple`` scheduler, n_i = 999 - ⌊1000·i/k⌋, then the clean state):

   * natively: DDIM (η = 0) in VP coordinates over ᾱ_{n_i}, network label n_i;
   * as a flow model (zero-shot, no training): Euler on dx/dσ = (x - x̂0)/σ over σ_i = φ(ς_{n_i}),
     with x̂0 = ``bridge.denoised``(σ, net(x/D, n(σ)), x).

   Start states are one noise in three coordinates: x_VE = sqrt(1+ς_0²)·ε (the host's full-denoise
   start), x_VP = x_VE/sqrt(1+ς_0²) = ε (DDIM's usual x_T), x_flow = (1-σ_0)·x_VE = D(σ_0)·ε
   (``bridge.start_state`` with max_denoise). DESIGN §2 says the two runs are the same computation, so the
   final samples must agree to float32 error; the demo prints the max |Δ| per model and step count.
4. Fine-tunes of each native model through ``d2f_core.training.trainer.Trainer`` (batch ``batch_size``, cosine LR),
   each sampled with flow Euler on the same grids and noise:

   * **Diff2Flow fine-tune**: ``objective="diff2flow"``, ‖v̂ - (ε - x0)‖² on the training digits;
   * **+ scheduled sampling**: the same fine-tune (same steps, seed and batches) with
     ``TrainConfig.scheduled_sampling`` on: with probability p (linear ramp) the state is where the model's
     own Euler lands after starting up to ``ss_max_offset`` solver steps noisier;
   * **+ Reflow**: the Diff2Flow fine-tune generates ``reflow_pairs`` couplings with its own flow Euler ODE
     (``reflow_solver_steps`` steps), then is trained on them (``LatentBuckets([(x̂0, [{}], ε')])``: the
     Trainer uses the stored noise). The sampler starts at σ_0 = σ_max < 1 from D(σ_0)·ε, so the straight
     path through the start state and x̂0 is x = (1-σ)·x̂0 + σ·ε' with ε' = (D(σ_0)·ε - (1-σ_0)·x̂0)/σ_0
     (≈ ε; training on ε itself is measurably worse at every step count, see ``reflow_couplings``).

5. A few-step quality table: Fréchet distance between generated samples and held-out real digits in a
   fixed feature space, the top-k principal components of the *training* digits' pixels (so the
   space never sees a generated sample); ``d2f_app.metrics``. Also in results.json: the same distance in
   a fixed random-conv feature space. Rows are (model, method), columns step counts.
6. A PNG grid, one labelled row per (model, method, steps), the same noise in every column.

Each phase prints its wall time as it ends, and the run its total (``PhaseClock``): the same demo takes
≈ 4 min on an otherwise idle 2-core machine and more than twice that when other work shares the cores,
so the times say where a slow run went.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from d2f_core.flow.bridge import FlowBridge, flow_sigma
from d2f_core.training.couplings import noise_through_start
from d2f_core.training.data import LatentBuckets
from .datasets import digits_tensor, split_indices
from d2f_core.flow.losses import training_loss
from .metrics import PixelPCAFrechet, RandomConvFrechet, frechet_distance  # noqa: F401  (re-exported)
from .png import image_grid, to_uint8, write_png
from d2f_core.flow.samplers import sample_ddim, sample_euler_flow
from d2f_core.flow.schedule import DiscreteSchedule
from d2f_core.training.scheduled_sampling import ScheduledSampling
from .tiny_unet import TinyUNet, count_parameters
from d2f_core.training.trainer import TrainConfig, Trainer

QUALITY_STEPS = (1, 2, 4, 8, 25, 50)
PREDICTIONS = (("eps", "eps"), ("v", "v_prediction"))  # (short name, FlowBridge prediction)


@dataclass
class DemoConfig:
    """Every knob of the demo; defaults are the measured few-minute run on 2 CPU cores (README)."""

    steps_train: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    ema_decay: float = 0.995
    size: int = 16                     # image side in pixels (the 8×8 digits are resized to size×size)
    channels: tuple = (16, 32, 64)     # TinyUNet width per resolution
    n_samples: int = 256               # generated per (model, sampler, steps); also the FD sample size
    sample_steps: tuple = QUALITY_STEPS
    held_out: float = 0.2              # fraction of the digits never trained on (the FD reference set)
    pca_dim: int = 16
    grid_columns: int = 16
    n_check64: int = 16                # samples re-run in float64 for the exactness check
    seed: int = 0
    threads: int = 2
    # Fine-tune rows (module docstring, step 4); finetune=False leaves the demo as native vs zero-shot only.
    finetune: bool = True
    finetune_steps: int = 100          # Trainer steps of the Diff2Flow fine-tune (and of the +SS one)
    finetune_lr: float = 5e-4          # peak LR, cosine to 0
    ss_probability: float = 0.5        # scheduled sampling: peak rollout probability (linear ramp from 0)
    ss_max_offset: int = 2             # ... rollout length k ~ U{1..k_max} solver steps (of 25 on [σ_min, σ_max])
    reflow_pairs: int = 384            # self-generated couplings (ε', x̂0)
    reflow_solver_steps: int = 25      # flow Euler steps that generate them
    reflow_steps: int = 150            # Trainer steps on the couplings, from the Diff2Flow fine-tune
    reflow_lr: float = 5e-4

    def validate(self) -> "DemoConfig":
        """Raise ValueError with a user-facing message for settings the demo cannot run with."""
        factor = 2 ** (len(self.channels) - 1)
        if self.size < factor or self.size % factor:
            raise ValueError(f"size must be a positive multiple of {factor} (the UNet halves it "
                             f"{len(self.channels) - 1} times), got {self.size}")
        if self.steps_train < 1 or self.batch_size < 1:
            raise ValueError("steps_train and batch_size must be at least 1")
        if self.n_samples < 2:
            raise ValueError("samples must be at least 2 (the Frechet distance needs a covariance)")
        if not self.sample_steps or min(self.sample_steps) < 1:
            raise ValueError(f"sample steps must be positive integers, got {self.sample_steps}")
        if self.finetune and min(self.finetune_steps, self.reflow_steps, self.reflow_solver_steps) < 1:
            raise ValueError("finetune_steps, reflow_steps and reflow_solver_steps must be at least 1")
        if self.finetune and self.reflow_pairs < 2:
            raise ValueError("reflow_pairs must be at least 2")
        return self

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A seconds-long smoke run: barely trained nets, still an exact DDIM ≡ flow-Euler check.

        One thread: on a busy machine (parallel test runners) two OpenMP threads that spin-wait on each
        other ran this 4-5× slower than one (49 s vs 11 s measured); idle, one costs ~2 s more."""
        base = cls(steps_train=40, batch_size=32, warmup=5, n_samples=48, sample_steps=(1, 2, 4, 8), pca_dim=8,
                   grid_columns=8, n_check64=8, threads=1, finetune_steps=5, reflow_pairs=16, reflow_solver_steps=2,
                   reflow_steps=5)
        return replace(base, **overrides)

    @classmethod
    def full(cls, **overrides) -> "DemoConfig":
        """A longer run (roughly 4× the default's training; tens of minutes on 2 cores) for better-trained
        models and lower-variance Fréchet numbers."""
        base = cls(steps_train=3000, n_samples=512, finetune_steps=600, reflow_pairs=2048, reflow_steps=1000)
        return replace(base, **overrides)


# --- progress and phase times ----------------------------------------------------------------------
def progress_bar(total: int, desc: str) -> tqdm:
    """A tqdm bar on stderr, so the results on stdout stay clean to redirect; on a terminal it redraws
    in place, in a log it writes a line at most every few seconds."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=tty, mininterval=0.1 if tty else 5.0,
                leave=True)


class PhaseClock:
    """Wall time per demo phase, logged as each phase ends, and the total since the clock started."""

    def __init__(self, log=print):
        self.log = log
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0
        self.log(f"[time] {name}: {self.seconds[name]:.1f} s")

    def total(self) -> float:
        return time.perf_counter() - self.start


# --- schedule grids --------------------------------------------------------------------------------
def simple_labels(steps: int, timesteps: int = 1000) -> list[int]:
    """The host's ``simple`` scheduler as integer labels: n_i = T-1 - ⌊T·i/k⌋, i = 0 … k-1.

    Every label is a table entry, so native sampling (which rounds to the nearest integer label) is
    exact on it and the comparison with the bridge's fractional label is fair.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    return [timesteps - 1 - int(i * timesteps / steps) for i in range(steps)]


# --- training --------------------------------------------------------------------------------------
def _lr_at(step: int, cfg: DemoConfig) -> float:
    # Linear warm-up then cosine to zero: a short run ends on small steps, which EMA alone does not give.
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps_train - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def train_native(net: TinyUNet, bridge: FlowBridge, x_train: torch.Tensor, cfg: DemoConfig, desc: str,
                 seed: int) -> tuple[TinyUNet, dict]:
    """Native discrete training, written with the bridge (module docstring, step 2). Returns the EMA net."""
    g = torch.Generator().manual_seed(seed)
    table = bridge.schedule.sigmas  # ς_n, float64
    opt_kwargs = {"fused": True} if _fused_adamw_ok() else {}
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0, **opt_kwargs)
    ema = copy.deepcopy(net).requires_grad_(False)
    ema_params, params = list(ema.parameters()), list(net.parameters())
    t0 = time.perf_counter()
    losses = []
    with progress_bar(cfg.steps_train, desc) as bar:
        for step in range(cfg.steps_train):
            idx = torch.randint(0, len(x_train), (cfg.batch_size,), generator=g)
            x0 = x_train[idx]
            noise = torch.randn(x0.shape, generator=g)
            n = torch.randint(0, len(table), (cfg.batch_size,), generator=g)
            sigma = flow_sigma(table[n]).float()
            loss = training_loss(bridge, net, x0, noise, sigma, objective="native").mean()
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # EMA with a warm-up so the average is not dominated by the random init in a short run.
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema_params, params):
                    p_ema.lerp_(p, 1 - decay)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4g}", refresh=False)
            bar.update(1)
    tail = losses[-max(1, len(losses) // 10):]
    return ema, {"seconds": time.perf_counter() - t0, "final_loss": sum(tail) / len(tail), "first_loss": losses[0]}


def _fused_adamw_ok() -> bool:
    # Fused AdamW on CPU exists in recent torch (about 20 % faster here); older builds raise.
    try:
        p = torch.nn.Parameter(torch.zeros(1))
        torch.optim.AdamW([p], fused=True)
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


# --- samplers --------------------------------------------------------------------------------------
@torch.no_grad()
def sample_native_ddim(net, bridge: FlowBridge, noise: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """DDIM (η = 0) in VP coordinates over ᾱ_{n_0} < … < ᾱ_{n_{k-1}} < 1, integer labels.

    A v-model's output is turned into ε̂ by the VP identity ε = sqrt(1-ᾱ)·x_VP + sqrt(ᾱ)·v.
    Starts at x_VP = ε (= x_VE / sqrt(1+ς_0²) for the host's start x_VE = sqrt(1+ς_0²)·ε); returns x0 (ᾱ = 1).
    """
    alphas_bar = bridge.schedule.alphas_bar
    abar = [float(alphas_bar[n]) for n in labels] + [1.0]
    label_of = {a: n for a, n in zip(abar, labels)}  # sample_ddim hands back exactly these floats
    batch = noise.shape[0]

    def eps_model(x_vp, a):
        out = net(x_vp, torch.full((batch,), float(label_of[a])))
        if bridge.prediction == "eps":
            return out
        if bridge.prediction == "v_prediction":
            return (1 - a) ** 0.5 * x_vp + a ** 0.5 * out
        raise ValueError(f"native DDIM here supports eps and v_prediction, not {bridge.prediction}")

    return sample_ddim(eps_model, noise, abar)


@torch.no_grad()
def sample_flow_euler(net, bridge: FlowBridge, noise: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """The same network read as a flow model: Euler over σ_i = φ(ς_{n_i}), then σ = 0.

    x̂0(x, σ) = bridge.denoised(σ, net(x/D(σ), n(σ)), x); start x = (1-σ_0)·sqrt(1+ς_0²)·ε = D(σ_0)·ε,
    the host's full-denoise start in flow coordinates; returns x at σ = 0.
    """
    sigmas = torch.cat([flow_sigma(bridge.schedule.sigmas[labels]), torch.zeros(1, dtype=torch.float64)])

    def denoiser(x, sigma):
        out = net(bridge.model_input(sigma, x), bridge.label(sigma).float())
        return bridge.denoised(sigma, out, x)

    x = bridge.start_state(sigmas[:1], noise, torch.zeros_like(noise), max_denoise=True)
    return sample_euler_flow(denoiser, x, sigmas)


NATIVE, FLOW = "native DDIM", "flow Euler 0-shot"
# (table name, grid tag, sampler): how each native model is sampled; fine-tuned rows are FINETUNE_ROWS below.
SAMPLERS = ((NATIVE, "DDIM", sample_native_ddim), (FLOW, "FLOW", sample_flow_euler))


# Rows of the tables made by fine-tuning, each sampled with flow Euler: (table name, grid tag).
FT_D2F, FT_SS, FT_REFLOW = "Diff2Flow fine-tune", "+ scheduled sampling", "+ Reflow"
FINETUNE_ROWS = ((FT_D2F, "D2F"), (FT_SS, "SS"), (FT_REFLOW, "RF"))
FLOW_EULER = "flow Euler"
REFLOW_RAW = "+ Reflow, ε coupling"  # ablation (bench only): couplings (x̂0, ε) instead of (x̂0, ε')


# --- fine-tuning through the training engine -------------------------------------------------------
def unconditional_data(x0: torch.Tensor, noise: torch.Tensor | None = None) -> LatentBuckets:
    """One bucket for an unconditional net: every image gets the empty conditioning dict (the Trainer
    then calls ``net(x_in, label)`` with no keyword), and with ``noise`` it is a Reflow coupling set."""
    return LatentBuckets([(x0, [{}]) if noise is None else (x0, [{}], noise)])


def finetune(net, bridge: FlowBridge, data: LatentBuckets, config: TrainConfig, desc: str,
             on_eval=None, eval_every: int = 0) -> tuple[TinyUNet, dict]:
    """Train a copy of ``net`` with ``d2f_core.training.trainer.Trainer``; returns (the trained copy, stats).

    ``on_eval(step, net)`` runs every ``eval_every`` steps (the Trainer's preview hook) on the net being
    trained: sample from it there, under no_grad, and leave its weights alone.
    """
    net = copy.deepcopy(net).train().requires_grad_(True)
    trainer = Trainer(net, bridge, list(net.parameters()), data, config)
    with progress_bar(config.steps, desc) as bar:
        def progress(step, losses, _rate):
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4g}", refresh=False)
            bar.update(len(losses))
        result = trainer.run(on_progress=progress, preview_every=eval_every if on_eval else 0,
                             on_preview=(lambda step: on_eval(step, net)) if on_eval else None)
    net.eval().requires_grad_(False)
    tail = result.losses[-max(1, len(result.losses) // 10):]
    return net, {"seconds": result.seconds, "steps": result.step, "first_loss": result.losses[0],
                 "final_loss": sum(tail) / len(tail)}


def finetune_config(cfg: DemoConfig, seed: int, **overrides) -> TrainConfig:
    """The Trainer settings of the demo's Diff2Flow fine-tune (cosine LR from ``finetune_lr``, batch
    ``batch_size``, gradient clipping at 1, uniform flow time on [σ_min, σ_max])."""
    base = TrainConfig(steps=cfg.finetune_steps, batch_size=cfg.batch_size, learning_rate=cfg.finetune_lr,
                       lr_schedule="cosine", objective="diff2flow", seed=seed, sync_every=25)
    return replace(base, **overrides)


@torch.no_grad()
def reflow_couplings(net, bridge: FlowBridge, noise: torch.Tensor, solver_steps: int,
                     batch: int = 256, through_start: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Reflow couplings from the model's own flow ODE: (x̂0, ε') for each noise ε.

    x̂0 = flow Euler over ``simple_labels(solver_steps)`` from the full-denoise start D(σ_0)·ε, as every
    sampler here starts. σ_0 = σ_max < 1 (the SD schedule has nonzero terminal SNR), so that start is not
    the interpolant (1-σ_0)·x̂0 + σ_0·ε; the straight path through the actual start state and x̂0 is

        x(σ) = (1-σ)·x̂0 + σ·ε',   ε' = (D(σ_0)·ε - (1-σ_0)·x̂0) / σ_0

    and ε' (≈ ε, |ε' - ε| ≈ 0.04 on the digits) is the noise to train Reflow on: the Trainer then sees the
    states the sampler starts from. Trained on ε itself, the model learns v ≈ ε - x̂0 along a line that
    misses the start by (1-σ_0)·x̂0, and a straight flow from D(σ_0)·ε lands near (D - σ_0)·ε + σ_0·x̂0,
    x̂0 shrunk by σ_0 ≈ 0.936, at every step count (bench/results/quality_cpu.md, "ε coupling" row: ε-model
    pixel-PCA FD 2.88 vs 2.15 at 1 step, 2.39 vs 1.71 at 50). ``through_start=False`` returns (x̂0, ε).
    """
    labels = simple_labels(solver_steps, len(bridge.schedule))
    x0_hat = torch.cat([sample_flow_euler(net, bridge, chunk, labels) for chunk in noise.split(batch)])
    if not through_start:
        return x0_hat, noise
    sigma0 = flow_sigma(bridge.schedule.sigmas[labels[0]])
    return x0_hat, noise_through_start(noise, x0_hat, float(sigma0))


def finetune_variants(net, bridge: FlowBridge, x_train: torch.Tensor, cfg: DemoConfig, seed: int,
                      name: str = "", raw_noise_ablation: bool = False) -> tuple[list[tuple[str, str, TinyUNet]], dict]:
    """The demo's fine-tuned rows for one native model: [(row name, grid tag, net)] and their stats.

    Diff2Flow fine-tune and + scheduled sampling start from ``net`` with the same Trainer seed (so the same
    batches, σ and noise: scheduled sampling draws from its own RNG); + Reflow starts from the Diff2Flow
    fine-tune and trains on couplings that fine-tune generated. ``raw_noise_ablation`` adds a fourth row,
    ``REFLOW_RAW``: the same Reflow trained on (x̂0, ε) instead of (x̂0, ε') (see ``reflow_couplings``).
    """
    data = unconditional_data(x_train)
    base = finetune_config(cfg, seed)
    stats = {}
    d2f, stats[FT_D2F] = finetune(net, bridge, data, base, f"d2f   {name:<3}")
    ss_cfg = replace(base, scheduled_sampling=ScheduledSampling(
        probability=cfg.ss_probability, max_offset=cfg.ss_max_offset, ramp="linear"))
    ss, stats[FT_SS] = finetune(net, bridge, data, ss_cfg, f"ss    {name:<3}")
    t0 = time.perf_counter()
    eps = torch.randn((cfg.reflow_pairs,) + tuple(x_train.shape[1:]), generator=torch.Generator().manual_seed(seed + 17))
    x0_hat, coupled = reflow_couplings(d2f, bridge, eps, cfg.reflow_solver_steps)
    couple_seconds = time.perf_counter() - t0
    reflow_cfg = replace(base, steps=cfg.reflow_steps, learning_rate=cfg.reflow_lr, seed=seed + 1)
    rf, stats[FT_REFLOW] = finetune(d2f, bridge, unconditional_data(x0_hat, coupled), reflow_cfg, f"reflow {name:<2}")
    stats[FT_REFLOW]["coupling_seconds"] = couple_seconds
    stats[FT_REFLOW]["pairs"] = cfg.reflow_pairs
    variants = [(row, tag, n) for (row, tag), n in zip(FINETUNE_ROWS, (d2f, ss, rf))]
    if raw_noise_ablation:
        raw, stats[REFLOW_RAW] = finetune(d2f, bridge, unconditional_data(x0_hat, eps), reflow_cfg, f"reflow-e {name:<2}")
        variants.append((REFLOW_RAW, "RFE", raw))
    return variants, stats


# --- the demo --------------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig | None = None, out: str | os.PathLike = "d2f-demo-out", log=print) -> dict:
    """Run the whole demo; returns a JSON-ready results dict (also written to ``out/results.json``)."""
    cfg = (DemoConfig() if cfg is None else cfg).validate()
    clock = PhaseClock(log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, log, clock)
    finally:
        torch.set_num_threads(prev_threads)


def _run(cfg: DemoConfig, out: Path, log, clock: PhaseClock) -> dict:
    torch.manual_seed(cfg.seed)
    with clock.phase("data"):
        images, _ = digits_tensor(cfg.size)
        train_idx, held_idx = split_indices(len(images), cfg.held_out, cfg.seed)
        x_train, x_held = images[train_idx], images[held_idx]
        schedule = DiscreteSchedule.stable_diffusion()
    log(f"d2f demo: {len(x_train)} train / {len(x_held)} held-out digits at {cfg.size}x{cfg.size}, "
        f"SD schedule (T={len(schedule)}, sigma_flow in [{flow_sigma(schedule.sigma_min):.6f}, "
        f"{flow_sigma(schedule.sigma_max):.6f}]), {cfg.steps_train} steps x batch {cfg.batch_size} per model, "
        f"torch threads: {torch.get_num_threads()}")

    natives = []  # (name, net, bridge): sampled natively and zero-shot, checked for equivalence
    finetuned = []  # (name, row, tag, net, bridge): sampled with flow Euler
    results: dict = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
                     "train": {}, "finetune": {}}
    for name, prediction in PREDICTIONS:
        bridge = FlowBridge(schedule, prediction)
        torch.manual_seed(cfg.seed)  # both models start from the same weights and see the same batches
        net = TinyUNet(in_channels=1, channels=cfg.channels)
        results["params"] = count_parameters(net)
        with clock.phase(f"training {name}-model"):
            ema, stats = train_native(net, bridge, x_train, cfg, f"train {name:<3}", seed=cfg.seed + 1)
        ema.eval()
        results["train"][name] = stats
        log(f"  {name}-model ({prediction}, {results['params']:,} params): native loss "
            f"{stats['first_loss']:.3f} -> {stats['final_loss']:.4f} in {stats['seconds']:.1f}s")
        natives.append((name, ema, bridge))
    if cfg.finetune:
        for name, ema, bridge in natives:
            with clock.phase(f"fine-tuning {name}-model (Diff2Flow, + scheduled sampling, + Reflow)"):
                rows_ft, stats = finetune_variants(ema, bridge, x_train, cfg, seed=cfg.seed + 5, name=name)
            results["finetune"][name] = stats
            finetuned += [(name, row, tag, net, bridge) for row, tag, net in rows_ft]
            log(f"  {name}-model fine-tunes: " + "; ".join(
                f"{row} {s['steps']} steps, loss {s['first_loss']:.3f} -> {s['final_loss']:.4f} in {s['seconds']:.1f}s"
                for row, s in stats.items())
                + f" (+ {stats[FT_REFLOW]['pairs']} couplings in {stats[FT_REFLOW]['coupling_seconds']:.1f}s)")

    noise = torch.randn((cfg.n_samples, 1, cfg.size, cfg.size), generator=torch.Generator().manual_seed(cfg.seed + 2))
    with clock.phase("feature spaces for the Frechet distance"):
        metric = PixelPCAFrechet(x_train, cfg.pca_dim)
        conv_metric = RandomConvFrechet(x_train)
        ref_idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.seed + 3))[:cfg.n_samples]
        reference_fd = metric.distance(x_train[ref_idx], x_held)
        reference_fd_conv = conv_metric.distance(x_train[ref_idx], x_held)

    def add_row(name, row_name, tag, solver, steps, x):
        return {"model": name, "sampler": row_name, "tag": tag, "solver": solver, "steps": steps,
                "fd": metric.distance(x, x_held), "fd_random_conv": conv_metric.distance(x, x_held), "samples": x}

    rows, equivalence = [], []
    nets64 = {name: copy.deepcopy(net).double() for name, net, _ in natives}
    total = (len(natives) * (len(SAMPLERS) + 2) + len(finetuned)) * sum(cfg.sample_steps)
    with clock.phase("sampling and scoring"), progress_bar(total, "sample") as bar:
        for name, net, bridge in natives:
            for steps in cfg.sample_steps:
                labels = simple_labels(steps, len(schedule))
                finals = {}
                for sampler_name, tag, sampler in SAMPLERS:
                    x = sampler(net, bridge, noise, labels)
                    finals[sampler_name] = x
                    rows.append(add_row(name, sampler_name, tag, "DDIM" if sampler_name == NATIVE else FLOW_EULER,
                                        steps, x))
                    bar.update(steps)
                diff = (finals[NATIVE] - finals[FLOW]).abs().max().item()
                # The same pair in float64 on a few samples separates the identity (≈1e-14) from
                # float32 rounding, which 1-step ε sampling amplifies by ς_0 ≈ 14.6 through x̂0.
                k = min(cfg.n_check64, cfg.n_samples)
                ddim64 = sample_native_ddim(nets64[name], bridge, noise[:k].double(), labels)
                flow64 = sample_flow_euler(nets64[name], bridge, noise[:k].double(), labels)
                equivalence.append({
                    "model": name, "steps": steps, "max_abs_diff": diff,
                    "max_abs_diff_fp64": (ddim64 - flow64).abs().max().item(),
                    "fp32_rounding": (finals[NATIVE][:k].double() - ddim64).abs().max().item()})
                bar.update(2 * steps)
            for ft_name, row_name, tag, ft_net, ft_bridge in finetuned:
                if ft_name != name:
                    continue
                for steps in cfg.sample_steps:
                    x = sample_flow_euler(ft_net, ft_bridge, noise, simple_labels(steps, len(schedule)))
                    rows.append(add_row(name, row_name, tag, FLOW_EULER, steps, x))
                    bar.update(steps)

    with clock.phase("tables"):
        log("")
        log(_equivalence_table(equivalence, cfg.sample_steps))
        log("")
        table_md = _quality_table(rows, cfg.sample_steps)
        header = (f"Few-step quality: Frechet distance in a {metric.k}-dim pixel-PCA space (top PCs of the "
                  f"{len(x_train)} training digits, {100 * metric.explained:.0f}% of pixel variance), "
                  f"{cfg.n_samples} generated vs {len(x_held)} held-out real digits; lower is better. Same noise and "
                  f"'simple' label grid in every row; fine-tuned rows are sampled with flow Euler.\n"
                  f"Reference, {cfg.n_samples} real training digits vs the same held-out set: {reference_fd:.3f}")
        log(header)
        log(table_md)
        log("")

    with clock.phase("grid"):
        grid_rows = [to_uint8(x_train[ref_idx[:cfg.grid_columns], 0])]
        grid_labels = ["real"]
        for row in rows:
            grid_rows.append(to_uint8(row["samples"][:cfg.grid_columns, 0]))
            grid_labels.append(f"{row['model']} {row['tag']} {row['steps']}")
        grid_path = write_png(out / "grid.png", image_grid(grid_rows, grid_labels, scale=2))
        log(f"grid ({len(grid_rows)} rows: real digits, then model / method / steps): {grid_path}")

    results.update({
        "equivalence": equivalence,
        "max_abs_diff": max(e["max_abs_diff"] for e in equivalence),
        "metric": {"kind": metric.kind, "dim": metric.k, "explained_variance": metric.explained,
                   "n_generated": cfg.n_samples, "n_real": len(x_held),
                   "also": {"kind": conv_metric.kind, "description": conv_metric.describe()}},
        "reference_fd": reference_fd,
        "reference_fd_random_conv": reference_fd_conv,
        "table": [{k: v for k, v in r.items() if k != "samples"} for r in rows],
        "table_markdown": table_md,
        "grid_png": str(grid_path),
        "sample_seconds": clock.seconds["sampling and scoring"],
        "phase_seconds": clock.seconds,
    })
    results["wall_seconds"] = clock.total()
    results["results_json"] = str(out / "results.json")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"results: {results['results_json']}")
    log(f"[time] total: {results['wall_seconds']:.1f} s")
    return results


def _equivalence_table(equivalence: list, steps: tuple) -> str:
    lines = ["DDIM == flow Euler: max |x0_native DDIM - x0_flow Euler| over all pixels, same noise, same labels",
             "(fp32: all samples; fp64: the same nets in float64 on a few samples; fp32 rounding: "
             "|DDIM fp32 - DDIM fp64|, the floor)",
             f"{'model':<7}{'':<14}" + "".join(f"{s:>9}" for s in steps)]
    for name in dict.fromkeys(e["model"] for e in equivalence):
        for key, title in (("max_abs_diff", "fp32"), ("max_abs_diff_fp64", "fp64"), ("fp32_rounding", "fp32 rounding")):
            by_steps = {e["steps"]: e[key] for e in equivalence if e["model"] == name}
            lines.append(f"{name:<7}{title:<14}" + "".join(f"{by_steps[s]:>9.1e}" for s in steps))
    return "\n".join(lines)


def _quality_table(rows: list, steps: tuple, key: str = "fd") -> str:
    """A Markdown table (readable as text, pastes into a README): one line per (model, method)."""
    width = max(len(r["sampler"]) for r in rows)
    lines = [f"| model | {'method':<{width}} |" + "".join(f" {s:>6} |" for s in steps),
             f"|-------|-{'-' * width}-|" + "-------:|" * len(steps)]
    for model, sampler in dict.fromkeys((r["model"], r["sampler"]) for r in rows):
        by_steps = {r["steps"]: r[key] for r in rows if r["model"] == model and r["sampler"] == sampler}
        lines.append(f"| {model:<5} | {sampler:<{width}} |" + "".join(f" {by_steps[s]:>6.3f} |" for s in steps))
    return "\n".join(lines)
