"""The energy of a run's phases (training, evaluation), from the hardware's cumulative counters.

A power reading is an average over a short window, and the monitor takes one every few seconds,
so integrating power misses what happens between samples. Energy counters add up every joule
instead: the difference of two readings is the energy between them, however short or uneven the
load. So the run reads each counter at the boundaries of its phases and adds each interval to the
phase it was in: the meter, whose windows are those phases (`Meter.train_started`,
`Meter.evaluation`, `Meter.stopped`), tells `RunEnergy.enter` where each begins.

Counters:
- the device's, from its plug-in (measure/devices/): NVML's per NVIDIA GPU counts millijoules
  since the driver loaded, 64 bits, so it does not wrap in practice (Volta and newer GPUs have
  one; it covers the whole board); amdsmi's per AMD GPU; a vendor plug-in's.
- RAPL's per CPU package (energy_counters.py, `rapl_counters`), through Linux's powercap files:
  microjoules that wrap at `max_energy_range_uj`, every few minutes to an hour at full load.
  Two readings tell one wrap from none but not two from one, so read the phase under way more
  often than that (`RunEnergy.read` at each logged step only splits the interval).
  Intel CPUs, and AMD ones through the same driver, both appear as `intel-rapl:N`. DRAM and the
  rest of the host are not counted.

A counter is an extra that must never stop a benchmark: where there is none the functions return
the reason as a sentence for the report, and a reading that fails or goes backwards without a
known wrap (the driver reloaded) loses only its intervals, counted in `lost_intervals`, so that
totals are then known to be a lower bound. Without a counter, `integrate_power` estimates the same
per-phase energy from the monitor's power samples.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from retinaperf.measure.devices.base import Counter
from retinaperf.measure.energy_counters import POWERCAP, rapl_counters


class Phase(StrEnum):
    """A part of the run whose energy is counted apart; its value names it in the results."""

    TRAIN = "train"
    EVAL = "eval"


class PhaseEnergy:
    """One counter's joules per phase: `count(phase)` reads it and adds the energy since the
    previous reading to the phase that interval was in (`RunEnergy` calls it at each boundary).
    """

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.totals: dict[str, float] = {}  # only phases with a counted interval
        self.lost_intervals = 0  # intervals of unknown energy: totals are then a lower bound
        self._last: float | None = None  # the previous reading; None: no start to count from

    def count(self, phase: Phase | None) -> None:
        """Read the counter and add the energy since the previous reading to `phase`, the one
        the interval was in (None: in none, as before training starts)."""
        now = self.counter.read()
        last, self._last = self._last, now
        if phase is None:
            return
        if last is None or now is None:
            self.lost_intervals += 1
            return
        increase = now - last
        if increase < 0:
            if self.counter.wrap_j is None:
                # It started again from 0 (the driver reloaded): what it counted before is gone.
                self.lost_intervals += 1
                return
            increase = self.counter.wrap_j - last + now
        self.totals[phase.value] = self.totals.get(phase.value, 0.0) + increase

    def summary(self) -> dict:
        return {
            "label": self.counter.label,
            "source": self.counter.source,
            "train_j": self.totals.get("train"),
            "eval_j": self.totals.get("eval"),
            "complete": self.lost_intervals == 0,
        }

    def state_dict(self) -> dict:
        """The totals so far, for a checkpoint. Not the last reading: a resumed process reads
        afresh at its train start, and the time between processes counts in no phase."""
        return {"totals": dict(self.totals), "lost_intervals": self.lost_intervals}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's totals."""
        self.totals = {phase: float(joules) for phase, joules in state["totals"].items()}
        self.lost_intervals = int(state["lost_intervals"])


def integrate_power(
    samples: list[tuple[float, float | None]], windows: list[tuple[float, float, str]]
) -> dict[str, float] | None:
    """Joules per phase from power samples (time in s, W; None readings are skipped), where there
    is no counter: power is taken as linear between samples and as the nearest sample's outside
    them, and integrated over each window (start, end, phase). None with fewer than two readings.
    """
    readings = sorted((t, watts) for t, watts in samples if watts is not None)
    if len(readings) < 2:
        return None
    times = [t for t, _ in readings]
    # cumulative[i]: joules from the first sample to sample i, by trapezoids.
    cumulative = [0.0]
    for (t0, p0), (t1, p1) in itertools.pairwise(readings):
        cumulative.append(cumulative[-1] + (t1 - t0) * (p0 + p1) / 2)

    def energy_until(t: float) -> float:
        """Joules from the first sample to `t` (negative before it)."""
        if t <= times[0]:
            return (t - times[0]) * readings[0][1]
        if t >= times[-1]:
            return cumulative[-1] + (t - times[-1]) * readings[-1][1]
        i = bisect.bisect_right(times, t) - 1  # times[i] <= t < times[i + 1]
        (t0, p0), (t1, p1) = readings[i], readings[i + 1]
        power = p0 + (p1 - p0) * (t - t0) / (t1 - t0)
        return cumulative[i] + (t - t0) * (p0 + power) / 2

    energy: dict[str, float] = {}
    for start, end, phase in windows:
        if end < start:
            raise ValueError(f"the {phase!r} window ends ({end}) before it starts ({start})")
        energy[phase] = energy.get(phase, 0.0) + energy_until(end) - energy_until(start)
    return energy


# --- A rank's counters over a run, and the job's figures ------------------------------------------


class RunEnergy:
    """This rank's counters over a run: its device's (from the device's plug-in: `counter`, or
    None and `reason`) and, on one rank per node, the CPU packages' (RAPL); and the phase windows
    (seconds since command start), to integrate a device's sampled power where it has no
    counter (`sampled_by` names where those samples come from). The meter says where each phase
    begins (`enter`); `read` adds the phase under way so far."""

    def __init__(
        self,
        counter: Counter | None,
        reason: str | None,
        read_host: bool,
        clock: Callable[[], float],
        command_start: float,
        rapl_root: Path | None = None,
        sampled_by: str | None = None,
    ) -> None:
        self.device = PhaseEnergy(counter) if counter is not None else None
        self.device_reason = reason
        self.sampled_by = sampled_by
        self.reads_host = read_host  # one rank per node: the packages serve every rank on it
        self.host: list[PhaseEnergy] = []
        self.host_reason: str | None = None
        if read_host:
            counters, self.host_reason = rapl_counters(rapl_root or POWERCAP)
            self.host = [PhaseEnergy(counter) for counter in counters]
        self.windows: list[tuple[float, float, str]] = []
        self.current: Phase | None = None
        """The phase under way; None before training and after a stop."""
        self._clock = clock
        self._command_start = command_start
        self._phase_start = 0.0

    def _counters(self) -> list[PhaseEnergy]:
        return ([self.device] if self.device is not None else []) + self.host

    def enter(self, phase: Phase | None) -> None:
        """The interval since the last reading goes to the phase under way, and `phase` is under
        way from now (None: none, as after a stop). Nothing to do without a phase on either
        side (a run stopping before it trained)."""
        if self.current is None and phase is None:
            return
        self._count()
        self.current = phase

    def read(self) -> None:
        """The interval since the last reading goes to the phase under way, which goes on: often
        enough that a RAPL counter cannot wrap twice unseen, and before a checkpoint, so that it
        holds the energy so far."""
        if self.current is not None:
            self._count()

    def _count(self) -> None:
        """Every counter read, and the window of the phase under way extended to now."""
        now = self._clock() - self._command_start
        for counter in self._counters():
            counter.count(self.current)
        phase = self.current
        if phase is not None:
            if self.windows and self.windows[-1][1:] == (self._phase_start, phase.value):
                self.windows[-1] = (self.windows[-1][0], now, phase.value)  # the same goes on
            else:
                self.windows.append((self._phase_start, now, phase.value))
        self._phase_start = now

    def state_dict(self) -> dict:
        return {
            "device": self.device.state_dict() if self.device is not None else None,
            "host": [counter.state_dict() for counter in self.host],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's totals, where this process has the same counters."""
        if self.device is not None and state["device"] is not None:
            self.device.load_state_dict(state["device"])
        if len(self.host) == len(state["host"]):
            for counter, saved in zip(self.host, state["host"], strict=True):
                counter.load_state_dict(saved)

    def summary(self) -> dict:
        """What rank 0 needs of this rank for the job's figures (see `job_energy`)."""
        return {
            "device": self.device.summary() if self.device is not None else None,
            "device_reason": self.device_reason,
            "sampled_by": self.sampled_by,
            "reads_host": self.reads_host,
            "host": [counter.summary() for counter in self.host],
            "host_reason": self.host_reason,
            "windows": list(self.windows),
        }

    def close(self) -> None:
        for counter in self._counters():
            counter.counter.close()


def integrated(sampled_by: str | None) -> str:
    """The source of an energy figure integrated from the monitor's power samples."""
    return f"{sampled_by or 'device'} power samples, integrated"


def job_energy(
    ranks: list[dict],
    samples: list[dict],
    host_is_device: bool,
    trained_images: int,
    train_seconds: float,
    segments: int,
    expected_devices: int,
) -> dict:
    """The job's energy from every rank's `{"host", "uuid", "energy": RunEnergy.summary()}` and
    the monitor's samples: per device (GPUs: their counters, else their integrated power samples;
    a CPU device: its host's RAPL packages), their sums, images per joule of training, the mean
    power per device while training (without evaluation), and the source of each figure. A sum
    is null, never 0 or a part, when a device has no figure; `energy_note` says why.
    `host_is_device`: the device is the host's CPU (its plug-in's `energy_is_host`).

    `train_seconds` is the training time without evaluation; `segments` the run's segments (the
    monitor's samples cover only the last, so power is integrated only for a run of one);
    `expected_devices` the job's devices (accelerators: ranks; a CPU: nodes): a failed run
    gathers only rank 0's view, and the devices it lacks have no figure."""
    if host_is_device:
        devices = [_host_device(rank) for rank in ranks if rank["energy"]["reads_host"]]
    else:
        devices = [_accelerator(rank, samples, segments) for rank in ranks]
    devices += [
        _missing(f"device {index}", "not read: the run failed before the ranks' figures met")
        for index in range(len(devices), expected_devices)
    ]
    hosts = [
        {"host": rank["host"], **_sum(rank["energy"]["host"])}
        for rank in ranks
        if rank["energy"]["host"] and not host_is_device
    ]
    missing = [d for d in devices if d["train_j"] is None]
    train, evaluation = _total(devices, "train_j"), _total(devices, "eval_j")
    return {
        "energy_train_j": train,
        "energy_eval_j": evaluation,
        "images_per_joule": trained_images / train if train else None,
        "power_train_w": train / len(devices) / train_seconds
        if train and train_seconds > 0
        else None,
        "energy_source": "; ".join(sorted({d["source"] for d in devices if d["source"]})) or None,
        "energy_note": "; ".join(sorted({d["reason"] for d in missing})) or None,
        "energy": {"devices": devices, "hosts": hosts},
    }


def _accelerator(rank: dict, samples: list[dict], segments: int) -> dict:
    energy, label = rank["energy"], rank["uuid"]
    counted = energy["device"]
    if counted is not None and counted["train_j"] is not None:
        return {"host": rank["host"], **counted, "reason": None}
    power = [
        (sample["time"], device.get("power_w"))
        for sample in samples
        if sample["host"] == rank["host"]
        for device in sample.get("devices", [])
        if label and device.get("uuid") == label
    ]
    joules = integrate_power(power, energy["windows"]) if segments == 1 and label else None
    if joules is None or "train" not in joules:
        why = energy["device_reason"] or "its counter gave no reading while training"
        if segments > 1:
            why += " (power samples cover only the last segment of a resumed run)"
        else:
            why += ", and the monitor sampled no power for it"
        return _missing(rank["host"], why, label)
    return {
        "host": rank["host"],
        "label": label,
        "source": integrated(energy.get("sampled_by")),
        "train_j": joules.get("train"),
        "eval_j": joules.get("eval"),
        "complete": True,
        "reason": None,
    }


def _host_device(rank: dict) -> dict:
    """A CPU device's energy: its host's packages, summed."""
    energy = rank["energy"]
    if not energy["host"]:
        return _missing(rank["host"], energy["host_reason"])
    return {"host": rank["host"], "label": "CPU packages", **_sum(energy["host"]), "reason": None}


def _sum(packages: list[dict]) -> dict:
    return {
        "source": packages[0]["source"],
        "train_j": _total(packages, "train_j"),
        "eval_j": _total(packages, "eval_j"),
        "complete": all(p["complete"] for p in packages),
    }


def _total(rows: list[dict], key: str) -> float | None:
    """The sum of `key` over rows; None, not a part, when one of them has none."""
    values = [row[key] for row in rows]
    return None if any(value is None for value in values) else sum(values)


def _missing(host: str, reason: str | None, label: str | None = None) -> dict:
    return {
        "host": host,
        "label": label,
        "source": None,
        "train_j": None,
        "eval_j": None,
        "complete": False,
        "reason": f"{host}: {reason}",
    }
