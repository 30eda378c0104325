"""Tool categories from command text, with the traces' precedence, checked against the traces'
own labels (their `cmd` keeps each command's first 64 characters)."""

from __future__ import annotations

import json

import pytest

from factories import TRACES
from mars.tools.category import categorize, is_cpu_heavy


@pytest.mark.parametrize(
    ("command", "category"),
    [
        ("python -m pytest tests/test_x.py -q", "test"),
        ("cd /work && python reproduce.py", "run_python"),
        ("pip install -e .", "build_install"),
        ("cat <<'EOF' > fix.py\nprint(1)\nEOF\npython fix.py", "run_python"),
        ("sed -i 's/a/b/' x.py", "edit"),
        ("grep -rn foo src", "search"),
        ("ls -la", "view"),
        ("git diff", "git"),
        ("echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && git add -A", "submit"),
        ("true", "other"),
    ],
)
def test_categories(command: str, category: str) -> None:
    assert categorize(command) == category


def test_cpu_heavy_categories() -> None:
    assert is_cpu_heavy("test") and is_cpu_heavy("run_python") and not is_cpu_heavy("view")


def test_agrees_with_the_traces_labels_on_bash_commands() -> None:
    pairs = []
    with open(TRACES, encoding="utf-8") as f:
        for line in f:
            for step in json.loads(line)["steps"]:
                if step["kind"] == "tool" and step.get("tool_name") == "bash" and step.get("cmd"):
                    pairs.append((step["cmd"], step["category"]))
    assert len(pairs) > 1000
    agree = sum(categorize(cmd) == cat for cmd, cat in pairs) / len(pairs)
    # Commands are cut at 64 characters, so a later clause may be missing: most, not all.
    assert agree > 0.8, agree
