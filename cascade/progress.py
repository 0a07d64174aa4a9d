"""Progress for long commands: a bar on a terminal, plain periodic lines in a log.

A tqdm bar redraws itself with carriage returns; in a CI log or a file that is one line of
hundreds of overwritten states. So the bar is drawn only when stderr is a terminal; otherwise a
line like `train: 120/500 step (24%), 3.1 step/s, 2m05s left, loss=0.41` goes out at most every
`every_s` seconds, plus one at the end. `enabled=False` (`--no-progress`) prints nothing.
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 every_s: float = 10.0, stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.every_s = every_s
        self.start = self.last = time.monotonic()
        self.start_n = initial
        self.postfix = ""
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
            except ImportError:  # the core does not need tqdm: lines instead
                pass
            else:
                self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                                dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if postfix:
            self.postfix = ", ".join(f"{k}={v}" for k, v in postfix.items())
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.every_s:
            self._line()

    def _line(self) -> None:
        self.last = now = time.monotonic()
        done = self.n - self.start_n
        rate = done / max(1e-9, now - self.start)
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"{_clock((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        print(f"{self.desc}: {', '.join(parts)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.n > self.start_n:
            self._line()
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def per_name(desc: str, unit: str = "text", enabled: bool = True):
    """A `(name, done, total)` callback (calibration's measuring, one tier at a time) drawing one
    Progress per name."""
    bars: dict[str, Progress] = {}
    began = [time.monotonic()]  # a name's work began when the previous one's ended

    def report(name: str, done: int, total: int) -> None:
        if name not in bars:  # first heard of after its first batch: its clock started before
            bars[name] = Progress(total, f"{desc} {name}", unit, enabled=enabled)
            bars[name].start = began[0]
        bar = bars[name]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            began[0] = time.monotonic()

    return report
