"""A stop signal that lands inside a finalizer still stops the job (vbatch/jobs/signals.py).

Python drops an exception raised while a `__del__` runs ("Exception ignored in ..."); a Ctrl-C
delivered at that moment (say, during a garbage collection) used to let a job run to the end
with exit code 0 (seen once in CI). Here the signal is sent from inside a finalizer.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from vbatch.jobs.signals import redeliver_stop_signals


class SignalsWhileFinalized:
    """Sends `signum` to this process from its finalizer, then keeps running Python code, so
    the signal's handler raises inside the finalizer."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        for _ in range(10_000):
            pass


def run_python_for_a_while():
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        pass


@pytest.fixture
def unraisables(monkeypatch):
    """What reaches the unraisable-exception hook in place when the context is entered."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable))
    return seen


def test_without_redelivery_the_interrupt_is_lost(unraisables):
    finalized = SignalsWhileFinalized(signal.SIGINT)
    del finalized
    run_python_for_a_while()                      # no KeyboardInterrupt: it was swallowed
    assert [u.exc_type for u in unraisables] == [KeyboardInterrupt]


def test_interrupt_swallowed_by_a_finalizer_is_raised_again():
    with pytest.raises(KeyboardInterrupt):
        with redeliver_stop_signals({KeyboardInterrupt: signal.SIGINT}):
            finalized = SignalsWhileFinalized(signal.SIGINT)
            del finalized
            run_python_for_a_while()


class Stop(BaseException):
    pass


def test_custom_stop_exception_and_other_unraisables_pass_through(unraisables):
    def raise_stop(signum, frame):
        raise Stop()
    previous = signal.signal(signal.SIGTERM, raise_stop)
    try:
        with pytest.raises(Stop):
            with redeliver_stop_signals({Stop: signal.SIGTERM}):
                class Broken:
                    def __del__(self):
                        raise ValueError("an ordinary finalizer bug")
                broken = Broken()
                del broken                         # reported as usual, not turned into a stop
                assert [u.exc_type for u in unraisables] == [ValueError]
                finalized = SignalsWhileFinalized(signal.SIGTERM)
                del finalized
                run_python_for_a_while()
    finally:
        signal.signal(signal.SIGTERM, previous)
