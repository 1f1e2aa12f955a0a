"""Memory: this process's peak on its device (the allocator's, or the resident set on a CPU), and
The `mem` of docs/metrics.md from every rank's peak and the driver's view."""

from __future__ import annotations

import os
import resource
import sys

import torch

from retinaperf.errors import UserError
from retinaperf.units import GIB


def peak_resident_bytes() -> int:
    """This process's peak resident set: Linux's VmHWM, else getrusage's ru_maxrss.

    ru_maxrss survives exec on Linux: a process started by a large one (a launcher, a benchmark
    holding gigabytes) reports at least the parent's resident set at the fork. VmHWM is the
    high-water mark of this program's own memory."""
    high_water = _status_bytes("VmHWM")
    if high_water is not None:
        return high_water
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024  # macOS: bytes; Linux: KiB


def memory_peak(device: torch.device) -> dict[str, float | str]:
    """This process's peak memory and the device's capacity, GiB.

    Accelerators: the caching allocator's peak reserved bytes (what the process holds on the
    device; allocated tensors are a subset) over the device's total. CPU: the peak resident set
    over the machine's RAM.
    """
    if device.type == "cpu":
        peak = peak_resident_bytes()
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return {"used": peak / GIB, "total": total / GIB, "source": "peak resident set / RAM"}
    _free, total = torch.accelerator.get_memory_info(device)
    return {
        "used": torch.accelerator.max_memory_reserved(device) / GIB,
        "allocated": torch.accelerator.max_memory_allocated(device) / GIB,
        "total": total / GIB,
        "source": "allocator peak reserved / device total",
    }


def memory(
    peaks: list[dict], driver: tuple[float, float] | None, driver_view: str | None = None
) -> dict:
    """docs/metrics.md's `mem` from every rank's `memory_peak`: the largest, from both views,
    labelled.

    `mem` (the table's column) is the driver's view when the monitor read it (e.g. NVML: memory
    used on the device by every context, what nvidia-smi shows, like the seed's table), labelled
    `driver_view` (the device plug-in's `memory_view`), else the processes' view.
    """
    process_used = max(p["used"] for p in peaks)
    total = peaks[0]["total"]
    shown_used, shown_total = driver if driver else (process_used, total)
    return {
        "mem": f"{shown_used:.1f}/{shown_total:.1f}",
        "mem_used_gib": shown_used,
        "mem_total_gib": shown_total,
        "mem_source": (driver_view or "driver peak used / device total")
        if driver
        else peaks[0]["source"],
        "mem_process": f"{process_used:.1f}/{total:.1f}",
        "mem_process_source": peaks[0]["source"],
        "mem_driver": f"{driver[0]:.1f}/{driver[1]:.1f}" if driver else None,
        "mem_per_rank_gib": [p["used"] for p in peaks],
    }


def driver_peak(devices: list[dict], ids: list[str | None]) -> tuple[float, float] | None:
    """(peak used, total) GiB of the job's busiest device in the monitor's summary, matched by
    the identifier the device plug-in gives each rank's device (`DevicePlugin.device_id`); None
    when no monitored device is one of the job's."""
    wanted = {i for i in ids if i}
    mine = [d for d in devices if d.get("uuid") in wanted]
    mine = [d for d in mine if d.get("mem_used_peak_gib") is not None]
    if not mine:
        return None
    busiest = max(mine, key=lambda d: d["mem_used_peak_gib"])
    return busiest["mem_used_peak_gib"], busiest["mem_total_gib"]


# What PyTorch's CPU allocator says when malloc fails (c10/core/impl/alloc_cpu.cpp); on CUDA and
# other accelerators the allocator raises torch.OutOfMemoryError instead.
CPU_ALLOCATOR_FAILURE = "DefaultCPUAllocator: can't allocate memory"


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation that failed for want of memory: the device allocator's
    OutOfMemoryError, the CPU allocator's error, or Python's MemoryError."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(err, RuntimeError) and CPU_ALLOCATOR_FAILURE in str(err)


def _status_bytes(field: str) -> int | None:
    """A size from Linux's /proc/self/status (`VmHWM`, `VmData`, `VmRSS`), or None where it does
    not say."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def limit_memory(device: torch.device, limit_gib: float) -> None:
    """Cap what this process may allocate on `device` at `limit_gib` (0: no cap), as the setting
    memory_limit_gib says (results.json's config records it).

    CUDA: the caching allocator's fraction of the device (the context's own memory is outside
    it). CPU: the limit is on the scale of the CPU's `mem` (the peak resident set): the data
    segment (heap and private writable mappings, what RLIMIT_DATA caps) may grow, from here on,
    by the limit less the resident set now (the interpreter and the libraries loaded so far);
    past that malloc fails, and with it PyTorch's CPU allocator. Reserved address space the run
    never touches (thread stacks, malloc's arenas) counts as growth too: a run fails somewhat
    before its resident set reaches the limit. The cap holds for this process and the DataLoader
    workers it starts (each inherits it, and the parent's segment)."""
    if limit_gib == 0:
        return
    wanted = int(limit_gib * GIB)
    if device.type == "cuda":
        _free, total = torch.cuda.mem_get_info(device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, wanted / total), device)
        return
    if device.type == "cpu":
        resource.setrlimit(resource.RLIMIT_DATA, _data_limit(limit_gib))
        return
    raise UserError(
        f"config: memory_limit_gib={limit_gib:g} is not valid on a {device.type} device: "
        "it caps CUDA and CPU memory only; use 0"
    )


def _data_limit(limit_gib: float) -> tuple[int, int]:
    """RLIMIT_DATA (soft, hard) for a CPU run of memory_limit_gib `limit_gib` (see limit_memory)."""
    data, resident = _status_bytes("VmData"), _status_bytes("VmRSS")
    if data is None or resident is None:
        raise UserError(
            f"config: memory_limit_gib={limit_gib:g} is not valid here: a CPU's limit is set "
            "from /proc/self/status (Linux), which this system lacks; use 0"
        )
    room = int(limit_gib * GIB) - resident
    if room <= 0:
        raise UserError(
            f"config: memory_limit_gib={limit_gib:g} is not valid: this process holds "
            f"{resident / GIB:.2f} GiB already (its resident set before the model is built); "
            "give more"
        )
    _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY and data + room > hard:
        raise UserError(
            f"config: memory_limit_gib={limit_gib:g} is not valid: above this process's hard "
            f"data limit ({hard / GIB:.2f} GiB, `ulimit -Hd`): use a lower value"
        )
    return data + room, hard
