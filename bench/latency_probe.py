"""Event-loop latency probe of `quire bench gui` (bench/gui.py): how late the GUI thread
serves a timer while work runs.

A QTimer asks to fire every `interval_ms`; each time it does, the delay beyond the
interval is how long the event loop was busy elsewhere (a frozen window shows as
seconds). `summary()` gives the worst delay, the 99th percentile and the mean, in
milliseconds, for the benchmark JSON.
"""

from __future__ import annotations

import time

from PySide6.QtCore import QObject, Qt, QTimer


class LatencyProbe(QObject):
    def __init__(self, interval_ms: int = 20, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.interval_ms = interval_ms
        self.delays_ms: list[float] = []
        self._last = 0.0
        self._timer = QTimer(self)
        self._timer.setTimerType(Qt.TimerType.PreciseTimer)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._tick)

    def start(self) -> None:
        self.delays_ms = []
        self._last = time.perf_counter()
        self._timer.start()

    def stop(self) -> dict:
        self._timer.stop()
        return self.summary()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.delays_ms.append(max(0.0, (now - self._last) * 1000 - self.interval_ms))
        self._last = now

    def summary(self) -> dict:
        delays = sorted(self.delays_ms)
        if not delays:
            return {"samples": 0, "max_ms": None, "p99_ms": None, "mean_ms": None}
        return {
            "samples": len(delays),
            "interval_ms": self.interval_ms,
            "max_ms": round(delays[-1], 1),
            "p99_ms": round(delays[min(len(delays) - 1, int(0.99 * len(delays)))], 1),
            "mean_ms": round(sum(delays) / len(delays), 2),
        }
