"""Signals that stop a job must stop it even when they land inside a finalizer.

A job turns SIGINT/SIGTERM into an exception raised in the main thread (the CLI: Ctrl-C and
SIGTERM; a replica process: SIGTERM), so `finally` blocks shut worker processes down. But when
the signal arrives while Python is running a `__del__` method (say, during a garbage
collection), the exception the handler raises is printed as "Exception ignored in ..." and
dropped, and the job would run on to the end. `redeliver_stop_signals` installs an
unraisable-exception hook that, for those exceptions only, sends the signal again instead: its
handler then runs at the next opportunity, and eventually outside any finalizer. The signal is
sent by a timer thread shortly after the hook returns: sent at once (`os.kill`,
`signal.raise_signal`, even from a thread the hook waits to start), Python would run the
handler inside the hook, where its exception would be dropped again.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

REDELIVERY_DELAY_S = 0.05


@contextlib.contextmanager
def redeliver_stop_signals(signal_of: dict[type[BaseException], int]) -> Iterator[None]:
    """While active, an exception of a type in `signal_of` that a finalizer swallowed is
    turned back into its signal; other unraisable exceptions go to the previous hook
    unchanged."""
    previous_hook = sys.unraisablehook

    def hook(unraisable) -> None:
        for exc_type, signum in signal_of.items():
            if unraisable.exc_type is not None and issubclass(unraisable.exc_type, exc_type):
                timer = threading.Timer(REDELIVERY_DELAY_S, os.kill, (os.getpid(), signum))
                timer.daemon = True
                timer.start()
                return
        previous_hook(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
