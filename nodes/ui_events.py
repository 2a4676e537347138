"""What a training run shows while it runs: the node's progress bar and previews, and ``d2f.train``
messages (step, losses, samples/s, ETA, last save, validation points) that the web extension draws as a live chart."""

from __future__ import annotations

import logging
import time

import comfy.model_management as mm
import comfy.utils

EVENT = "d2f.train"


def _send(data: dict):
    try:
        from server import PromptServer
        server = PromptServer.instance
    except (ImportError, AttributeError):
        return  # no UI server (tests, `d2f run`)
    server.send_sync(EVENT, data, server.client_id)


class TrainingReporter:
    def __init__(self, node_id, total_steps: int):
        self.node_id = node_id
        self.total = total_steps
        self.bar = comfy.utils.ProgressBar(total_steps, node_id=node_id)
        self.t0 = time.perf_counter()
        self.start_step = 0
        self.last_save = None
        self.stop_requested = False

    def should_stop(self) -> bool:
        """The UI's stop button, seen either directly or through the progress hook (which clears the flag)."""
        return self.stop_requested or mm.processing_interrupted()

    def _update_bar(self, step: int, preview=None):
        try:
            self.bar.update_absolute(step, self.total, preview)
        except mm.InterruptProcessingException:
            self.stop_requested = True

    def _event(self, kind: str, **data):
        _send({"node": self.node_id, "kind": kind, "total": self.total, **data})

    def started(self, step: int):
        self.start_step = step
        self.t0 = time.perf_counter()
        self._event("start", step=step)

    def progress(self, step: int, losses: list[float], samples_per_second: float):
        elapsed = time.perf_counter() - self.t0
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else None
        self._update_bar(step)
        self._event("progress", step=step, losses=losses, samples_per_second=samples_per_second, eta_seconds=eta,
                    last_save=self.last_save)
        if losses:
            logging.info(f"D2FTrain step {step}/{self.total} loss {losses[-1]:.5f} ({samples_per_second:.2f} samples/s)")

    def saved(self, step: int, path: str):
        self.last_save = path
        self._event("saved", step=step, path=path)

    def preview(self, step: int, x0, latent_format, device):
        try:
            import latent_preview
            previewer = latent_preview.get_previewer(device, latent_format)
            if previewer is None:
                return
            image = previewer.decode_latent_to_preview_image("JPEG", x0)
        except Exception as exc:  # a preview must never end a training run
            logging.warning(f"D2FTrain preview failed: {exc}")
            return
        self._update_bar(step, image)

    def validation(self, step: int, **info):
        """A validation point (``validation_node``): held-out loss, straightness or None, its seconds (apart from
        training samples/s), the grid PNG's /view parameters or None, the step counts skipped by the time cap."""
        self._event("validation", step=step, **info)

    def finished(self, step: int, status: str):
        self._event("done", step=step, status=status, last_save=self.last_save)
