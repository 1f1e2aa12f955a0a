"""The host's cumulative energy counters: RAPL's per CPU package (Linux powercap), read on every
run whatever its device (a device's own counter comes from its plug-in, measure/devices/). Where
there is none, `rapl_counters` gives the reason as a sentence for the report; a reading that
fails gives None (see energy.py for how the run uses them)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from retinaperf.measure.devices.base import Counter

POWERCAP = Path("/sys/class/powercap")


# Top-level RAPL domains only: "intel-rapl:0:0" (core, uncore, dram) are parts of a package, and
# "intel-rapl-mmio:0" counts the same package again through another interface.
_RAPL_DOMAIN = re.compile(r"^intel-rapl:(\d+)$")


@dataclass
class RaplCounter:
    """A RAPL domain's counter, read from its powercap `energy_uj` file."""

    label: str
    path: Path
    wrap_j: float | None
    source: str = "RAPL package energy (powercap)"

    def read(self) -> float | None:
        try:
            return int(self.path.read_text()) / 1e6  # µJ
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        """Holds nothing."""


def rapl_counters(root: Path = POWERCAP) -> tuple[list[Counter], str | None]:
    """The counters of the CPU packages, or ([], why there are none). All or none: the energy of
    some of the packages would pass for the CPUs'."""
    domains = []
    if root.is_dir():
        for folder in root.iterdir():
            match = _RAPL_DOMAIN.match(folder.name)
            name = _text(folder / "name")
            if match and name.startswith("package"):
                domains.append((int(match.group(1)), name, folder))
    if not domains:
        return [], (
            f"no RAPL package domain under {root}: this kernel or machine (e.g. a container or "
            "VM) exposes no CPU energy counter"
        )
    counters: list[Counter] = []
    for _, name, folder in sorted(domains):
        energy = folder / "energy_uj"
        try:
            int(energy.read_text())  # one trial reading decides access
        except PermissionError as exc:
            return [], (
                f"cannot read {energy} ({exc.strerror}): since Linux 5.10 only root can; run as "
                "root or make it readable"
            )
        except OSError as exc:
            return [], f"cannot read {energy} ({exc.strerror})"
        except ValueError:
            return [], f"cannot read {energy}: it does not hold a whole number of µJ"
        wrap_uj = _text(folder / "max_energy_range_uj")
        # Without its range a wrap looks like a reset: that interval is lost, not miscounted.
        wrap_j = int(wrap_uj) / 1e6 if wrap_uj.isdigit() else None
        counters.append(RaplCounter(name, energy, wrap_j))
    return counters, None


def _text(path: Path) -> str:
    """The file's text, stripped; "" where it cannot be read."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""
