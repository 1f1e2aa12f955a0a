"""Energy per phase: a fake pynvml for the GPU counter, a fake powercap tree for RAPL, scripted
counters for resets and failed readings, and hand-computed joules."""

import errno
import io
from pathlib import Path

import pynvml
import pytest
import torch
from nvml_fake import NvmlFake

from retinaperf.measure.devices.nvidia import Nvidia, bare_uuid, nvml_counter
from retinaperf.measure.energy import (
    Phase,
    PhaseEnergy,
    RunEnergy,
    integrate_power,
    job_energy,
)
from retinaperf.measure.energy_counters import rapl_counters
from retinaperf.measure.meter import Meter

UUID = "5f3a9c1e-0b6d-4e2f-8a71-c0ffee000001"  # as torch writes it; NVML writes "GPU-" + this


class FakeNvml(NvmlFake):
    """Two devices: h0 with an energy counter, h1 (pre-Volta) without one."""

    def __init__(self) -> None:
        super().__init__()
        self.handles = {f"GPU-{UUID}": "h0", "GPU-00000000-0000-0000-0000-0000000000k8": "h1"}
        self.energy_mj: dict[str, int | pynvml.NVMLError] = {
            "h0": 0,
            "h1": pynvml.NVMLError_NotSupported(),
        }

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def handle(uuid: str) -> str:
            if uuid not in self.handles:
                raise pynvml.NVMLError_NotFound()
            return self.handles[uuid]

        def energy(handle: str) -> int:
            value = self.energy_mj[handle]
            if isinstance(value, pynvml.NVMLError):
                raise value
            return value

        fakes = {
            "nvmlDeviceGetHandleByUUID": handle,
            "nvmlDeviceGetTotalEnergyConsumption": energy,
        }
        self.patch(monkeypatch, fakes)


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    fake.install(monkeypatch)
    return fake


@pytest.mark.parametrize("uuid", [UUID, f"GPU-{UUID}"], ids=["torch", "nvml"])
def test_nvml_counter_gives_the_joules_of_each_phase(fake_nvml, uuid):
    fake_nvml.energy_mj["h0"] = 4_000_000  # 4000 J since the driver loaded: not the run's
    counter, reason = nvml_counter(uuid)
    assert reason is None and counter is not None
    assert (counter.label, counter.source, counter.wrap_j) == (
        f"GPU-{UUID}",
        "NVML energy counter",
        None,
    )
    assert fake_nvml.inits == 1 and fake_nvml.shutdowns == 0

    energy = PhaseEnergy(counter)
    fake_nvml.energy_mj["h0"] = 5_000_000
    energy.count(None)  # train start: the 1000 J before it count in no phase
    fake_nvml.energy_mj["h0"] = 5_123_456
    energy.count(Phase.TRAIN)  # eval start
    fake_nvml.energy_mj["h0"] = 5_150_000
    energy.count(Phase.EVAL)  # eval end
    fake_nvml.energy_mj["h0"] = 5_400_000
    energy.count(Phase.TRAIN)  # train end

    assert energy.totals == {
        "train": pytest.approx(123.456 + 250.0, abs=1e-9),
        "eval": pytest.approx(26.544, abs=1e-9),
    }
    assert energy.summary() == {
        "label": f"GPU-{UUID}",
        "source": "NVML energy counter",
        "train_j": pytest.approx(373.456, abs=1e-9),
        "eval_j": pytest.approx(26.544, abs=1e-9),
        "complete": True,
    }
    fake_nvml.energy_mj["h0"] = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    assert counter.read() is None
    counter.close()
    assert fake_nvml.shutdowns == 1


def test_nvml_counter_missing_where_the_gpu_has_none(fake_nvml):
    counter, reason = nvml_counter("GPU-00000000-0000-0000-0000-0000000000k8")
    assert counter is None
    assert reason == (
        "no NVML energy counter on GPU-00000000-0000-0000-0000-0000000000k8: NVML says Not "
        "Supported (Volta and newer GPUs have one)"
    )
    assert fake_nvml.inits == fake_nvml.shutdowns == 1  # initialised, then released


def test_nvml_counter_missing_for_an_unknown_uuid(fake_nvml):
    counter, reason = nvml_counter("00000000-dead-beef-0000-000000000000")
    assert counter is None
    assert reason == (
        "no NVML energy counter for GPU-00000000-dead-beef-0000-000000000000: NVML finds no "
        "such device (Not Found); give the UUID of a GPU of this node"
    )
    assert fake_nvml.inits == fake_nvml.shutdowns == 1


def test_nvml_counter_missing_without_the_nvml_library(fake_nvml, monkeypatch):
    def library_not_found() -> None:
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", library_not_found)
    counter, reason = nvml_counter(UUID)
    assert counter is None
    assert reason == (
        f"no NVML energy counter for GPU-{UUID}: NVML did not initialise (NVML Shared Library "
        "Not Found); it comes with the NVIDIA driver"
    )
    assert fake_nvml.shutdowns == 0  # nothing was initialised


def write_domain(root: Path, folder: str, name: str, energy_uj: int, max_uj: int) -> Path:
    domain = root / folder
    domain.mkdir(parents=True)
    (domain / "name").write_text(f"{name}\n")
    (domain / "energy_uj").write_text(f"{energy_uj}\n")
    (domain / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return domain


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    """Two packages, package 0's DRAM part, and package 0 again through MMIO."""
    root = tmp_path / "powercap"
    write_domain(root, "intel-rapl:0", "package-0", 262_100_000_000, 262_144_000_000)
    write_domain(root, "intel-rapl:1", "package-1", 7_000_000, 65_536_000_000)
    write_domain(root, "intel-rapl:0:0", "dram", 1_000_000, 65_536_000_000)
    write_domain(root, "intel-rapl-mmio:0", "package-0", 5, 65_536_000_000)
    return root


def test_rapl_counters_count_the_packages_across_a_wrap(powercap):
    counters, reason = rapl_counters(powercap)
    assert reason is None
    assert [(c.label, c.source, c.wrap_j) for c in counters] == [
        ("package-0", "RAPL package energy (powercap)", 262_144.0),
        ("package-1", "RAPL package energy (powercap)", 65_536.0),
    ]
    assert [c.read() for c in counters] == [262_100.0, 7.0]  # µJ -> J

    package0, package1 = (PhaseEnergy(c) for c in counters)
    for energy in (package0, package1):
        energy.count(None)
    # Package 0 wraps: 262144 - 262100 = 44 J to the wrap, then 56 J after it.
    (powercap / "intel-rapl:0" / "energy_uj").write_text("56000000\n")
    (powercap / "intel-rapl:1" / "energy_uj").write_text("19500000\n")
    for energy in (package0, package1):
        energy.count(Phase.TRAIN)
    (powercap / "intel-rapl:0" / "energy_uj").write_text("81000000\n")
    (powercap / "intel-rapl:1" / "energy_uj").write_text("20000000\n")
    for energy in (package0, package1):
        energy.count(Phase.EVAL)

    assert package0.totals == {"train": 100.0, "eval": 25.0}
    assert package1.totals == {"train": 12.5, "eval": 0.5}
    assert package0.lost_intervals == package1.lost_intervals == 0


def test_rapl_counters_none_without_a_package_domain(tmp_path):
    missing = tmp_path / "powercap"
    assert rapl_counters(missing) == (
        [],
        f"no RAPL package domain under {missing}: this kernel or machine (e.g. a container or "
        "VM) exposes no CPU energy counter",
    )
    write_domain(missing, "intel-rapl:0:0", "dram", 1, 2)
    write_domain(missing, "intel-rapl:1", "psys", 1, 2)
    counters, reason = rapl_counters(missing)
    assert counters == []
    assert reason is not None and reason.startswith(f"no RAPL package domain under {missing}:")


def test_rapl_counters_none_where_energy_cannot_be_read(powercap, monkeypatch):
    # Tests run as root, whom chmod does not stop: a folder in the file's place cannot be read.
    energy = powercap / "intel-rapl:1" / "energy_uj"
    energy.unlink()
    energy.mkdir()
    assert rapl_counters(powercap) == ([], f"cannot read {energy} (Is a directory)")

    energy.rmdir()
    energy.write_text("7000000\n")
    read_text = Path.read_text

    def root_only(path: Path, *args, **kwargs) -> str:
        if path.name == "energy_uj":  # what Linux 5.10 and later do to non-root readers
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", root_only)
    assert rapl_counters(powercap) == (
        [],
        f"cannot read {powercap / 'intel-rapl:0' / 'energy_uj'} (Permission denied): since Linux "
        "5.10 only root can; run as root or make it readable",
    )


class ScriptedCounter:
    """Reads `readings` in turn (None: a failed reading)."""

    source = "scripted"
    label = "fake-0"

    def __init__(self, readings: list[float | None], wrap_j: float | None = None) -> None:
        self.readings = list(readings)
        self.wrap_j = wrap_j

    def read(self) -> float | None:
        return self.readings.pop(0)

    def close(self) -> None:
        """Holds nothing."""


def test_a_reset_loses_only_its_interval():
    # Train 50, then the counter starts again (eval interval unknown), train 25, eval 15, train 40.
    energy = PhaseEnergy(ScriptedCounter([100.0, 150.0, 20.0, 45.0, 60.0, 100.0]))
    for ended in (None, Phase.TRAIN, Phase.EVAL, Phase.TRAIN, Phase.EVAL, Phase.TRAIN):
        energy.count(ended)
    assert energy.totals == {"train": 115.0, "eval": 15.0}
    assert energy.lost_intervals == 1
    assert energy.summary() == {
        "label": "fake-0",
        "source": "scripted",
        "train_j": 115.0,
        "eval_j": 15.0,
        "complete": False,
    }


def test_a_failed_reading_loses_the_intervals_on_both_sides():
    # The eval-start reading fails: the train interval before it and the eval one after it are
    # unknown; the next reading starts afresh.
    energy = PhaseEnergy(ScriptedCounter([100.0, None, 130.0, 170.0]))
    for ended in (None, Phase.TRAIN, Phase.EVAL, Phase.TRAIN):
        energy.count(ended)
    assert energy.totals == {"train": 40.0}
    assert energy.lost_intervals == 2
    summary = energy.summary()
    assert (summary["train_j"], summary["eval_j"], summary["complete"]) == (40.0, None, False)


def test_state_dict_carries_the_totals_into_a_resumed_process():
    first = PhaseEnergy(ScriptedCounter([1000.0, 1300.0, 900.0, 950.0]))
    for ended in (None, Phase.TRAIN, Phase.EVAL, Phase.TRAIN):  # the eval interval: a reset
        first.count(ended)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # as a checkpoint is loaded
    assert state == {"totals": {"train": 350.0}, "lost_intervals": 1}

    # The resumed process's counter reads lower (another driver): it reads afresh at train start.
    resumed = PhaseEnergy(ScriptedCounter([10.0, 70.0, 80.0]))
    resumed.load_state_dict(state)
    for ended in (None, Phase.TRAIN, Phase.EVAL):
        resumed.count(ended)
    assert resumed.totals == {"train": 410.0, "eval": 10.0}
    assert resumed.lost_intervals == 1


def test_integrate_power_constant():
    # Samples at 2, 7, 12 and 17 s: power is held at 100 W on [0, 2] and [17, 20] too.
    samples = [(float(t), 100.0) for t in range(2, 18, 5)]
    windows = [(0.0, 10.0, "train"), (10.0, 12.0, "eval"), (12.0, 20.0, "train")]
    assert integrate_power(samples, windows) == {"train": 1800.0, "eval": 200.0}


def test_integrate_power_is_exact_for_piecewise_linear_power():
    # P = 10 t up to t = 4, then 40 - 5 (t - 4) down to 20 W at t = 8, held at 20 W after it.
    samples = [(8.0, 20.0), (0.0, 0.0), (2.0, None), (4.0, 40.0)]  # out of order, one failed
    windows = [(1.0, 6.0, "train"), (2.5, 3.5, "eval"), (8.0, 11.0, "train")]
    # train: 5 (4² - 1²) = 75 on [1, 4], 40·2 - 5·2²/2 = 70 on [4, 6], 20·3 = 60 after the last
    # sample; eval: 5 (3.5² - 2.5²) = 30.
    energy = integrate_power(samples, windows)
    assert energy == {
        "train": pytest.approx(205.0, rel=1e-12),
        "eval": pytest.approx(30.0, rel=1e-12),
    }
    # Before the first sample power is held at its 0 W: only [0, 0.5] counts, 5 · 0.5² J.
    assert integrate_power(samples, [(-1.0, 0.5, "train")]) == {
        "train": pytest.approx(1.25, rel=1e-12)
    }


def test_integrate_power_needs_two_readings():
    assert integrate_power([(0.0, 100.0), (1.0, None)], [(0.0, 1.0, "train")]) is None
    assert integrate_power([], [(0.0, 1.0, "train")]) is None
    with pytest.raises(ValueError, match="'eval' window ends"):
        integrate_power([(0.0, 1.0), (1.0, 1.0)], [(2.0, 1.0, "eval")])


# --- A rank's counters over a run, and the job's figures ------------------------------------------

K8 = "00000000-0000-0000-0000-0000000000k8"  # FakeNvml's device without a counter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Wattmeter:
    """A counter of the joules a fake device has drawn: `power` watts while the clock runs."""

    source = "fake wattmeter"
    label = "fake-0"
    wrap_j = None

    def __init__(self, clock: Clock) -> None:
        self.clock, self.power, self.joules, self.at = clock, 0.0, 0.0, clock()

    def read(self) -> float:
        self.joules += (self.clock() - self.at) * self.power
        self.at = self.clock()
        return self.joules

    def close(self) -> None:
        """Holds nothing."""


def test_the_meters_windows_are_the_energy_phases():
    """The meter tells the energy where training, each evaluation (one cut short too) and the
    stop begin: the joules of each phase are those of its times, with no call of its own."""
    clock = Clock()
    device = Wattmeter(clock)
    energy = RunEnergy(device, None, read_host=False, clock=clock, command_start=90.0)
    meter = Meter(90.0, torch.device("cpu"), clock=clock, phases=energy)

    def run(seconds: float, watts: float) -> None:
        device.read()
        device.power = watts
        clock.now += seconds
        device.read()

    run(5, 1000)  # set-up: in no phase
    meter.train_started()
    run(10, 300)
    with meter.evaluation():
        run(2, 100)
    run(4, 300)
    energy.read()  # a logged step: the same phase goes on
    run(4, 300)
    with pytest.raises(KeyError), meter.evaluation():  # abandoned, or failed
        run(1, 100)
        raise KeyError("stopped")
    run(3, 300)
    meter.stopped()
    run(7, 1000)  # after the stop: in no phase

    summary = energy.summary()["device"]
    assert summary["train_j"] == pytest.approx(21 * 300)
    assert summary["eval_j"] == pytest.approx(3 * 100)
    assert meter.eval_seconds == 3 and meter.train_time() == 24
    assert energy.windows == [
        (15, 25, "train"), (25, 27, "eval"), (27, 35, "train"), (35, 36, "eval"), (36, 39, "train")
    ]  # fmt: skip


def gpu_energy(uuid: str, clock: Clock) -> RunEnergy:
    """A GPU rank's energy, its counter NVML's as the NVIDIA plug-in gives it."""
    return RunEnergy(
        *nvml_counter(uuid), read_host=False, clock=clock, command_start=90.0, sampled_by="NVML"
    )


def gpu_rank(fake: FakeNvml, uuid: str, host: str = "n1") -> tuple[dict, Clock]:
    """A rank's summary after 10 s of training (300 W), 2 s of evaluation (100 W) and 8 s of
    training (300 W), read from the fake counter at each boundary."""
    clock = Clock()
    energy = gpu_energy(uuid, clock)
    for seconds, watts, phase in (
        (10, 300, Phase.TRAIN),
        (2, 100, Phase.EVAL),
        (8, 300, Phase.TRAIN),
    ):
        energy.enter(phase)
        clock.now += seconds
        if energy.device is not None:
            fake.energy_mj["h0"] += seconds * watts * 1000
    energy.enter(None)
    return {"host": host, "uuid": "GPU-" + bare_uuid(uuid), "energy": energy.summary()}, clock


def test_two_gpus_with_counters_sum_to_the_job(fake_nvml):
    first, _ = gpu_rank(fake_nvml, UUID)
    second, _ = gpu_rank(fake_nvml, UUID, host="n2")  # a device of the same counter, 2nd node
    assert first["energy"]["windows"] == [(10.0, 20.0, "train"), (20.0, 22.0, "eval"),
                                          (22.0, 30.0, "train")]  # fmt: skip
    job = job_energy(
        [first, second], [], False, trained_images=5400, train_seconds=18, segments=1,
        expected_devices=2,
    )  # fmt: skip
    assert job["energy_train_j"] == pytest.approx(2 * 18 * 300)
    assert job["energy_eval_j"] == pytest.approx(2 * 2 * 100)
    assert job["images_per_joule"] == pytest.approx(5400 / (2 * 18 * 300))
    assert job["power_train_w"] == pytest.approx(300)
    assert job["energy_source"] == "NVML energy counter" and job["energy_note"] is None
    assert [d["host"] for d in job["energy"]["devices"]] == ["n1", "n2"]


def test_one_device_of_two_without_readings_leaves_the_job_total_null(fake_nvml):
    counted, _ = gpu_rank(fake_nvml, UUID)
    without, _ = gpu_rank(fake_nvml, K8, host="n2")
    job = job_energy([counted, without], [], False, 5400, 18, 1, 2)
    assert job["energy_train_j"] is None and job["images_per_joule"] is None  # never a part
    assert job["energy_eval_j"] is None and job["power_train_w"] is None
    assert "n2: no NVML energy counter on GPU-" in job["energy_note"]
    assert "Not Supported" in job["energy_note"] and "sampled no power" in job["energy_note"]
    assert job["energy"]["devices"][0]["train_j"] == pytest.approx(18 * 300)  # kept per device


def test_a_device_without_a_counter_falls_back_to_its_integrated_power(fake_nvml):
    counted, _ = gpu_rank(fake_nvml, UUID)
    without, _ = gpu_rank(fake_nvml, K8, host="n2")
    # The monitor sampled 250 W on n2's device all along (times since command start).
    samples = [
        {"time": t, "host": "n2", "devices": [{"uuid": f"GPU-{K8}", "power_w": 250.0}]}
        for t in range(0, 40, 5)
    ]
    job = job_energy([counted, without], samples, False, 5400, 18, 1, 2)
    assert job["energy_train_j"] == pytest.approx(18 * 300 + 18 * 250)
    assert job["energy_eval_j"] == pytest.approx(2 * 100 + 2 * 250)
    assert job["energy_source"] == "NVML energy counter; NVML power samples, integrated"
    # ... but not for a resumed run, whose samples cover its last segment only.
    resumed = job_energy([counted, without], samples, False, 5400, 18, 2, 2)
    assert resumed["energy_train_j"] is None and "last segment" in resumed["energy_note"]


def test_a_counter_reset_marks_the_figure_a_lower_bound(fake_nvml):
    clock = Clock()
    energy = gpu_energy(UUID, clock)
    fake_nvml.energy_mj["h0"] = 50_000_000
    energy.enter(Phase.TRAIN)
    fake_nvml.energy_mj["h0"] = 1_000  # the driver reloaded: the counter started again
    clock.now += 5
    energy.read()
    fake_nvml.energy_mj["h0"] += 3_000_000
    clock.now += 10
    energy.read()
    device = energy.summary()["device"]
    assert device["train_j"] == pytest.approx(3000) and device["complete"] is False


def cpu_rank(root: Path, local_rank: int, host: str = "n1") -> dict:
    clock = Clock()
    energy = RunEnergy(None, "the host's", read_host=local_rank == 0, clock=clock,
                       command_start=90.0, rapl_root=root)  # fmt: skip
    for seconds, phase in ((10, Phase.TRAIN), (2, Phase.EVAL)):
        energy.enter(phase)
        clock.now += seconds
        if energy.host:
            for package in ("intel-rapl:0", "intel-rapl:1"):
                path = root / package / "energy_uj"
                path.write_text(str(int(path.read_text()) + seconds * 40 * 10**6))  # 40 W each
    energy.enter(None)
    return {"host": host, "uuid": None, "energy": energy.summary()}


def test_a_cpu_device_counts_its_hosts_packages_once(tmp_path):
    for index in (0, 1):
        write_domain(tmp_path, f"intel-rapl:{index}", f"package-{index}", 0, 2**32)
    ranks = [cpu_rank(tmp_path, 0), cpu_rank(tmp_path, 1)]  # two ranks on one host
    job = job_energy(
        ranks, [], True, trained_images=800, train_seconds=10, segments=1, expected_devices=1
    )
    assert len(job["energy"]["devices"]) == 1  # the host's packages, not once per rank
    assert job["energy_train_j"] == pytest.approx(2 * 40 * 10)
    assert job["energy_eval_j"] == pytest.approx(2 * 40 * 2)
    assert job["images_per_joule"] == pytest.approx(800 / 800)
    assert job["energy_source"] == "RAPL package energy (powercap)"


def test_a_cpu_without_rapl_says_why_and_gives_no_figure(tmp_path):
    ranks = [cpu_rank(tmp_path / "absent", 0)]
    job = job_energy(ranks, [], True, 800, 10, 1, 1)
    assert job["energy_train_j"] is None and job["images_per_joule"] is None
    assert job["energy_note"].startswith("n1: no RAPL package domain under")


@pytest.mark.gpu
def test_the_gpus_counter_counts_the_energy_of_real_work():
    """On a GPU (the GPU check): its NVML counter reads, and work raises it by a plausible power."""
    import time

    device = torch.device("cuda", 0)
    counter, reason = Nvidia().energy_counter(device)
    if counter is None:
        pytest.skip(reason)  # a GPU older than Volta has none: the run says so, as here
    try:
        x = torch.randn(4096, 4096, device=device)
        torch.cuda.synchronize(device)
        before, started = counter.read(), time.perf_counter()
        while time.perf_counter() - started < 2.0:
            x = (x @ x).clamp_(-1, 1)
        torch.cuda.synchronize(device)
        joules, seconds = counter.read() - before, time.perf_counter() - started
    finally:
        counter.close()
    assert 10 < joules / seconds < 2000  # watts of a busy data-centre GPU


def test_a_resumed_rank_goes_on_from_its_checkpointed_energy(fake_nvml):
    first, _ = gpu_rank(fake_nvml, UUID)
    clock = Clock()
    saved = gpu_energy(UUID, clock)
    saved.enter(Phase.TRAIN)
    fake_nvml.energy_mj["h0"] += 10 * 300 * 1000
    clock.now += 10
    saved.read()  # as before a checkpoint
    state = saved.state_dict()

    resumed = gpu_energy(UUID, clock)
    resumed.load_state_dict(state)
    fake_nvml.energy_mj["h0"] += 999_000_000  # between the processes: counted in no phase
    resumed.enter(Phase.TRAIN)
    fake_nvml.energy_mj["h0"] += 8 * 300 * 1000
    clock.now += 8
    resumed.enter(None)
    assert resumed.summary()["device"]["train_j"] == pytest.approx(18 * 300)
    assert first["energy"]["device"]["train_j"] == pytest.approx(18 * 300)


def test_a_failed_runs_single_view_is_not_the_jobs_energy(fake_nvml):
    """A failed run gathers rank 0 alone: one device's joules are not the job's."""
    counted, _ = gpu_rank(fake_nvml, UUID)
    job = job_energy([counted], [], False, 5400, 18, 1, expected_devices=2)
    assert job["energy_train_j"] is None and "the run failed" in job["energy_note"]
    assert job["energy"]["devices"][0]["train_j"] == pytest.approx(18 * 300)
