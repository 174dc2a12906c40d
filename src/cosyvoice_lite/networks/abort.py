"""Stopping a long computation between its steps once its caller no longer needs it.

A whole utterance's flow (its encoder layers, then ten Euler steps) and vocoder can take many
seconds; a request cancelled meanwhile (a client that went away, a timeout), or an engine closing
(the process exiting), should free the worker after the step under way, not at the end. The
engine states the condition for the calling thread (``abort_when``); the networks only ask
between their steps (``check``): no request logic here. The steps are at most a few seconds
apart on 2 CPU cores for a 6,000-token CosyVoice2 utterance: encoder layers, a long sequence's
attention blocks (conformer.py), Euler steps, the vocoder's source, stages and resblocks; a
step is one estimator call (a whole utterance's Euler step: ~2-3 s there).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_STATE = threading.local()  # .condition: the calling thread's, from abort_when


class ComputationAborted(BaseException):  # noqa: N818 - not an error: the caller stopped wanting it
    """A computation stopped between its steps (``abort_when``). A BaseException, like
    KeyboardInterrupt: handlers of errors (``except Exception``: a failed batch computed again
    row by row) must let it through to the caller that asked for it."""


@contextmanager
def abort_when(condition: Callable[[], bool]) -> Iterator[None]:
    """Within it, the calling thread's computations stop at their next ``check`` once
    ``condition()`` holds."""
    before = getattr(_STATE, "condition", None)
    _STATE.condition = condition
    try:
        yield
    finally:
        _STATE.condition = before


def check(where: str) -> None:
    """Raise ComputationAborted if the calling thread's ``abort_when`` condition holds."""
    condition = getattr(_STATE, "condition", None)
    if condition is not None and condition():
        raise ComputationAborted(f"stopped before {where}")
