"""Which plug-in reads a device: a fake vendor distribution installed with an entry point (as
`pip install` would leave it: a dist-info folder on the path) takes over the CPU, and a run read
through it shows that device's readings, energy and MFU in results.json, the report and the
plots."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from retinaperf.measure.devices.base import Unavailable, Unsupported
from retinaperf.measure.devices.cpu import Cpu
from retinaperf.measure.devices.registry import GROUP, open_sampler, plugin_for

FAKE = Path(__file__).parent / "fake_device" / "retinaperf_fake_device.py"
CPU = torch.device("cpu")


def install(site: Path, entry_points: str, name: str = "retinaperf_fake_device") -> None:
    """A distribution as an installer leaves it: its module and its dist-info on the path."""
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(FAKE, site / FAKE.name)
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{entry_points}\n")


@pytest.fixture
def fake_installed(tmp_path, monkeypatch) -> Path:
    site = tmp_path / "site"
    install(site, "fake = retinaperf_fake_device:FakeX1")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_the_built_in_plugins_read_their_devices():
    assert isinstance(plugin_for(CPU), Cpu)
    xpu = plugin_for(torch.device("xpu"))  # a device no plug-in here reads
    assert isinstance(xpu, Unsupported) and "'xpu'" in xpu.why and "Adding a device" in xpu.why
    with pytest.raises(Unavailable, match="no device plug-in reads 'xpu'"):
        xpu.sampler()
    assert xpu.energy_counter(torch.device("xpu")) == (None, xpu.why)
    assert xpu.peak("Some GPU", "bf16").note == xpu.why


def test_an_installed_plugin_comes_before_the_built_in_ones(fake_installed):
    plugin = plugin_for(CPU)
    assert (plugin.name, plugin.device_name(CPU), plugin.device_id(CPU)) == (
        "fake", "Fake X1", "fake-0"
    )  # fmt: skip
    sampler, reason = open_sampler(plugin)
    assert reason is None and sampler.sample()["devices"][0]["power_w"] == 123.0


def test_a_plugin_that_does_not_load_is_warned_about_and_passed_over(tmp_path, monkeypatch):
    install(tmp_path / "a", "broken = retinaperf_absent_module:Plugin", name="broken")
    install(tmp_path / "b", "wrong = retinaperf_fake_device:FakeSmi", name="wrong_type")
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    with pytest.warns(RuntimeWarning) as caught:
        plugin = plugin_for(CPU)
    assert isinstance(plugin, Cpu)
    messages = sorted(str(w.message) for w in caught)
    assert "'broken'" in messages[0] and "ModuleNotFoundError" in messages[0]
    assert "'wrong'" in messages[1] and "FakeSmi is not a DevicePlugin" in messages[1]


def test_a_plugin_whose_matches_raises_is_passed_over(fake_installed, monkeypatch):
    import retinaperf_fake_device

    def broken(self, device):
        raise RuntimeError("driver hung")

    monkeypatch.setattr(retinaperf_fake_device.FakeX1, "matches", broken)
    with pytest.warns(RuntimeWarning, match="'fake' failed to tell .*driver hung"):
        assert isinstance(plugin_for(CPU), Cpu)


def test_the_cpu_plugin_says_where_its_readings_are():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler, reason = open_sampler(Cpu())
    assert sampler is None and "the host's" in reason
    assert Cpu().energy_is_host and Cpu().energy_counter(CPU)[0] is None
    assert Cpu().peak("any CPU", "fp32").tflops is None


def test_a_run_on_the_plugin_device_reports_its_readings(
    fake_installed, tiny_run_args, tiny_dataset, tmp_path
):
    from cli_helpers import run_cli

    out = tmp_path / "run"
    assert run_cli(tiny_run_args(tiny_dataset, out, max_steps=3, monitor_interval=0.05)) == 0
    results = json.loads((out / "results.json").read_text())
    m, env = results["metrics"], results["environment"]
    assert (env["device_plugin"], env["device_readings"], env["device_name"]) == (
        "fake", "fake-smi", "Fake X1"
    )  # fmt: skip
    assert env["device_readings_note"] is None and env["fake_driver"] == "1.2.3"
    assert m["device_name"] == "Fake X1"
    # MFU against the plug-in's peak: 0.5 TFLOP/s in fp32 on one device
    assert m["peak_tflops"] == 0.5 and m["peak_source"] == "Fake X1 datasheet"
    assert m["mfu"] == pytest.approx(m["achieved_tflops"] / 0.5)
    # energy from its counter at 123 W; the device's energy is its own, not the host's
    assert m["energy_source"] == "fake-smi energy counter"
    train_s = m["train_time"] - m["eval_time"]
    assert m["power_train_w"] == pytest.approx(123.0, rel=0.25)  # phases vs the meter's clock
    assert m["energy_train_j"] == pytest.approx(123.0 * train_s, rel=0.25)
    # memory as its driver shows it, matched by the plug-in's device id
    assert (m["mem"], m["mem_source"]) == ("3.5/64.0", "driver peak used / device total (fake-smi)")
    (device,) = results["monitor"]["devices"]
    assert (device["uuid"], device["name"], device["util_mean"]) == ("fake-0", "Fake X1", 75.0)
    report = (out / "report.md").read_text()
    assert "device readings (fake plug-in): from fake-smi" in report
    assert "Fake X1 datasheet" in report and "Fake X1" in report.splitlines()[2 + 2]
    assert (out / "plots" / "devices.png").stat().st_size > 0


def test_the_readmes_example_plugin_is_the_tested_one():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("### Adding a device") :]
    example = section[section.index("```python\n") + len("```python\n") :]
    example = example[: example.index("```")]
    code = FAKE.read_text()
    assert example == code[code.index("import time") :]
    assert f'[project.entry-points."{GROUP}"]\nfake = "retinaperf_fake_device:FakeX1"' in section
