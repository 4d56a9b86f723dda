"""The save signals (`--save_signals`), and those that arrive while a run is still starting.

A cluster can send its preemption notice at any second, including while `import torch` runs
(several seconds) or while data, model and checkpoint load. `main_ear.py` therefore calls
`remember_early()` before importing anything else: from then on a notice is remembered instead
of ending the process, and once the run is set up it is acted on (exit 75, "requeue me"; nothing
new to save) or, for a signal the run does not save on, delivered again as it would have been.
This module imports nothing heavy, so that it can come first.
"""
import os
import signal

# Exit status after stopping on a save signal: EX_TEMPFAIL of sysexits.h ("try again later"), so
# a job script can tell "requeue me" from success (0) and from errors (1, 2). docs/training.md.
EXIT_REQUEUE = 75
DEFAULT_SAVE_SIGNALS = "TERM,INT,USR1"

_early = []  # the signals received since remember_early(), in order
_before = {}  # their handlers before remember_early()


def parse_signals(text: str) -> list:
    """'TERM,INT,USR1' (with or without the SIG prefix, any case; '' for none) -> signals."""
    found = []
    for name in filter(None, (part.strip().upper() for part in text.split(","))):
        name = name if name.startswith("SIG") else f"SIG{name}"
        sig = getattr(signal.Signals, name, None)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise SystemExit(f"error: --save_signals {text!r}: {name} is not a signal that can be "
                             "caught (e.g. TERM,INT,USR1, or '' for none)")
        found.append(sig)
    return found


def _remember(signum, frame) -> None:
    _early.append(signal.Signals(signum))


def remember_early(text: str = DEFAULT_SAVE_SIGNALS) -> None:
    """Remember the default save signals from now on, until `keep_early` decides."""
    for sig in parse_signals(text):
        _before[sig] = signal.signal(sig, _remember)


def keep_early(signals: list) -> None:
    """The run's flags are known: keep remembering `signals` (the run acts on them once set up,
    see `early_signal`) and give the others back their previous handlers (Python's: SIGINT
    raises KeyboardInterrupt, SIGTERM ends the process), delivering any that arrived meanwhile."""
    for sig, handler in list(_before.items()):
        if sig not in signals and signal.getsignal(sig) is _remember:
            signal.signal(sig, handler)
            del _before[sig]
            if sig in _early:
                os.kill(os.getpid(), sig)


def early_signal(signals: list):
    """The first of `signals` received since `remember_early`, or None."""
    return next((sig for sig in _early if sig in signals), None)
