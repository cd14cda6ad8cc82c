"""The progress bar of training runs: tqdm on stderr, shown only when stderr is a terminal."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """A tqdm bar of `total` steps; silent unless `stream` (stderr) is a terminal or `enabled=True`.

    `update(n, info)` advances it and shows `info` (e.g. the epoch and loss) after the bar.
    """

    def __init__(self, total: int, desc: str = "", enabled: bool | None = None, stream: Any = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._bar = tqdm(total=total, desc=desc, file=self.stream, disable=not self.enabled, mininterval=0.2)

    def update(self, n: int = 1, info: str | None = None) -> None:
        if info is not None and self.enabled:
            self._bar.set_postfix_str(info, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
