"""What lets training stop inside an epoch and continue there exactly.

- `SaveRequests`: a signal (SIGTERM, SIGINT, SIGUSR1 by default) or `--save_interval_minutes`
  on rank 0's clock asks for a checkpoint; the ranks agree on it in the all-reduce every
  optimizer step already makes, so they all save after the same step.
- `EpochPosition`: where an epoch stands (the next micro-batch, rank 0's running loss, each
  rank's generator states), saved in the checkpoint as `step`, `epoch_loss_sum` and `rng`.
- `EpochSampler` starts an epoch at an offset without reading the samples before it, and
  `SeededSamples` draws each sample's augmentation (the random flip) from (seed, epoch, index),
  so the rest of an epoch sees the same data whether it runs straight, resumed, or in other
  loader workers.
"""
import contextlib
import itertools
import signal
import time
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, DistributedSampler

from util.distributed import all_ranks_true
from util.signals import early_signal


class Preempted(Exception):
    """Training stopped on a signal (after writing its checkpoint, if `saved`); the process
    exits EXIT_REQUEUE."""

    def __init__(self, message: str, saved: bool = True):
        super().__init__(message)
        self.saved = saved


class SaveRequests:
    """A rank's reasons to checkpoint now, and (after `agree`) the decision all ranks share.

    The handlers only set a flag: a signal never interrupts a step or a write (a second one
    while saving changes nothing). Only rank 0 keeps the clock, so all ranks follow one clock.
    """

    def __init__(self, signals: list, interval_minutes: float, is_main: bool):
        self.signals, self.is_main = signals, is_main
        self.interval = interval_minutes * 60
        self.received = None  # the first signal this rank got
        self.stop = self.save = False  # agreed by every rank
        self.last_save = time.monotonic()

    def _on_signal(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum)

    @contextlib.contextmanager
    def installed(self):
        """Handle the signals inside the block (main thread only), the old handlers after it.
        A signal that arrived while the run started (util/signals.py) counts as received."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in self.signals}
        self.received = self.received or early_signal(self.signals)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def batches(self, loader):
        """The loader's iterator for one pass. Its workers start with the signals held back
        (until `ignore_signals` makes them ignore them), and are shut down on leaving the block
        however the epoch ends: left to the interpreter's exit, whose SIGTERM they ignore, they
        would be waited for forever."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        try:
            iterator = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        try:
            yield iterator
        finally:
            if hasattr(iterator, "_shutdown_workers"):  # none without workers
                iterator._shutdown_workers()

    def votes(self) -> list:
        """[no signal here, rank 0's clock not due]: True to carry on; the ranks AND them."""
        due = self.is_main and self.interval > 0 and time.monotonic() - self.last_save >= self.interval
        return [self.received is None, not due]

    def agree(self, carry_on: list) -> None:
        """Take the all-reduced votes: every rank then has the same `stop` and `save`."""
        no_signal, clock_not_due = carry_on
        self.stop = not no_signal
        self.save = self.stop or not clock_not_due

    def saved(self) -> None:
        """A checkpoint was written: restart the clock."""
        self.save, self.last_save = False, time.monotonic()

    def stop_if_signalled(self, device: torch.device, where: str, saved: bool = True) -> None:
        """Outside the training steps (start-up, evaluation): raise Preempted on every rank if
        any rank received a save signal. One tiny all-reduce: every rank must call it."""
        if not all_ranks_true([self.received is None], device)[0]:
            raise Preempted(f"stopped by {self.cause()} {where}", saved)

    def cause(self) -> str:
        return self.received.name if self.received else "a signal to another rank"


def ignore_signals(signals: list, worker_id: int = 0) -> None:
    """A loader worker's worker_init_fn: ignore the save signals. A signal often reaches every
    process of the group (torchrun forwards one to each rank's group, SLURM signals the whole
    step), and torch's handler in the workers would end them, and the rank's epoch with them;
    the rank itself saves and stops them."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


@dataclass
class EpochPosition:
    """Where training stands inside `epoch`: `step` is the index of the next micro-batch (at an
    optimizer-step boundary), `loss_sum` rank 0's sum of the losses of the steps before it, `rng`
    this rank's generator states there (None at an epoch's start, which reseeds instead).
    `evaluation_due`: the epoch is trained (its log line's numbers), its evaluation is not."""
    epoch: int
    step: int = 0
    loss_sum: float = 0.0
    rng: dict = None
    evaluation_due: dict = None


def rng_state(device: torch.device) -> dict:
    """This process's generator states: {"torch": CPU ByteTensor, "cuda": ByteTensor on CUDA}.
    numpy's and Python's generators are not used by training (only by loader workers, which
    are reseeded each epoch), so they are not saved."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class EpochSampler(DistributedSampler):
    """A DistributedSampler (order from (seed, epoch) alone) that can begin an epoch part-way:
    the samples before `start` are skipped by index, never read."""

    start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


class SeededSamples(Dataset):
    """`dataset` whose random draws in __getitem__ (torch's generator: the flip) come from a
    generator seeded by (seed, epoch, index): the same in a straight and a resumed run, in the
    main process or any loader worker, and without touching the training's own generator.

    Loader workers copy this object when an epoch's iterator starts (they are not persistent),
    so `set_epoch` before that reaches them."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            # Distinct per (seed, epoch, index) for any realistic count (< 2^31 samples, epochs).
            # The CPU generator alone (the flips draw from it): torch.manual_seed would also
            # reseed CUDA's, which fork_rng(devices=[]) does not restore, and where CUDA is not
            # initialised it queues a formatted stack trace per call (slow, and never freed).
            torch.random.default_generator.manual_seed(
                ((self.seed * 1_000_003 + self.epoch) * 2**31 + index) % 2**64)
            return self.dataset[index]
