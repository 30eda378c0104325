"""The torch-free packages import, and simulate, with every heavy or server module blocked.

DESIGN.md section 3: `core`, `kv`, `sched`, `control`, `sim` (and `bench`) import only the
standard library. numpy would be allowed, but nothing uses it, so it is blocked too: a new import of
it should be a decision, not an accident. Each check runs in a fresh interpreter, where nothing
has been imported yet, with a `sys.meta_path` finder in front that refuses the blocked names.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from factories import TRACES

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = (
    "torch",
    "llama_cpp",
    "fastapi",
    "uvicorn",
    "starlette",
    "httpx",
    "aiohttp",
    "requests",
    "vllm",
    "numpy",
    "pydantic",
    "transformers",
    "triton",
)
TORCH_FREE = ("mars.core", "mars.kv", "mars.sched", "mars.control", "mars.sim", "mars.bench")

BLOCKER = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = set(sys.argv[1].split(","))

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked by test_imports")
            return None

    already = sorted(n for n in sys.modules if n.partition(".")[0] in BLOCKED)
    assert not already, f"imported before the blocker was installed: {already}"
    sys.meta_path.insert(0, Blocker())
    """
)


def run_blocked(body: str, blocked: tuple[str, ...] = BLOCKED) -> subprocess.CompletedProcess[str]:
    code = BLOCKER + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", code, ",".join(blocked)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_the_block_refuses_blocked_modules() -> None:
    # csv is always installed: refusing it shows the finder, not a missing package, says no.
    run_blocked(
        """
        for name in ("torch", "torch.nn", "numpy", "csv"):
            try:
                __import__(name)
            except ImportError as e:
                assert "blocked by test_imports" in str(e), e
            else:
                raise AssertionError(f"{name} imported under the block")
        import json  # anything else still imports
        """,
        blocked=(*BLOCKED, "csv"),
    )


def test_torch_free_packages_import_with_heavy_modules_blocked() -> None:
    proc = run_blocked(
        f"""
        import importlib
        import pkgutil

        def failed(name):
            raise  # the ImportError walk_packages caught while importing `name`

        names = []
        for top in {TORCH_FREE!r}:
            package = importlib.import_module(top)
            names.append(top)
            for info in pkgutil.walk_packages(package.__path__, top + ".", onerror=failed):
                importlib.import_module(info.name)
                names.append(info.name)
        loaded = sorted(n for n in sys.modules if n.partition(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("\\n".join(names))
        """
    )
    imported = set(proc.stdout.split())
    # The walk really went down into the packages, policies included.
    assert {"mars.sched.policies", "mars.sched.policies.fcfs", "mars.sim.run"} <= imported
    assert len(imported) > len(TORCH_FREE) + 10, sorted(imported)


@pytest.mark.skipif(not TRACES.is_file(), reason=f"no trace file at {TRACES}")
def test_tiny_simulation_runs_with_heavy_modules_blocked() -> None:
    proc = run_blocked(
        f"""
        from mars.sim.experiment import SimSpec, run_experiment

        spec = SimSpec(
            traces={str(TRACES)!r}, policy="fcfs", concurrency=2, sessions=3, token_scale=0.1
        )
        result = run_experiment(spec)
        assert result["sessions"] == 3, result["sessions"]
        assert result["completed"] + result["rejected"] == 3
        loaded = sorted(n for n in sys.modules if n.partition(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("completed", result["completed"])
        """
    )
    assert proc.stdout.startswith("completed ")
