"""Each private PyTorch/torchvision API of torch_compat, exercised against the installed torch and
torchvision: an upgrade that removes or changes one fails its test here, with a message naming
it. And no other module of the package touches a private name."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn
from torch.profiler import ProfilerAction, profile, schedule
from torch.utils.data import DataLoader
from torchvision.models.detection import RetinaNet

from retinaperf import torch_compat
from retinaperf.model.loss import encode
from retinaperf.run.step import BATCH_NORMS

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "retinaperf"


def test_shut_down_workers_stops_the_workers_now() -> None:
    loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
    before = {child.pid for child in psutil.Process().children()}
    assert [int(x) for batch in loader for x in batch] == list(range(8))
    workers = [child for child in psutil.Process().children() if child.pid not in before]
    assert len(workers) == 2, "the test could not find the loader's worker processes"

    torch_compat.shut_down_workers(loader)
    alive = [worker.pid for worker in workers if worker.is_running()]
    assert not alive, (
        f"DataLoader workers {alive} still run after shut_down_workers: torch changed "
        "DataLoader._iterator or its iterator's _shutdown_workers()"
    )
    # The next epoch starts new workers: the stopped iterator was dropped.
    assert [int(x) for batch in loader for x in batch] == list(range(8))
    torch_compat.shut_down_workers(loader)


def test_shut_down_workers_of_a_loader_without_workers_does_nothing() -> None:
    loader = DataLoader(list(range(4)), batch_size=2)
    assert len(list(loader)) == 2
    torch_compat.shut_down_workers(loader)
    assert len(list(loader)) == 2


def scaled_step(scaler: torch.amp.GradScaler, gradient: float) -> None:
    """One optimizer step through `scaler` whose one gradient is `gradient` (inf: skipped)."""
    weight = nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler.scale((weight * gradient).sum()).backward()
    scaler.step(optimizer)


def test_loss_scale_is_get_scale_as_a_tensor_without_a_wait() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    for gradient, factor in ((1.0, 2.0), (math.inf, 0.5)):  # grows after 1 step, backs off
        scaled_step(scaler, gradient)
        before = torch_compat.loss_scale(scaler)
        assert isinstance(before, torch.Tensor), "GradScaler._get_scale_async changed"
        assert before.device.type == "cpu" and float(before) == scaler.get_scale()
        before = before.clone()
        scaler.update()
        after = torch_compat.loss_scale(scaler)
        assert float(after) == scaler.get_scale() == float(before) * factor, (
            "GradScaler._get_scale_async no longer reads the scale get_scale() returns"
        )


def test_version_counter_counts_in_place_writes() -> None:
    norm = nn.BatchNorm2d(4)
    buffer = norm.running_var
    start = torch_compat.version_counter(buffer)
    assert isinstance(start, int)
    _ = buffer * 2 + buffer.sum()  # reads, and out-of-place results, write nothing
    assert torch_compat.version_counter(buffer) == start, "Tensor._version counts reads"
    buffer[:2].mul_(3)  # a write through a view
    through_view = torch_compat.version_counter(buffer)
    assert through_view > start, "Tensor._version missed an in-place write through a view"
    # What the frozen-norm cache must see: a loaded state dict writes the buffers in place.
    norm.load_state_dict({k: v.clone() + 1 for k, v in norm.state_dict().items()})
    assert buffer is norm.running_var
    assert torch_compat.version_counter(buffer) > through_view, (
        "Tensor._version missed load_state_dict's write"
    )


class TinyBackbone(nn.Module):
    """What RetinaNet needs of a backbone to be built: its output channels."""

    out_channels = 8

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"0": x}


def retinanet_coders() -> list[torch_compat.BoxCoder]:
    """The box coders torchvision's RetinaNet keeps, the ones the package is handed: the model's
    (post-processing) and its regression head's (the loss)."""
    model = RetinaNet(TinyBackbone(), num_classes=3)
    return [model.box_coder, model.head.regression_head.box_coder]


# Anchors and boxes xyxy; their (dx, dy, dw, dh) codes with weights 1: centre offsets over the
# anchor's size, log size ratios.
ANCHORS = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 20.0, 30.0, 60.0]])
BOXES = torch.tensor([[2.0, 4.0, 12.0, 24.0], [10.0, 20.0, 30.0, 60.0]])
CODES = torch.tensor([[0.2, 0.9, 0.0, math.log(2.0)], [0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("which", range(2), ids=["model", "regression_head"])
def test_retinanets_box_coder_codes_as_the_package_assumes(which: int) -> None:
    coder = retinanet_coders()[which]
    assert isinstance(coder, torch_compat.BoxCoder), "torchvision's box coder lost an attribute"
    assert tuple(coder.weights) == (1.0, 1.0, 1.0, 1.0)
    # torchvision's head encodes targets with encode_single; model/loss.encode repeats it.
    codes = coder.encode_single(BOXES, ANCHORS)
    torch.testing.assert_close(codes, CODES)
    assert torch.equal(encode(BOXES, ANCHORS, coder.weights), codes), (
        "torchvision's BoxCoder.encode_single changed: model/loss.encode must follow it"
    )
    # Post-processing decodes with decode_single: the inverse, its size ratios clamped at
    # log(1000 / 16) (a code of 100 gives 62.5 times the anchor's size).
    torch.testing.assert_close(coder.decode_single(codes, ANCHORS), BOXES)
    wide = coder.decode_single(torch.tensor([[0.0, 0.0, 100.0, 0.0]]), ANCHORS[:1])
    torch.testing.assert_close(wide, torch.tensor([[-307.5, 0.0, 317.5, 10.0]]))


def test_cpu_capabilities_come_from_get_capabilities_where_torch_has_it() -> None:
    if not hasattr(torch.cpu, "get_capabilities"):
        pytest.skip("this torch predates torch.cpu.get_capabilities")
    assert torch_compat.cpu_capabilities() == torch.cpu.get_capabilities()


def test_the_cpu_probes_agree_with_get_capabilities() -> None:
    """The probes stand in for get_capabilities on older torch: they must answer as it does."""
    probes = torch_compat.cpu_bf16_probes()  # fails if torch renamed or dropped a probe
    if not hasattr(torch.cpu, "get_capabilities"):
        pytest.skip("this torch predates torch.cpu.get_capabilities: nothing to compare with")
    capabilities = torch.cpu.get_capabilities()
    assert probes["avx512_bf16"] is bool(capabilities.get("avx512_bf16", False))
    assert probes["amx_bf16"] is bool(capabilities.get("amx_tile", False))


def test_cpu_capabilities_without_get_capabilities_are_the_probes(monkeypatch) -> None:
    # torch 2.14's probes read get_capabilities themselves: older torch's stand in for them.
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert torch_compat.cpu_capabilities() == {"avx512_bf16": True, "amx_bf16": False}


def test_start_profiler_at_numbers_steps_as_the_run_does(tmp_path: Path) -> None:
    """Started at step 3 with steps 5 and 6 active: the schedule is asked about 3, 4, 5 ... (4
    warms up), and the trace names the steps ProfilerStep#5 and #6."""
    plan = schedule(wait=4, warmup=1, active=2, repeat=1)
    assert plan(0) == ProfilerAction.NONE  # what start_profiler_at needs of a schedule
    trace = tmp_path / "trace.json"
    prof = profile(schedule=plan, on_trace_ready=lambda p: p.export_chrome_trace(str(trace)))
    torch_compat.start_profiler_at(prof, 3)
    assert prof.step_num == 3, "torch.profiler.profile no longer counts its steps in step_num"
    for _ in range(3, 8):  # steps 3..7, each with its own work, then the profiler's step()
        torch.randn(8, 8)
        prof.step()
    prof.stop()
    events = json.loads(trace.read_text(encoding="utf-8"))["traceEvents"]
    names = [e["name"] for e in events if e.get("ph") == "X"]
    steps = {name for name in names if name.startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#5", "ProfilerStep#6"}, (
        f"the trace holds {sorted(steps)}: torch changed how profile.step_num names or "
        "schedules steps"
    )
    assert names.count("aten::randn") == 2


def test_batch_norms_are_every_batch_norm_class_of_torch_nn() -> None:
    """run/step.py names them rather than test for their private base: a batch norm class that
    an upgrade adds (or removes) fails here."""
    base = nn.modules.batchnorm._BatchNorm
    found = {c for c in vars(nn).values() if isinstance(c, type) and issubclass(c, base)}
    assert found == set(BATCH_NORMS), "torch.nn's batch norm classes changed: update BATCH_NORMS"


# Private names of other libraries the package may use: the standard library's.
NOT_TORCH = {"os._exit"}


def private_uses(path: Path) -> list[str]:
    """Where `path` reaches a private name outside its own objects, in source order: a torch or
    torchvision module or name imported with a leading underscore, an attribute `x._y` of
    anything but self, cls or super(), any `__dict__`, or getattr/hasattr of an underscored
    name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        use = None
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            use = next((n for n in names if any(p.startswith("_") for p in n.split("."))), None)
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            owner = node.value
            own = (isinstance(owner, ast.Name) and owner.id in ("self", "cls")) or (
                isinstance(owner, ast.Call) and ast.unparse(owner.func) == "super"
            )
            if node.attr == "__dict__" or not (own or node.attr.startswith("__")):
                use = ast.unparse(node)
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr"):
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and str(name.value).startswith("_"):
                use = ast.unparse(node)
        if use is not None and use not in NOT_TORCH:
            found.append((node.lineno, node.col_offset, use))
    return [use for _line, _col, use in sorted(found)]


def test_no_module_but_torch_compat_touches_a_private_name() -> None:
    uses = [
        f"{path.relative_to(PACKAGE)}: {use}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "torch_compat.py"
        for use in private_uses(path)
    ]
    assert not uses, f"private names outside torch_compat.py (put them there): {uses}"


def test_the_private_name_check_sees_each_kind(tmp_path: Path) -> None:
    module = tmp_path / "x.py"
    module.write_text(
        "from torchvision.models.detection._utils import BoxCoder\n"
        "from torch.cpu import _is_amx_tile_supported\n"
        "self.scaler._get_scale_async()\n"
        "b._version\n"
        "self.__dict__['_cache'] = 1\n"
        "getattr(loader, '_iterator', None)\n"
        "self._own + super()._own_too + os._exit + x.__class__\n",
        encoding="utf-8",
    )
    assert private_uses(module) == [
        "torchvision.models.detection._utils",
        "torch.cpu._is_amx_tile_supported",
        "self.scaler._get_scale_async",
        "b._version",
        "self.__dict__",
        "getattr(loader, '_iterator', None)",
    ]
