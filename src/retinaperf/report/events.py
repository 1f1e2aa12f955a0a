"""The event log: one JSON object per line, append-only, the source of truth every other view
(console, TensorBoard, plots, report) reads; and the sinks that mirror it."""

from __future__ import annotations

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

    Only the main rank writes; on other ranks `path` is None and `emit` does nothing. Sinks (e.g.
    TensorBoard, created on the main rank only) receive every record written: other views of
    the same numbers.
    """

    def __init__(
        self, path: Path | None, command_start: float, sinks: tuple[EventSink, ...] = ()
    ) -> None:
        self.command_start = command_start
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path else None
        self._sinks = sinks

    def emit(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"event": event, "time": round(time.perf_counter() - self.command_start, 6)}
        record.update(fields)
        self._file.write(json.dumps(record, default=jsonable) + "\n")
        self._file.flush()
        for sink in self._sinks:
            sink.write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for sink in self._sinks:
            sink.close()
        self._sinks = ()


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
