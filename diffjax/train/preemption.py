"""SIGTERM / SIGINT: finish the current step, save, exit 0.

One process sets a flag from the signal handler. Several processes must stop at the same step, so
they use JAX's preemption sync service instead: SIGTERM on any host (what a TPU VM gets before
maintenance or preemption) is shared through the coordination service, and
`reached_preemption_sync_point` turns true on every host at the same step. SIGINT is passed on as
SIGTERM there so that Ctrl-C takes the same path.
"""

import os
import signal
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import jax
from jax.experimental import multihost_utils


class StopRequest:
    """Whether the run was asked to stop; query once per step with `reached(step)`."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        if self.signal_name is not None:  # a second signal: the user means it
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"{self.signal_name}: stopping after this step and saving a checkpoint", file=sys.stderr, flush=True)

    def reached(self, step: int) -> bool:
        """True at the step where every process stops (called by every process at every step)."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal_name is not None

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        """Handlers for the duration of training; the previous ones come back afterwards."""
        if jax.process_count() > 1:  # JAX's preemption notifier owns SIGTERM
            handlers = {signal.SIGINT: lambda *_: os.kill(os.getpid(), signal.SIGTERM)}
        else:
            handlers = {signal.SIGTERM: self._handle, signal.SIGINT: self._handle}
        previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
