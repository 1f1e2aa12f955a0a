"""Every private PyTorch and torchvision API the package relies on, each behind one name here.

Private names change without notice between releases. Kept here, each has a test in
tests/test_torch_compat.py that exercises it against the installed torch and torchvision, so an
upgrade that breaks one fails a test naming it, rather than a run on a GPU machine. No other
module of the package touches a private name (that test file checks it too).

Each entry says what it is for, the versions it was checked against, and why no public API
serves. Where a public one serves equally the package uses it, and nothing is here:
`nn.BatchNorm*`/`nn.SyncBatchNorm` classes rather than `nn.modules.batchnorm._BatchNorm`
(run/step.py), and plain attributes rather than caches written into a module's `__dict__`.

A base module: it imports torch alone, so that the data layer can use it without importing
torchvision, which takes seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.profiler import profile
    from torch.utils.data import DataLoader


def shut_down_workers(loader: DataLoader) -> None:
    """Stop `loader`'s persistent worker processes now, and drop their iterator: the next
    iteration starts new workers.

    What for: the workers ignore SIGTERM (run/signals.py), so the interpreter's exit, which
    terminates leftover workers, could not stop them; dropping the loader stops them only once
    nothing refers to it any more, which a traceback being handled may delay.
    Private: `DataLoader._iterator` (where persistent workers' iterator lives) and that
    iterator's `_shutdown_workers()` (what its `__del__` calls). Checked with torch 2.14.1.
    No public alternative: DataLoader has no call that stops its workers.
    """
    iterator = getattr(loader, "_iterator", None)
    # A loader without workers has a single-process iterator, with nothing to stop.
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


def loss_scale(scaler: torch.amp.GradScaler) -> Tensor:
    """The scaler's current scale as a tensor on its device, read without waiting for the
    device (once `scaler.scale()` has run: the scale is made on first use).

    What for: counting the updates the scaler skipped (model/precision.py) at every step, by
    comparing the scale before and after `update()`, on the device.
    Private: `GradScaler._get_scale_async()`. Checked with torch 2.14.1.
    No public alternative: `get_scale()` returns a float through `.item()`, which makes the
    host wait for the device at every step.
    """
    scale = scaler._get_scale_async()
    if scale is None:  # the scale is made at the first scale(); a disabled scaler has none
        raise RuntimeError("loss_scale: the scaler has no scale yet (or is disabled)")
    return scale


def version_counter(tensor: Tensor) -> int:
    """How many in-place writes `tensor`'s storage has had, as autograd counts them.

    What for: frozen batch norm keeps its scale and shift until a buffer changes
    (model/network.py); loading a state dict writes the buffers in place, which changes neither
    their storage nor their dtype or device, only this count.
    Private: `Tensor._version`. Checked with torch 2.14.1.
    No public alternative: no public attribute or call reports in-place writes.
    """
    return tensor._version


@runtime_checkable
class BoxCoder(Protocol):
    """What the package uses of torchvision's box coder, the object RetinaNet keeps in its
    public `box_coder` attribute and its regression head in its own.

    What for: model/loss.py encodes targets with the coder's `weights` in `encode_single`'s
    order of operations; model/postprocess.py decodes with `decode_single`.
    Private: the coder's class, `torchvision.models.detection._utils.BoxCoder`: the package never
    imports it, it is handed the model's instances, whose interface this names. Checked with
    torchvision 0.29.1.
    No public alternative: torchvision.ops converts box formats, but has no coder of RetinaNet's
    (dx, dy, dw, dh) offsets from anchors.
    """

    weights: tuple[float, float, float, float]

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor: ...


def cpu_capabilities() -> Mapping[str, Any]:
    """The CPU's instruction-set features as torch's own dispatch sees them (cpuinfo).

    What for: whether the CPU computes bfloat16 in hardware (model/precision.py, `auto`).
    Public where it exists: `torch.cpu.get_capabilities()` (torch 2.14.1 has it; the torch
    versions this package supports, >= 2.9, do not all have it). Before it, `cpu_bf16_probes`.
    """
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    return get_capabilities() if get_capabilities is not None else cpu_bf16_probes()


def cpu_bf16_probes() -> dict[str, bool]:
    """`avx512_bf16` and `amx_bf16` as torch's dispatch decides them, for torch versions without
    `torch.cpu.get_capabilities`.

    Private: `torch.cpu._is_avx512_bf16_supported()` and `torch.cpu._is_amx_tile_supported()`
    (AMX tiles: every CPU with them has AMX-BF16 so far). Checked with torch 2.14.1.
    Drop this once every supported torch has `get_capabilities`.
    """
    return {
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx_bf16": bool(torch.cpu._is_amx_tile_supported()),
    }


def start_profiler_at(prof: profile, step: int) -> None:
    """Start `prof`, a profiler with a schedule, at step `step` rather than 0: its schedule is
    asked about the run's own step numbers, and each step's range in the trace is named
    `ProfilerStep#<that number>` (a run resumed from a checkpoint starts past step 1).

    `prof`'s schedule must answer NONE for step 0, which torch asks it about when it is made.
    Not private by name, but undocumented use: `profile.step_num`, which torch's examples read
    in a trace handler; written here, before `start()` and one `step()`, which name and schedule
    the step from it. Checked with torch 2.14.1.
    No public alternative: a profiler counts its steps from 0 at `start()`.
    """
    prof.step_num = step - 1
    prof.start()
    prof.step()
