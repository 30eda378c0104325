"""A tool run's category from its command text, with the shared traces' classes and precedence
(`../shared/traces/README.md`): submit > test > build_install > run_python > edit > search > view
> git, else other. So live runs feed the same learned per-category duration distributions as the
traces, and `--record-trace` files say what the traces say."""

from __future__ import annotations

import re

from mars.sim.workload import CPU_HEAVY_CATEGORIES

_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("submit", r"\bsubmit\b|COMPLETE_TASK_AND_SUBMIT"),
        (
            "test",
            r"\bpytest\b|\bunittest\b|\btox\b|runtests|\bnose2?\b|"
            r"\b(make|npm|yarn|go|cargo|mvn|gradle)\s+test\b|\bctest\b",
        ),
        (
            "build_install",
            r"\b(pip|pip3|uv pip|conda|apt-get|apt|npm|yarn)\s+install\b|"
            r"setup\.py\s+(build|install|develop)|\bmake\b|\bcmake\b|\bcargo\s+build\b|"
            r"\bpython[0-9.]*\s+-m\s+build\b",
        ),
        ("run_python", r"\bpython[0-9.]*\b"),
        ("edit", r"\bsed\s+-i|\bcat\s*>|<<|\btee\b|>>|\bpatch\b|\becho\b.*>|\bapply_patch\b"),
        ("search", r"\b(grep|rg|egrep|fgrep|ag|ack|find|locate)\b"),
        ("view", r"\b(cat|head|tail|less|more|ls|nl|tree|wc|stat|file|pwd)\b|\bsed\s+-n\b"),
        ("git", r"\bgit\b"),
    )
)


def categorize(command: str) -> str:
    """The trace category of a shell command ("other" when no class matches)."""
    for name, pattern in _RULES:
        if pattern.search(command):
            return name
    return "other"


def is_cpu_heavy(category: str) -> bool:
    return category in CPU_HEAVY_CATEGORIES
