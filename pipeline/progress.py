"""Progress of long work, its clock, and a quiet console.

On a terminal a Lightning bar labelled by what it counts (`UAP pass 3/15`, `classifier epoch 4/20`); in a log
file or a captured stream (no TTY) one line per epoch or pass instead, never a bar. `quiet_libraries` silences,
at their source, the library messages that carry nothing for this tool's user; real warnings still show.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

log = logging.getLogger("pipeline.progress")


def interactive() -> bool:
    """A person watches this process's output (stderr is a terminal)."""
    return sys.stderr.isatty()


class LabelledBar(TQDMProgressBar):
    """Lightning's bar, labelled `label(trainer)` instead of "Epoch N", no "v_num", no validation bars."""

    def __init__(self, label: Callable[[pl.Trainer], str]):
        super().__init__()
        self.label = label

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.set_description(self.label(self.trainer))  # not "Training" before the first epoch starts
        return bar

    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        self.train_progress_bar.set_description(self.label(trainer))

    def init_validation_tqdm(self):
        bar = super().init_validation_tqdm()
        bar.disable = True
        return bar

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class EpochLines(pl.Callback):
    """One log line per training epoch: `line(trainer)`, after validation."""

    def __init__(self, line: Callable[[pl.Trainer], str]):
        self.line = line

    def on_train_epoch_end(self, trainer, pl_module):
        log.info("%s", self.line(trainer))


def trainer_progress(enabled: bool, label: Callable[[pl.Trainer], str],
                     line: Callable[[pl.Trainer], str] | None = None) -> dict:
    """Trainer keyword arguments: a labelled bar on a terminal when `enabled`, else no bar and, when `line` is
    given, one log line per epoch."""
    if enabled and interactive():
        return {"enable_progress_bar": True, "callbacks": [LabelledBar(label)]}
    return {"enable_progress_bar": False, "callbacks": [EpochLines(line)] if line else []}


class Stopwatch:
    """Seconds since it started, less the time spent in `paused()` (measurements made beside the work)."""

    def __init__(self):
        self.t0, self.off = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0 - self.off

    @contextmanager
    def paused(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.off += time.perf_counter() - t


QUIET_LOGGERS = ("pytorch_lightning.utilities.rank_zero",  # "GPU available", the litlogger tip, "`max_epochs` reached"
                 "lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.seed",  # "Seed set to 42"
                 "lightning.fabric.utilities.seed")
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # a deprecation inside Lightning's own pytree helper
)


def quiet_libraries() -> None:
    """Lightning's informational lines to WARNING (its warnings still show), and its internal deprecation."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # MLflow logs every database error with its traceback before raising it; the job reports it in one line
    # (a store locked past tracking.busy_timeout) or raises it with its traceback
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
