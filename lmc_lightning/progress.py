"""Progress bars for long work outside Lightning's loops (path points, alignment rounds), the Lightning way."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def progress_bar(trainer: Any, total: int | None, desc: str,
                 unit: str = "point") -> Iterator[Callable[[int], Any] | None]:
    """A tqdm bar on rank zero while the trainer shows progress bars; yields its ``update`` (``None`` otherwise).

    Lightning's own bars are tqdm bars too, so ``--trainer.enable_progress_bar false`` turns both off.

    Args:
        trainer: The running trainer (``None``: no bar).
        total: Number of steps, or ``None`` when unknown (the bar counts steps and shows their rate).
        desc: Text before the bar.
        unit: Name of one step.
    """
    if trainer is None or trainer.progress_bar_callback is None or not trainer.is_global_zero:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True, file=sys.stderr)
    try:
        yield bar.update
    finally:
        bar.close()


ALIGN_UNITS = {"weight": "round", "activation": "batch", "ste": "step"}  # what one progress step of each method is


def align_progress(trainer: Any, method: str,
                   owner: str) -> contextlib.AbstractContextManager[Callable[[int], Any] | None]:
    """:func:`progress_bar` for an alignment by ``method`` matching; pass its ``update`` as ``progress=``.

    The total is unknown: weight matching stops after a round that changes nothing.
    """
    return progress_bar(trainer, None, f"{owner}: {method} matching", ALIGN_UNITS.get(method, "step"))
