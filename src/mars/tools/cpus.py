"""CPU lists as users type them (`"1"`, `"0-3,6"`), checked against the CPUs this process has."""

from __future__ import annotations

import os

from mars.core.errors import UsageError


def parse_cpu_list(text: str) -> list[int]:
    """The sorted CPUs of a list like `"1-3,5"` (the format of `taskset -c` and cpusets).

    Every CPU must be one this process may run on (`os.sched_getaffinity(0)`), so a typo fails
    at start-up instead of as a pinning error on the first tool run.
    """
    allowed = os.sched_getaffinity(0)
    valid = f"this process may use CPUs {format_cpu_list(sorted(allowed))}"
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        try:
            first = int(low)
            last = int(high) if dash else first
        except ValueError:
            raise UsageError(
                f"bad CPU list {text!r}: expected numbers and ranges like '1' or '0-3,6' ({valid})"
            ) from None
        if first < 0 or last < first:
            raise UsageError(
                f"bad CPU range {part!r} in {text!r}: write it as LOW-HIGH, LOW <= HIGH"
            )
        cpus.update(range(first, last + 1))
    missing = sorted(cpus - allowed)
    if missing:
        raise UsageError(f"CPU list {text!r}: no CPU {format_cpu_list(missing)} here ({valid})")
    return sorted(cpus)


def format_cpu_list(cpus: list[int]) -> str:
    """The shortest list text for `cpus` (sorted): `[0, 1, 2, 5]` -> `"0-2,5"`."""
    parts: list[str] = []
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)
