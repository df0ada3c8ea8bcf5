"""A tiny text progress bar (the demo does not depend on tqdm)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts work units and redraws one line: bar, percent, elapsed, label.

    On a terminal the line is redrawn in place; elsewhere (a log file, a
    captured stream) a line is written only every ``10%`` so logs stay short.
    """

    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        width: int = 30,
        enabled: bool = True,
    ) -> None:
        self.total = max(int(total), 1)
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.enabled = enabled
        self.start = time.perf_counter()
        self._last_decile = -1
        self._interactive = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, amount: int, label: str = "") -> None:
        """Marks ``amount`` more units done and redraws."""
        self.done = min(self.done + amount, self.total)
        if not self.enabled:
            return
        fraction = self.done / self.total
        decile = int(fraction * 10)
        if not self._interactive and decile == self._last_decile:
            return
        self._last_decile = decile
        filled = round(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        line = f"[{bar}] {100 * fraction:5.1f}% {elapsed:6.1f}s {label}"
        if self._interactive:
            self.stream.write("\r" + line[:100].ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends the line (on a terminal)."""
        if self.enabled and self._interactive:
            self.stream.write("\n")
            self.stream.flush()
