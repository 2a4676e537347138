"""A tiny text progress bar on stderr (no tqdm: d2f_core's runtime deps are torch, safetensors, numpy, einops).

On a terminal it redraws one line with ``\\r`` (at most every ``min_interval`` seconds); into a file
or a captured stream it writes a fresh line every ~10 %, so logs stay readable.
"""

from __future__ import annotations

import sys
import time


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


class ProgressBar:
    """``with ProgressBar(total, "train eps") as bar: bar.update(1, loss=0.12)``."""

    def __init__(self, total: int, desc: str = "", stream=None, width: int = 28, min_interval: float = 0.1,
                 disable: bool = False):
        self.total = max(1, int(total))
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.min_interval = min_interval
        self.disable = disable
        self.n = 0
        self.postfix = ""
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1
        isatty = getattr(self.stream, "isatty", None)
        self._tty = bool(isatty and isatty())

    def update(self, n: int = 1, **postfix) -> None:
        self.n = min(self.total, self.n + n)
        if postfix:
            self.postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        if self.disable:
            return
        now = time.perf_counter()
        if self._tty:
            if now - self._last_draw >= self.min_interval or self.n == self.total:
                self._last_draw = now
                self.stream.write("\r" + self.line() + "\033[K")
                self.stream.flush()
        else:
            decile = (10 * self.n) // self.total
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        frac = self.n / self.total
        filled = int(round(self.width * frac))
        rate = self.n / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        bar = "#" * filled + "-" * (self.width - filled)
        text = f"{self.desc} |{bar}| {self.n}/{self.total} [{_fmt_time(elapsed)}<{_fmt_time(eta)}, {rate:.1f}it/s]"
        return f"{text} {self.postfix}" if self.postfix else text

    def close(self) -> None:
        if not self.disable and self._tty:
            self.stream.write("\n")
            self.stream.flush()
        self.disable = True

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
