"""Blocking until an operator stops a command; children that end with their parent."""

from __future__ import annotations

import ctypes
import signal
import sys
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def wait_for_stop() -> int:
    """Block until SIGINT (Ctrl-C) or SIGTERM, and return it. Both are handled here, so they stop the
    command also where the shell started it with SIGINT ignored (a background job of a script)."""
    stop: list[int] = []
    stopped = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        stop.append(signum)
        stopped.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stopped.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return stop[0]


def with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when its parent dies; None elsewhere.

    prctl is looked up here, in the parent: the child only makes the call, between fork and exec.
    The signal comes when the thread that started the child ends: start such children from a
    thread that lives as long as they should (the supervisor's workers, a test session's broker:
    from the main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sigterm = int(signal.SIGTERM)
    return lambda: prctl(PR_SET_PDEATHSIG, sigterm)
