"""The AMD plug-in: a fake amdsmi (amdsmi_fake.py) with scripted GPUs, held to the names and
dict keys of the real package's source; this machine's own failed import of amdsmi; torch's
device properties and `torch.version.hip` patched to look like ROCm's."""

import importlib
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from amdsmi_fake import DICTS, AmdSmiFake, FakeGpu, not_supported, real_api, real_package

from retinaperf.measure.devices import registry
from retinaperf.measure.devices.amd import Amd, AmdSmiSampler, amdsmi_counter, driver_version
from retinaperf.measure.devices.base import Unavailable
from retinaperf.measure.devices.nvidia import Nvidia

BDF = "0000:c1:00.0"
OTHER = "0000:05:00.0"
HIP = "7.0.51831"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> AmdSmiFake:
    """Two GPUs: an MI300X with every reading, and one that gives few."""
    sparse = FakeGpu(
        bdf=OTHER.upper(),  # amdsmi writes lower case; a device's id must not depend on it
        asic={"market_name": "N/A"},
        board={"product_name": "AMD Instinct MI210"},
        activity={"gfx_activity": "N/A", "umc_activity": "N/A", "mm_activity": "N/A"},
        vram=not_supported(),
        power={"current_socket_power": "N/A", "average_socket_power": 300},
        temps={"HOTSPOT": not_supported(), "EDGE": 41},
        clock={"clk": "N/A"},
        energy=not_supported(),
    )
    return AmdSmiFake(FakeGpu(bdf=BDF), sparse).install(monkeypatch)


@pytest.fixture
def rocm(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch as ROCm's build, whose cuda:0 is the GPU at BDF."""
    monkeypatch.setattr(torch.version, "hip", HIP)
    props = SimpleNamespace(pci_domain_id=0, pci_bus_id=0xC1, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


# The fake against the real package.


def test_the_fake_defines_only_what_the_real_amdsmi_does():
    package = real_package()
    if package is None:
        pytest.skip("amdsmi is not installed (requirements.txt installs it for this check)")
    real = real_api(package)
    fake = AmdSmiFake(FakeGpu())
    for name, value in vars(fake.module).items():
        if name.startswith("__"):
            continue
        assert name in real.exported, f"amdsmi exports no {name}"
        if isinstance(value, type):
            assert name in real.classes, name
            members = set(getattr(value, "__members__", {}))
            assert members <= real.classes[name], (name, members - real.classes[name])
        else:
            assert name in real.functions, name
    for function, attribute in DICTS.items():
        returned = set(getattr(FakeGpu(), attribute))
        keys = real.functions[function]
        assert returned <= keys, (function, returned - keys)


def test_the_real_dicts_have_the_keys_the_plugin_reads():
    """The keys amd.py reads, in the dicts of the installed amdsmi's source (7.0.2)."""
    package = real_package()
    if package is None:
        pytest.skip("amdsmi is not installed (requirements.txt installs it for this check)")
    functions = real_api(package).functions
    assert "gfx_activity" in functions["amdsmi_get_gpu_activity"]
    assert {"vram_used", "vram_total"} <= functions["amdsmi_get_gpu_vram_usage"]
    assert {"current_socket_power", "average_socket_power"} <= functions["amdsmi_get_power_info"]
    assert "clk" in functions["amdsmi_get_clock_info"]
    assert "market_name" in functions["amdsmi_get_gpu_asic_info"]
    assert "product_name" in functions["amdsmi_get_gpu_board_info"]
    assert {"energy_accumulator", "counter_resolution"} <= functions["amdsmi_get_energy_count"]
    assert "driver_version" in functions["amdsmi_get_gpu_driver_info"]


# The sampler.


def test_sampler_converts_units_and_leaves_unsupported_readings_none(fake):
    sampler = Amd().sampler()
    assert isinstance(sampler, AmdSmiSampler)
    assert fake.inits == 1
    full, sparse = sampler.sample()["devices"]
    assert full == {
        "index": 0,
        "uuid": BDF,
        "name": "AMD Instinct MI300X",
        "util": 87,
        "mem_used_gib": 40.0,  # 40960 MB: amdsmi's "MB" are MiB
        "mem_total_gib": pytest.approx(191.984, abs=1e-3),
        "power_w": 452,
        "temp_c": 65,  # the hotspot
        "sm_clock_mhz": 2100,
    }
    assert sparse == {
        "index": 1,
        "uuid": OTHER,
        "name": "AMD Instinct MI210",  # no market name: the board's
        "util": None,
        "mem_used_gib": None,
        "mem_total_gib": None,
        "power_w": 300,  # no current power (MI200 and older): the average
        "temp_c": 41,  # no hotspot sensor: the edge
        "sm_clock_mhz": None,
    }
    fake.gpus["h0"].power = {"current_socket_power": 0xFFFF, "average_socket_power": 0xFFFFFFFF}
    fake.gpus["h0"].activity = {"gfx_activity": 0xFFFF}
    fake.gpus["h0"].vram = {"vram_total": 196592, "vram_used": 512}
    fresh = sampler.sample()["devices"][0]  # readings are fresh on every sample
    assert fresh["power_w"] is None and fresh["util"] is None  # C sentinels are no reading
    assert fresh["mem_used_gib"] == 0.5
    assert fake.shutdowns == 0
    sampler.close()
    assert fake.inits == fake.shutdowns == 1


def test_sampler_uuid_is_the_rank_devices_id(fake, rocm):
    plugin = Amd()
    device_id = plugin.device_id(torch.device("cuda", 0))
    assert device_id == BDF
    sampler = plugin.sampler()
    uuids = [d["uuid"] for d in sampler.sample()["devices"]]
    sampler.close()
    assert uuids.index(device_id) == 0


def test_no_device_id_without_torchs_pci_address(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace())
    assert Amd().device_id(torch.device("cuda", 0)) is None
    counter, reason = Amd().energy_counter(torch.device("cuda", 0))
    assert counter is None and "no PCI address" in reason


def test_sampler_releases_amdsmi_when_it_cannot_list_the_gpus(fake):
    fake.handles_error = not_supported()
    with pytest.raises(Exception, match="2"):
        Amd().sampler()
    assert fake.inits == fake.shutdowns == 1


def test_sampler_that_does_not_initialise_is_warned_about(fake):
    fake.init_error = not_supported()
    with pytest.warns(RuntimeWarning, match="sampler did not start"):
        sampler, reason = registry.open_sampler(Amd())
    assert sampler is None and "AmdSmiLibraryException" in reason
    assert fake.shutdowns == 0


# The energy counter.


def test_counter_gives_joules(fake):
    counter, reason = amdsmi_counter(BDF.upper())
    assert reason is None
    assert (counter.source, counter.label, counter.wrap_j) == ("amdsmi energy counter", BDF, None)
    assert fake.inits == 1 and fake.shutdowns == 0
    first = counter.read()
    assert first == pytest.approx(15.3)  # 1e6 counts of 15.3 µJ
    fake.gpus["h0"].energy = {**fake.gpus["h0"].energy, "energy_accumulator": 21_000_000}
    assert counter.read() - first == pytest.approx(306.0)  # 2e7 counts more
    fake.gpus["h0"].energy = not_supported()
    assert counter.read() is None  # a failed reading, not a crash
    counter.close()
    assert fake.inits == fake.shutdowns == 1


def test_counter_reads_the_older_key(fake):
    """amdsmi 6.0 named the count "power"."""
    fake.gpus["h0"].energy = {"power": 2_000_000, "counter_resolution": 15.3, "timestamp": 0}
    counter, _ = amdsmi_counter(BDF)
    assert counter.read() == pytest.approx(30.6)
    counter.close()


def test_counter_of_the_rank_device(fake, rocm):
    counter, reason = Amd().energy_counter(torch.device("cuda", 0))
    assert reason is None and counter.label == BDF
    counter.close()


def test_no_counter_where_its_first_reading_fails(fake):
    counter, reason = amdsmi_counter(OTHER)
    assert counter is None
    assert reason.startswith(f"no amdsmi energy counter on {OTHER}: its first reading failed")
    assert fake.inits == fake.shutdowns == 1  # initialised, then released


def test_no_counter_for_an_unknown_address(fake):
    counter, reason = amdsmi_counter("0000:ff:00.0")
    assert counter is None
    assert "amdsmi finds no GPU at this PCI address" in reason
    assert fake.inits == fake.shutdowns == 1


def test_no_counter_where_amdsmi_does_not_initialise(fake):
    fake.init_error = not_supported()
    counter, reason = amdsmi_counter(BDF)
    assert counter is None and "amdsmi did not initialise" in reason
    assert fake.shutdowns == 0  # nothing was initialised


# amdsmi that does not load.


@pytest.fixture
def broken_amdsmi(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """An amdsmi that raises at import as 7.0.2 does without libamd_smi.so."""
    package = tmp_path / "amdsmi"
    package.mkdir()
    (package / "__init__.py").write_text("raise KeyError('libamd_smi.so')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)
    importlib.invalidate_caches()


def test_amdsmi_that_does_not_load_is_a_reason(broken_amdsmi):
    with pytest.raises(Unavailable) as why:
        Amd().sampler()
    assert str(why.value) == (
        "amdsmi did not load (KeyError: 'libamd_smi.so'): it comes with ROCm; pip install amdsmi "
        "matching the ROCm version"
    )
    counter, reason = amdsmi_counter(BDF)
    assert counter is None and reason == f"no amdsmi energy counter for {BDF}: {why.value}"
    assert driver_version() is None


def test_amdsmi_that_is_not_installed_is_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "amdsmi", None)  # import raises ImportError
    sampler, reason = registry.open_sampler(Amd())
    assert sampler is None and reason.startswith("amdsmi did not load (ModuleNotFoundError")


def test_this_machines_amdsmi_gives_a_reason_not_a_crash():
    if real_package() is None:
        pytest.skip("amdsmi is not installed")
    try:
        importlib.import_module("amdsmi")
    except Exception:
        pass
    else:
        pytest.skip("amdsmi imports on this machine (it has ROCm)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reason, not a warning
        sampler, reason = registry.open_sampler(Amd())
    assert sampler is None and reason.startswith("amdsmi did not load (")
    counter, why = amdsmi_counter(BDF)
    assert counter is None and "amdsmi did not load" in why


# Choosing the plug-in, facts, peaks.


def test_matches_only_a_rocm_builds_gpus(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    assert not Amd().matches(torch.device("cuda", 0))
    monkeypatch.setattr(torch.version, "hip", HIP)
    assert Amd().matches(torch.device("cuda", 0))
    assert not Amd().matches(torch.device("cpu"))


def test_registry_picks_amd_on_rocm_and_nvidia_on_cuda(monkeypatch):
    monkeypatch.setattr(registry, "installed", list)  # the built-in plug-ins alone
    monkeypatch.setattr(torch.version, "hip", HIP)
    assert isinstance(registry.plugin_for(torch.device("cuda", 0)), Amd)
    monkeypatch.setattr(torch.version, "hip", None)
    assert isinstance(registry.plugin_for(torch.device("cuda", 0)), Nvidia)


def test_facts_name_the_driver_and_hip(fake, rocm):
    assert Amd().facts(torch.device("cuda", 0)) == {"rocm_driver": "6.10.5", "hip_runtime": HIP}
    assert fake.inits == fake.shutdowns == 1
    fake.gpus["h0"].driver = {"driver_name": "amdgpu", "driver_version": "N/A"}
    assert Amd().facts(torch.device("cuda", 0))["rocm_driver"] is None
    fake.init_error = not_supported()
    assert Amd().facts(torch.device("cuda", 0))["rocm_driver"] is None
    assert fake.inits == fake.shutdowns == 2


def test_plugin_labels():
    plugin = Amd()
    assert (plugin.name, plugin.source) == ("amd", "amdsmi")
    assert plugin.memory_view == "driver peak used / device total (amdsmi, as amd-smi shows)"


def test_peaks_from_the_datasheets():
    plugin = Amd()
    bf16 = plugin.peak("AMD Instinct MI300X", "bf16")
    assert bf16.tflops == 1307.4 and bf16.source == "AMD datasheet, MI300X, dense bf16"
    assert plugin.peak("AMD Instinct MI300X", "tf32").tflops == 653.7
    assert plugin.peak("AMD Instinct MI325X", "fp16").tflops == 1307.4
    assert plugin.peak("AMD Instinct MI210", "fp32").tflops == 45.3
    no_tf32 = plugin.peak("AMD Instinct MI210", "tf32")
    assert no_tf32.tflops is None and "no tf32 peak" in no_tf32.note


@pytest.mark.parametrize(
    "name",
    ["AMD Instinct MI250X / MI250", "AMD Instinct MI308X", "AMD Radeon RX 7900 XTX", "gfx942"],
)
def test_no_peak_for_a_device_not_in_the_table(name):
    peak = Amd().peak(name, "bf16")
    assert peak.tflops is None and peak.note == f"{name!r} is not in the AMD peak table"
