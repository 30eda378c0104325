"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A `preexec_fn`: on Linux, the child gets SIGKILL when its parent dies, however it dies (a
    SIGTERM or SIGKILL runs no `finally`, so cleanup code alone leaves busy loops and servers
    running). PDEATHSIG fires when the thread that spawned the child ends: spawn from a thread
    that lives as long as the child should. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
