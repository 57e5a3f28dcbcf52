"""Stopping cleanly: SIGTERM / SIGINT ask training to stop at the next step boundary (after a checkpoint when
enabled) and the run is recorded `interrupted`; a second signal, or no step boundary within GRACE_S, stops at
once."""

from __future__ import annotations

import os
import signal
import threading
import time

GRACE_S = 20  # after SIGTERM, a process that has not reached a step boundary by then records itself and exits


class Interrupted(BaseException):
    """SIGTERM / SIGINT reached a step boundary (after a checkpoint when enabled): the run is `interrupted`."""


class _Stop:
    """A SIGTERM / SIGINT asks training to stop at the next step boundary; a second one stops at once."""

    def __init__(self):
        self.signal: str | None = None
        self.on_stuck = None  # called by the watchdog (record the run) before a forced exit

    def handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None:
            raise Interrupted(f"second signal {name}")
        self.signal = name
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self):
        time.sleep(GRACE_S)
        try:
            if self.on_stuck:
                self.on_stuck(
                    f"interrupted: {self.signal}, and no step boundary was reached within {GRACE_S} s "
                    "(blocked in a collective or a long evaluation; a peer rank may have died)"
                )
        finally:
            os._exit(143)


STOP = _Stop()


def install_signal_handlers():
    signal.signal(signal.SIGTERM, STOP.handler)
    signal.signal(signal.SIGINT, STOP.handler)
