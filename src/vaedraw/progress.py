"""Progress of a long phase (training, the IWAE pass, sample quality), on stderr.

On a terminal a tqdm bar; elsewhere (a log file, CI) a plain line about every tenth of the work, with
the rate and the time left, so that a log gets ten lines instead of thousands of carriage returns.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """total: units of work; initial: units already done (a resumed run); desc: what is being done."""

    def __init__(self, total: int, desc: str, unit: str, *, initial: int = 0, enabled: bool = True,
                 label: str = "vaedraw", file=None):
        self.file = file or sys.stderr
        self.total, self.desc, self.unit, self.label, self.enabled = max(1, total), desc, unit, label, enabled
        self.initial = self.done = min(initial, self.total)
        self.every = max(1, (self.total - self.initial) / 10)
        self.next_at = self.initial + self.every
        self.stats = ""
        self.t0 = time.perf_counter()
        tty = enabled and getattr(self.file, "isatty", lambda: False)()
        self.bar = (tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.file, dynamic_ncols=True)
                    if tty else None)

    def update(self, n: int = 1, desc: str | None = None) -> None:
        self.done += n
        if desc is not None:
            self.desc = desc
        if self.bar is not None:
            if desc is not None:
                self.bar.set_description(desc, refresh=False)
            self.bar.update(n)
        elif self.enabled and (self.done >= self.next_at or self.done >= self.total):
            self._line()
            while self.next_at <= self.done:
                self.next_at += self.every

    def set_stats(self, text: str, **postfix: str) -> None:
        """Figures to show with the progress: `text` in plain lines, `postfix` on the bar."""
        self.stats = text
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)

    def write(self, text: str) -> None:
        """A line of its own that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.file)
        elif self.enabled:
            print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.t0
        rate = (self.done - self.initial) / max(elapsed, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100 * self.done / self.total
        print(f"{self.label}: {self.desc}: {self.done:,}/{self.total:,} {self.unit} ({pct:.0f}%){self.stats}, "
              f"{elapsed:.0f} s, {rate:.1f} {self.unit}/s"
              + (f", about {left:.0f} s left" if self.done < self.total else ""), file=self.file, flush=True)
