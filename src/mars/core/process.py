"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
# Looked up here, not in the child: loading a library between fork and exec can deadlock.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """A `preexec_fn`: on Linux, the child gets SIGKILL when its parent dies, however it dies (a
    SIGTERM or SIGKILL runs no `finally`, so cleanup code alone leaves busy loops and servers
    running). PDEATHSIG fires when the thread that spawned the child ends: spawn from a thread
    that lives as long as the child should. Elsewhere a no-op."""
    if _prctl is None:
        return
    parent = os.getppid()
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0 or os.getppid() != parent:
        os._exit(1)  # no parent-death signal, or the parent died while it was being set
