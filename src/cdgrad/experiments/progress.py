"""A one-line progress bar on stderr for training runs."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress"]


class Progress:
    """A one-line progress bar on stderr; silent unless stderr is a terminal (or `enabled=True`)."""

    def __init__(self, total: int, desc: str = "", enabled: bool | None = None, stream: Any = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.desc, self.n, self.info = total, desc, 0, ""
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1, info: str | None = None) -> None:
        self.n += n
        if info is not None:
            self.info = info
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.2 or self.n >= self.total):
            self.last = now
            frac = self.n / max(self.total, 1)
            eta = (now - self.start) / max(frac, 1e-9) * (1 - frac)
            bar = "#" * int(24 * frac)
            self.stream.write(f"\r{self.desc} [{bar:<24}] {100 * frac:5.1f}% eta {eta:5.0f}s {self.info}\x1b[K")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
