"""The event log: one JSON object per line, append-only, the source of truth every other view
(console, TensorBoard, plots, report) reads; and the sinks that mirror it."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import IO, Any, Protocol

from retinaperf.errors import UserError
from retinaperf.files import jsonable

EVENTS = "events.jsonl"


MONITOR = "monitor.jsonl"


class EventLog:
    """Append-only JSON lines, one object per event, flushed as written (a crash keeps the log).

    Made first, before anything it records, and handed to everything that reports events. Only
    the main rank writes (`keep`); other ranks' logs drop every record. Until `attach` gives it
    its file (once the run directory is prepared: a run refused before then leaves no folder),
    the main rank's log holds its records, and writes them there first. Sinks (the MLPerf log,
    TensorBoard), added on the main rank, receive every record from then on: other views of the
    same numbers; the log closes them.
    """

    def __init__(self, command_start: float, keep: bool = True) -> None:
        self.command_start = command_start
        self._keep = keep
        self._held: list[dict] = []
        self._file: IO[str] | None = None
        self._sinks: list[EventSink] = []

    def attach(self, path: Path) -> None:
        """Write to `path` from now on, starting with the records held so far."""
        if not self._keep:
            return
        self._file = open(path, "a", encoding="utf-8")
        held, self._held = self._held, []
        for record in held:
            self._write(record)

    def add_sink(self, sink: EventSink) -> None:
        """Mirror every record from now on to `sink`, owned (closed) by the log from now on."""
        self._sinks.append(sink)

    def emit(self, event: str, **fields: Any) -> None:
        if not self._keep:
            return
        record = {"event": event, "time": round(time.perf_counter() - self.command_start, 6)}
        record.update(fields)
        if self._file is None:
            self._held.append(record)
            return
        self._write(record)
        for sink in self._sinks:
            sink.write(record)

    def _write(self, record: dict) -> None:
        assert self._file is not None
        self._file.write(json.dumps(record, default=jsonable) + "\n")
        self._file.flush()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file and the sinks; records held for a file never attached are dropped
        with the run that was refused before it had a directory."""
        if self._file is not None:
            self._file.close()
            self._file = None
        sinks, self._sinks = self._sinks, []
        with contextlib.ExitStack() as closing:  # every sink, even after one fails to close
            for sink in sinks:
                closing.callback(sink.close)


class EventSink(Protocol):
    def write(self, record: dict) -> None: ...
    def close(self) -> None: ...


def require_tensorboard() -> type:
    """torch's SummaryWriter, or a UserError saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "tensorboard=true needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter


class TensorBoardSink:
    """TensorBoard scalars of the event log: losses, lr and images/s per logged step, the COCO
    stats per evaluation, keyed by optimizer step."""

    BOOKKEEPING = frozenset({"event", "time", "epoch", "step", "seconds", "detections"})

    def __init__(self, log_dir: Path) -> None:
        self._writer = require_tensorboard()(str(log_dir))

    def write(self, record: dict) -> None:
        group = {"step": "train", "eval": "eval"}.get(record["event"])
        if group is None:
            return
        for key, value in record.items():
            if key not in self.BOOKKEEPING and isinstance(value, (int, float)):
                self._writer.add_scalar(f"{group}/{key}", value, global_step=record["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_events(path: Path) -> list[dict]:
    """The records of a JSON-lines file (the event log or the monitor's samples)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise UserError(f"report: {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise UserError(f"report: {path} is not JSON lines ({err})") from None


def read_monitor(run_dir: Path) -> list[dict] | None:
    """The monitor's samples of a run, or None when it recorded none."""
    path = Path(run_dir) / MONITOR
    return read_events(path) if path.exists() else None
