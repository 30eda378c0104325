"""`mars sim --events FILE`: the simulator's bus written as the JSON lines `mars serve --events`
writes (`mars.server.eventstream.EventStream`), one record per event: `{"event": kind, ...the
event's fields..., "ts": ...}`.

`time` is simulated seconds from the run's start (live: seconds since the server started). A
live record's `ts` is the Unix time it was written; a simulation has no wall clock of its own, so
here `ts` is the simulated time as well, and one seed's file is the same byte for byte on every
run. `mars timeline` reads `time` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import IO

from mars.core.errors import UsageError
from mars.core.events import Event, EventBus


class EventLog:
    """A bus handler appending each event to a JSONL file (truncated when opened)."""

    def __init__(self, path: Path, option: str = "--events") -> None:
        self.path = path
        self.count = 0
        try:
            self._file: IO[str] | None = path.open("w", encoding="utf-8")
        except OSError as e:
            raise UsageError(
                f"{option} {path}: cannot write ({e.strerror}); give a file in a writable directory"
            ) from None

    def attach(self, bus: EventBus) -> EventLog:
        bus.subscribe_all(self)
        return self

    def __call__(self, event: Event) -> None:
        if self._file is not None:
            record = {**event.to_json(), "ts": event.time}
            self._file.write(json.dumps(record) + "\n")
            self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
