"""Small seeded coding tasks for real agents: each a tiny repo with a one-line bug and a test
script that exits non-zero until the bug is fixed.

A tasks directory holds one folder per task:

    DIR/<task id>/task.json   {"id": ..., "statement": ..., "check": "python3 test_x.py"}
    DIR/<task id>/repo/       the files the agent's workspace is seeded with

`generate_tasks(count, seed)` builds them from a few bug families (an off-by-one, a swapped
comparison, a wrong constant, ...), with names and test values drawn from `random.Random(seed)`,
so one seed is always the same task set; `write_tasks` puts them in a directory and `load_tasks`
reads any directory of that shape. Only the standard library is used: `mars.bench` generates
tasks before any agent framework is imported.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mars.core.errors import UsageError

TASK_FILE = "task.json"
REPO_DIR = "repo"


@dataclass(frozen=True)
class Task:
    task_id: str
    statement: str  # what the agent is told
    check: str  # a command run in the workspace: exit 0 when the task is solved
    files: dict[str, str]  # path in the repo -> content (empty for a loaded task)
    repo: Path | None = None  # where the repo lies on disk (set by write_tasks and load_tasks)


@dataclass(frozen=True)
class _Bug:
    """One family: the module's code with the bug, its test, and a hint for the statement."""

    module: str
    function: str
    code: str
    test: str
    hint: str


def _mean(rng: random.Random) -> _Bug:
    values = [rng.randint(1, 20) for _ in range(rng.randint(3, 6))]
    fn = rng.choice(["mean", "average", "avg"])
    return _Bug(
        rng.choice(["stats", "numbers", "metrics"]),
        fn,
        f"def {fn}(values):\n    return sum(values) / (len(values) + 1)\n",
        f"assert {fn}({values}) == {sum(values) / len(values)!r}, {fn}({values})\n",
        f"{fn}() returns the wrong average",
    )


def _clamp(rng: random.Random) -> _Bug:
    lo, hi = rng.randint(0, 10), rng.randint(20, 40)
    x = hi + rng.randint(1, 9)
    return _Bug(
        rng.choice(["bounds", "limits", "ranges"]),
        "clamp",
        "def clamp(x, lo, hi):\n    return max(lo, max(x, hi))\n",
        f"assert clamp({x}, {lo}, {hi}) == {hi}, clamp({x}, {lo}, {hi})\n"
        f"assert clamp({lo - 1}, {lo}, {hi}) == {lo}, clamp({lo - 1}, {lo}, {hi})\n",
        "clamp() does not keep values below the upper bound",
    )


def _even(rng: random.Random) -> _Bug:
    n = 2 * rng.randint(1, 50)
    fn = rng.choice(["is_even", "even"])
    return _Bug(
        rng.choice(["parity", "checks", "predicates"]),
        fn,
        f"def {fn}(n):\n    return n % 2 == 1\n",
        f"assert {fn}({n})\nassert not {fn}({n + 1})\n",
        f"{fn}() answers the opposite of what it should",
    )


def _factorial(rng: random.Random) -> _Bug:
    n = rng.randint(4, 8)
    value = 1
    for k in range(1, n + 1):
        value *= k
    return _Bug(
        rng.choice(["combinatorics", "mathutil", "series"]),
        "factorial",
        "def factorial(n):\n    out = 1\n    for k in range(1, n):\n        out *= k\n"
        "    return out\n",
        f"assert factorial({n}) == {value}, factorial({n})\n",
        "factorial() leaves out the last factor",
    )


def _words(rng: random.Random) -> _Bug:
    words = rng.sample(["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"], 3)
    text = " ".join(words)
    return _Bug(
        rng.choice(["text", "strings", "wordutil"]),
        "reverse_words",
        'def reverse_words(text):\n    return "".join(reversed(text.split()))\n',
        f"assert reverse_words({text!r}) == {' '.join(reversed(words))!r}, "
        f"reverse_words({text!r})\n",
        "reverse_words() loses the spaces between words",
    )


def _fahrenheit(rng: random.Random) -> _Bug:
    c = 5 * rng.randint(-4, 20)
    return _Bug(
        rng.choice(["convert", "units", "temperature"]),
        "to_fahrenheit",
        "def to_fahrenheit(celsius):\n    return celsius * 9 / 5 + 23\n",
        f"assert to_fahrenheit({c}) == {c * 9 / 5 + 32!r}, to_fahrenheit({c})\n",
        "to_fahrenheit() is off by a constant",
    )


FAMILIES: tuple[Callable[[random.Random], _Bug], ...] = (
    _mean,
    _clamp,
    _even,
    _factorial,
    _words,
    _fahrenheit,
)


def generate_tasks(count: int, seed: int) -> list[Task]:
    """`count` tasks drawn with `seed`: the families in a seeded order, names and values too."""
    if count < 1:
        raise UsageError(f"a task set needs at least one task, not {count}")
    rng = random.Random(seed)
    order = list(FAMILIES)
    rng.shuffle(order)
    tasks = []
    for i in range(count):
        bug = order[i % len(order)](rng)
        test_file = f"test_{bug.module}.py"
        test = f"from {bug.module} import {bug.function}\n\n{bug.test}print('all tests passed')\n"
        files = {
            f"{bug.module}.py": bug.code,
            test_file: test,
            "README.md": f"# {bug.module}\n\n`python3 {test_file}` exits 0 when all is well.\n",
        }
        statement = (
            f"`python3 {test_file}` fails in the current directory: {bug.hint}. Fix "
            f"{bug.module}.py (one line) so that `python3 {test_file}` exits 0. Do not edit "
            f"{test_file}."
        )
        tasks.append(
            Task(f"s{seed}-t{i:02d}-{bug.module}", statement, f"python3 {test_file}", files)
        )
    return tasks


def write_tasks(tasks: Sequence[Task], root: Path) -> list[Task]:
    """Write each task under `root` (a task folder already there is replaced); returns them with
    `repo` set."""
    written = []
    for task in tasks:
        folder = root / task.task_id
        repo = folder / REPO_DIR
        repo.mkdir(parents=True, exist_ok=True)
        for name, content in task.files.items():
            (repo / name).write_text(content)
        meta = {"id": task.task_id, "statement": task.statement, "check": task.check}
        (folder / TASK_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        written.append(Task(task.task_id, task.statement, task.check, task.files, repo.resolve()))
    return written


def load_tasks(root: Path) -> list[Task]:
    """Every `root/*/task.json` with its `repo/` folder, in name order."""
    if not root.is_dir():
        raise UsageError(f"--tasks {root}: not a directory (give a tasks directory or 'builtin')")
    tasks = []
    for meta_path in sorted(root.glob(f"*/{TASK_FILE}")):
        try:
            meta = json.loads(meta_path.read_text())
            task = Task(str(meta["id"]), str(meta["statement"]), str(meta["check"]), {})
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(
                f"{meta_path}: expected a JSON object with id, statement and check ({e})"
            ) from None
        repo = meta_path.parent / REPO_DIR
        if not repo.is_dir():
            raise UsageError(f"{meta_path.parent}: no {REPO_DIR}/ folder to seed the workspace")
        tasks.append(Task(task.task_id, task.statement, task.check, {}, repo.resolve()))
    if not tasks:
        raise UsageError(
            f"--tasks {root}: no */{TASK_FILE} in it (format: DIR/<id>/{TASK_FILE} with id, "
            f"statement, check, and DIR/<id>/{REPO_DIR}/)"
        )
    return tasks
