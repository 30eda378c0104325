"""`--record-trace FILE`: live traffic written in the trace format (`../shared/traces/README.md`).

Each session that ends becomes one trajectory line: its LLM calls (prompt, output and cached
tokens) and the tool phases between them (measured durations; the category of a tool run through
the tools API, else the agent's `last_func_call` marker, else "unknown"). The file replays in
`mars sim` and `mars sweep` unchanged, so a fleet's own traffic can be studied at GPU scale.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import IO, Any

from mars.core.session import Session
from mars.tools.category import is_cpu_heavy


def trajectory(session: Session, model: str) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    for turn in session.turns:
        req = turn.request
        if req.first_token_time is None and req.num_output_tokens == 0:
            continue  # aborted before it produced anything: not a call the agent saw answered
        steps.append(
            {
                "kind": "llm",
                "prompt_tokens": req.num_prompt_tokens,
                "output_tokens": req.num_output_tokens,
                "cached_tokens": max(0, req.num_cached_tokens),
                "duration_s": _span(req.arrival_time, req.finish_time),
            }
        )
        for tool in turn.tools:
            if tool.end_time is None:
                continue
            steps.append(
                {
                    "kind": "tool",
                    "tool_name": tool.category,
                    "category": tool.category,
                    "cpu_heavy": is_cpu_heavy(tool.category),
                    "duration_s": round(tool.end_time - tool.start_time, 6),
                }
            )
    return {
        "traj_id": f"mars-live/{session.session_id}",
        "framework": "mars-live",
        "model": model,
        "api_calls": sum(1 for s in steps if s["kind"] == "llm"),
        "provenance": {"tokens": "measured (mars serve)", "tool_duration": "measured"},
        "steps": steps,
    }


def _span(start: float, end: float | None) -> float | None:
    return None if end is None else round(end - start, 6)


class TraceRecorder:
    """Session-end hook appending one trajectory per ended session (sessions without an
    answered call are skipped: the trace format needs an llm step)."""

    def __init__(self, path: Path, model: str) -> None:
        try:
            self._file: IO[str] = path.open("a", encoding="utf-8", buffering=1)
        except OSError as e:
            raise ValueError(f"--record-trace {path}: cannot write ({e.strerror})") from None
        self._model = model
        self._lock = threading.Lock()
        self.written = 0

    def __call__(self, session: Session) -> None:
        record = trajectory(session, self._model)
        if not record["api_calls"]:
            return
        with self._lock:
            self._file.write(json.dumps(record) + "\n")
            self.written += 1

    def close(self) -> None:
        self._file.close()
