"""The event log: made before the run directory exists, it holds its records until it is
attached to its file; sinks mirror what is written after they are added, and close with it."""

from __future__ import annotations

import json

from retinaperf.report.events import EventLog


class Sink:
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.closed = False

    def write(self, record: dict) -> None:
        self.records.append(record)

    def close(self) -> None:
        self.closed = True


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_before_the_file_is_attached_are_written_first_in_order(tmp_path):
    log = EventLog(0.0)
    log.emit("early", n=1)
    log.emit("early", n=2)
    assert not (tmp_path / "events.jsonl").exists()
    log.attach(tmp_path / "events.jsonl")
    log.emit("late", n=3)
    log.close()
    assert [(r["event"], r["n"]) for r in lines(tmp_path / "events.jsonl")] == [
        ("early", 1),
        ("early", 2),
        ("late", 3),
    ]


def test_sinks_get_what_is_written_once_added_and_close_with_the_log(tmp_path):
    sink = Sink()
    with EventLog(0.0) as log:
        log.attach(tmp_path / "events.jsonl")
        log.emit("before")
        log.add_sink(sink)
        log.emit("after", value=1.5)
        assert not sink.closed
    assert [r["event"] for r in sink.records] == ["after"]
    assert sink.records[0]["value"] == 1.5
    assert sink.closed
    assert [r["event"] for r in lines(tmp_path / "events.jsonl")] == ["before", "after"]


def test_a_log_that_keeps_nothing_writes_no_file(tmp_path):
    """Every rank but the main one: its records go nowhere, and attaching opens no file."""
    with EventLog(0.0, keep=False) as log:
        log.emit("run_start")
        log.attach(tmp_path / "events.jsonl")
        log.emit("run_end")
    assert list(tmp_path.iterdir()) == []


def test_a_log_never_attached_leaves_nothing_behind(tmp_path):
    """A run refused before its directory was prepared: its records are dropped with it."""
    sink = Sink()
    log = EventLog(0.0)
    log.emit("run_failed", error="x")
    log.add_sink(sink)
    log.close()
    assert sink.closed and list(tmp_path.iterdir()) == []
