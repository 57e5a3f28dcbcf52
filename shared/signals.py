"""Stopping cleanly: SIGTERM / SIGINT ask training to stop at the next step boundary (after a checkpoint when
enabled) and the run is recorded `interrupted`; a second signal, or no step boundary within GRACE_S, stops at
once."""

from __future__ import annotations

import contextlib
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
        self.shield = False

    def handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.shield:  # the record's last write is under way: it completes, then the process ends
            self.signal = self.signal or name
            return
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

    @contextlib.contextmanager
    def shielded(self):
        """No Interrupted raised inside: the final write of a record is not cut in half by a second signal
        (a launcher passes Ctrl-C on as SIGINT, then SIGTERM)."""
        self.shield = True
        try:
            yield
        finally:
            self.shield = False


STOP = _Stop()


def install_signal_handlers():
    signal.signal(signal.SIGTERM, STOP.handler)
    signal.signal(signal.SIGINT, STOP.handler)
