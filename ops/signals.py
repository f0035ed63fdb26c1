"""Blocking until an operator stops a command."""

from __future__ import annotations

import signal
import threading


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
