"""Ctrl-C and SIGTERM, turned into an exception at safe points only.

Python raises KeyboardInterrupt wherever the main thread happens to be, including inside a database
write of the tracking store, which can leave that write's lock held and the cleanup unable to mark runs
KILLED. So the handlers only record the signal; `check()` raises it between batches, epochs and
configurations. A second signal raises at once.
"""

from __future__ import annotations

import signal

_received: int | None = None


class Interrupted(KeyboardInterrupt):
    """Raised by `check()` after SIGINT or SIGTERM; `exit_code` is 130 or 143."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def _record(signum: int, frame: object) -> None:
    global _received
    if _received is not None:
        raise Interrupted(signum)
    _received = signum


def install() -> None:
    """Record SIGINT and SIGTERM instead of raising wherever the program happens to be."""
    signal.signal(signal.SIGINT, _record)
    signal.signal(signal.SIGTERM, _record)


def check() -> None:
    """Raise `Interrupted` if a signal arrived: call this only where stopping is safe."""
    if _received is not None:
        raise Interrupted(_received)
