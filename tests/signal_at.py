"""Test helper: run main_ear.py with the given flags, and in rank 0 send a real signal when the
training loop fetches its micro-batch number SIGNAL_AT (counted from 0 over the whole run): a
preemption notice that lands at a known point.

    [torchrun ...] tests/signal_at.py <main_ear.py flags>

Environment: SIGNAL_AT; SIGNAL (e.g. SIGTERM); SIGNAL_TO: "self" (this process) or "launcher"
(torchrun, which forwards the signal to every rank); SIGNAL_SETTLE: seconds rank 0 then waits,
so that a forwarded signal has reached every rank before the step ends (default 0).
"""
import itertools
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import engine_ear

REPO = Path(__file__).resolve().parents[1]


def signalling_fetch(at: int, send, settle: float = 0.0):
    """A TokenBatches.__call__ that calls send() before fetching micro-batch number `at`."""
    fetch, count = engine_ear.TokenBatches.__call__, itertools.count()

    def fetch_and_signal(self, batch):
        if next(count) == at:
            send()
            time.sleep(settle)
        return fetch(self, batch)
    return fetch_and_signal


if __name__ == "__main__":
    if os.environ.get("RANK", "0") == "0":
        sig = signal.Signals[os.environ["SIGNAL"]]
        target = os.getppid() if os.environ["SIGNAL_TO"] == "launcher" else os.getpid()
        engine_ear.TokenBatches.__call__ = signalling_fetch(
            int(os.environ["SIGNAL_AT"]), lambda: os.kill(target, sig),
            float(os.environ.get("SIGNAL_SETTLE", 0)))
    sys.argv = [str(REPO / "main_ear.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
