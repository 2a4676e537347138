"""D2FValidation: validation during D2FTrain (issue 12 part 2), as an option node feeding D2FTrain's optional
``validation`` input, and the host side of a run's validation: the held-out set from the node's latents or a
split of the training set, the ``d2f.train`` "validation" event, the grid PNG in the run's folder and the extra
LOSS_MAP keys. The math is in ``d2f_core/training/validation.py``."""

from __future__ import annotations

import io as _io
import logging
import math
import os
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

from ..d2f_core.storage.files import atomic_write_bytes
from ..d2f_core.training.data import LatentBuckets
from ..d2f_core.training.validation import (HeldOutGroup, ValidationError, ValidationOptions, Validator, parse_steps,
                                            split_buckets)

CATEGORY = "Diff2Flow"
VALIDATION_TYPE = "D2F_VALIDATION"
ValidationIO = io.Custom(VALIDATION_TYPE)
GRID_FILE = "validation_{step:06d}_steps.png"


@dataclass
class ValidationSpec:
    """D2FValidation's output: the settings and, optionally, held-out LATENT + CONDITIONING as the host gave them."""

    options: ValidationOptions
    latents: dict | None = None
    positive: list | None = None


@dataclass
class ValidationPlan:
    """What D2FTrain hands its run: the settings and the held-out items as training buckets
    ``[(latents, cond kwargs list[, noise])]`` (working scale, host types already converted)."""

    options: ValidationOptions
    held: list[tuple]
    split: bool  # the held-out items were taken out of the training set


class D2FValidation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="D2FValidation",
            display_name="Diff2Flow Validation",
            category=CATEGORY,
            description=(
                "Validates D2FTrain every N steps and at the end (connect to its validation input): a held-out loss "
                "at K fixed flow times σ_k = σ_min + (σ_max−σ_min)(k+½)/K with fixed noise (deterministic, so points "
                "of the curve compare), drawn as a second series in the live chart and returned in the loss map; a "
                "fixed-seed sample grid at the given step counts (flow Euler, CFG with the run's empty prompt), "
                "shown on the node and saved as PNG in the run's folder; for Reflow runs the straightness "
                "‖x̂(1 step) − x̂(N steps)‖ / ‖x̂(N steps)‖, which falls as the paths straighten. Validation time is "
                "reported apart from training samples/s."),
            inputs=[
                io.Int.Input("every_n_steps", default=100, min=1, max=1_000_000,
                             tooltip="Validate every N optimizer steps (and after the last step)."),
                io.Latent.Input("latents", optional=True,
                                tooltip="Held-out latents (never trained on). Unconnected: holdout_fraction of the "
                                        "training set is held out instead."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Captions of the held-out latents: one per latent, or one for all."),
                io.Float.Input("holdout_fraction", default=0.1, min=0.01, max=0.9, step=0.01,
                               tooltip="Without held-out latents: this share of the training items (at least one) is "
                                       "held out, chosen by seed, and removed from training."),
                io.Int.Input("loss_times", default=8, min=1, max=256,
                             tooltip="K: flow times of the held-out loss, the midpoints of K equal cells of the "
                                     "trainable σ range, each with its own fixed noise. More: smoother, slower."),
                io.String.Input("grid_steps", default="1,2,4,25",
                                tooltip="Step counts of the sample grid, comma-separated (one column each). Reflow "
                                        "straightness compares 1 step with the largest count."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance scale of the grid's samples; needs D2FTrain's empty_conditioning "
                                       "(without it, or at 1, no guidance)."),
                # never randomized after a run: a changed seed would make the curve's points incomparable
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, control_after_generate=False,
                             tooltip="Fixes the held-out noise, the grid's noise and the holdout split."),
                io.Int.Input("images", default=2, min=0, max=16,
                             tooltip="Held-out items sampled in the grid (its rows); 0: no grid."),
                io.Float.Input("max_seconds", default=60.0, min=0.0, max=3600.0, step=1.0,
                               tooltip="Time budget of one validation: the loss always runs, then grid columns in "
                                       "increasing step count until the budget is spent (the rest are skipped and "
                                       "reported). 0: no cap."),
            ],
            outputs=[ValidationIO.Output(display_name="validation", tooltip="For D2FTrain's validation input.")],
        )

    @classmethod
    def execute(cls, every_n_steps, holdout_fraction, loss_times, grid_steps, cfg, seed, images, max_seconds,
                latents=None, positive=None) -> io.NodeOutput:
        if (latents is None) != (positive is None):
            raise ValidationError("D2FValidation: connect both held-out latents and their positive conditioning, "
                                  "or neither (then part of the training set is held out)")
        options = ValidationOptions(every_n_steps=int(every_n_steps), holdout_fraction=float(holdout_fraction),
                                    loss_times=int(loss_times), grid_steps=parse_steps(grid_steps), cfg=float(cfg),
                                    seed=int(seed), images=int(images), max_seconds=float(max_seconds)).validate()
        return io.NodeOutput(ValidationSpec(options, latents, positive))


def plan_validation(model, spec: ValidationSpec | None, buckets: list[tuple]) -> tuple[list[tuple], ValidationPlan | None]:
    """(training buckets, plan) for D2FTrain: the node's held-out latents converted like training latents, or a
    deterministic split of ``buckets`` whose held-out items leave the training set. Runs before any GPU work."""
    if spec is None:
        return buckets, None
    from .train_inputs import assemble_buckets  # the same conversion as the training latents
    if spec.latents is not None:
        return buckets, ValidationPlan(spec.options, assemble_buckets(model, [spec.latents], [spec.positive]), False)
    train, held = split_buckets(buckets, spec.options.holdout_fraction, spec.options.seed)
    return train, ValidationPlan(spec.options, held, True)


def _finite(v):
    return v if v is not None and math.isfinite(v) else None  # JSON has no NaN: the chart shows a gap


@dataclass
class ValidationHistory:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    straightness: list[float | None] = field(default_factory=list)
    seconds: float = 0.0
    grids: list[str] = field(default_factory=list)

    def loss_map(self) -> dict:
        """Extra LOSS_MAP keys (``loss`` stays the training series for core Plot Loss Graph)."""
        out = {"validation_steps": list(self.steps), "validation_loss": list(self.losses),
               "validation_seconds": self.seconds}
        if any(s is not None for s in self.straightness):
            out["straightness"] = list(self.straightness)
        return out


class ValidationRun:
    """One D2FTrain run's validation on rank 0: ``__call__(step)`` is the trainer's ``on_validate``."""

    def __init__(self, run, plan: ValidationPlan):
        self.run, self.plan = run, plan
        held = LatentBuckets(plan.held, device=run.device, dtype=torch.float32, cond_dtype=run.dtype,
                             empty_cond=run.empty)
        groups = [HeldOutGroup(held.latents[i], held.conds[i], held.noise[i],
                               held.empty[i] if held.empty is not None else None) for i in range(len(held.sizes))]
        reflow = any(n is not None for n in held.noise + run.data.noise)
        self.validator = Validator(run.net, run.bridge, groups, plan.options, objective=run.config.objective,
                                   compute_dtype=run.dtype, device=run.device, straightness=reflow)
        self.history = ValidationHistory()

    def __call__(self, step: int) -> None:
        run = self.run
        with run.ema_weights():  # validate what the run returns (the EMA when on)
            result = self.validator.run(step)
        h = self.history
        h.steps.append(step)
        h.losses.append(result.loss)
        h.straightness.append(result.straightness)
        h.seconds += result.seconds
        grid = self._save_grid(step, result.grid) if result.grid else None
        run.reporter.validation(step=step, loss=_finite(result.loss), straightness=_finite(result.straightness),
                                seconds=result.seconds, total_seconds=h.seconds, grid=grid, skipped=result.skipped)
        logging.info(f"D2FTrain validation at step {step}: held-out loss {result.loss:.5f}"
                     + (f", straightness {result.straightness:.4f}" if result.straightness is not None else "")
                     + f" ({result.seconds:.1f} s" + (f"; skipped {result.skipped} steps" if result.skipped else "")
                     + ")")

    def _save_grid(self, step: int, grid: dict[int, torch.Tensor]) -> dict | None:
        """The grid as one PNG (rows: images, columns: step counts) in the run's folder; a failure is logged and
        training goes on (validation never ends a run)."""
        run = self.run
        try:
            image = tile(grid, run.model.get_model_object("latent_format"), run.device)
            buf = _io.BytesIO()
            image.save(buf, format="PNG")
            path = atomic_write_bytes(buf.getvalue(), os.path.join(run.files.folder, GRID_FILE.format(step=step)))
        except Exception as exc:  # noqa: BLE001  (disk full, a name taken, a previewer failing, …)
            logging.warning(f"D2FTrain: the validation grid of step {step} was not saved: {exc}")
            return None
        self.history.grids.append(path)
        import folder_paths
        subfolder = os.path.relpath(os.path.dirname(path), folder_paths.get_output_directory())
        return {"filename": os.path.basename(path), "subfolder": subfolder.replace(os.sep, "/"), "type": "output",
                "steps": sorted(grid), "images": next(iter(grid.values())).shape[0]}


def _previewer(latent_format, device):
    """The host's latent previewer, or its Latent2RGB fallback when previews are off (the grid is saved anyway)."""
    import latent_preview
    previewer = latent_preview.get_previewer(device, latent_format)
    if previewer is None and latent_format.latent_rgb_factors is not None:
        previewer = latent_preview.Latent2RGBPreviewer(latent_format.latent_rgb_factors,
                                                       latent_format.latent_rgb_factors_bias)
    if previewer is None:
        raise ValidationError(f"no latent previewer for {type(latent_format).__name__}")
    return previewer


def tile(grid: dict[int, torch.Tensor], latent_format, device):
    """PIL image: row i = image i, column j = the j-th step count (increasing), each decoded by the previewer."""
    from PIL import Image
    previewer = _previewer(latent_format, device)
    columns = [grid[k] for k in sorted(grid)]
    cells = [[previewer.decode_latent_to_preview(col[i:i + 1].float()) for col in columns]
             for i in range(columns[0].shape[0])]
    w, h = cells[0][0].size
    out = Image.new("RGB", (w * len(columns), h * len(cells)))
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            out.paste(cell, (c * w, r * h))
    return out


OPTION_NODES = [D2FValidation]
