"""retinaperf as a FlagPerf case (integrations/flagperf): FlagPerf's config files read as data,
their keys as retinaperf's settings (the shipped A100 configs as the seed's presets), and two
ranks started as FlagPerf's harness starts them, without torchrun."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from retinaperf import config
from retinaperf.config import flagperf
from retinaperf.errors import UserError

FLAGPERF = Path(__file__).resolve().parent.parent / "integrations" / "flagperf" / "training"
SCRIPT = FLAGPERF / "benchmarks" / "retinaperf" / "pytorch" / "run_pretraining.py"
VENDOR_CONFIGS = FLAGPERF / "nvidia" / "retinaperf-pytorch" / "config"


def load_script():
    spec = importlib.util.spec_from_file_location("run_pretraining", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# FlagPerf's training/benchmarks/retinanet/pytorch/config/_base.py (commit 1b5a0303), its
# settings without the comments: every key of FlagPerf's RetinaNet case.
FLAGPERF_BASE = """\
vendor: str = "nvidia"
data_dir: str = None
name: str = "retinanet"
cudnn_benchmark: bool = False
cudnn_deterministic: bool = True
train_data: str = "train"
eval_data: str = "val"
aspect_ratio_group_factor: int = 3
num_classes: int = 90
lr: float = 0.08
weight_decay: float = 1e-4
momentum: float = 0.9
lr_steps: list = [16, 22]
lr_gamma: float = 0.1
train_batch_size: int = 16
eval_batch_size: int = 16
target_mAP: float = 0.35
max_epoch: int = 26
do_train = True
fp16 = False
distributed: bool = True
warmup = 0.1
seed: int = 0
dist_backend: str = 'nccl'
num_workers: int = 4
device: str = None
local_rank: int = -1
use_env: bool = True
log_freq: int = 100
print_freq: int = 100
n_device: int = 1
amp: bool = False
sync_bn: bool = False
gradient_accumulation_steps: int = 1
cudnn_benchmark: bool = True
cudnn_deterministic: bool = False
pretrained_path = "resnet50-0676ba61.pth"
"""


def test_a_config_is_read_as_its_literal_settings(tmp_path):
    path = write(
        tmp_path / "config_A100x1x8.py",
        '"""A docstring."""\nvendor: str = "nvidia"\nlr = 0.08\nlr_steps = [16, 22]\nlr = 0.1\n',
    )
    assert flagperf.read_config(path) == {"vendor": "nvidia", "lr": 0.1, "lr_steps": [16, 22]}


@pytest.mark.parametrize(
    ("source", "line", "shown"),
    [
        ("lr = 0.08\nopen('ran', 'w')\n", 2, "`open('ran', 'w')`"),
        ("lr = float(open('ran', 'w').write('x'))\n", 1, "`lr = float(open('ran', 'w')"),
        ("from config_common import *\n", 1, "`from config_common import *`"),
        ("import os\nlr = 0.08\n", 1, "`import os`"),
        ("lr = 0.04 * 2\n", 1, "`lr = 0.04 * 2`"),
        ("lr: float\n", 1, "`lr: float`"),
    ],
)
def test_anything_but_a_literal_setting_is_refused_naming_the_line_and_never_run(
    source, line, shown, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "config_A100x1x8.py", source)
    with pytest.raises(UserError) as refused:
        flagperf.read_config(path)
    message = str(refused.value)
    assert message.startswith(f"FlagPerf config {path}, line {line}: {shown}")
    assert "never runs them" in message and "write each value itself" in message
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("shape", ["1x1", "1x8", "2x8"])
def test_the_shipped_a100_configs_are_the_seeds_presets(shape):
    arguments = flagperf.run_arguments(VENDOR_CONFIGS / f"config_A100x{shape}.py", None, [])
    assert arguments[:3] == ["run", "--preset", f"A100-{shape}"]
    pairs = arguments[4::2]
    assert config.resolve(f"A100-{shape}", config.parse_overrides(pairs)) == config.resolve(
        f"A100-{shape}", {}
    )


def test_every_key_of_flagperfs_retinanet_is_mapped_checked_or_ignored(tmp_path):
    base = write(tmp_path / "config_A100x1x8.py", FLAGPERF_BASE)
    pairs = flagperf.set_pairs(flagperf.read_config(base), base)
    # in the file's order; a key set twice (cudnn_benchmark) where it was first, with its last
    # value, as an import would leave it
    assert pairs == [
        "cudnn_benchmark=on",
        "aspect_ratio_group_factor=3",
        "lr=0.08",
        "weight_decay=0.0001",
        "momentum=0.9",
        "lr_steps=16,22",
        "lr_gamma=0.1",
        "batch_size=16",
        "eval_batch_size=16",
        "target_map=0.35",
        "epochs=26",
        "seed=0",
        "num_workers=4",
        "log_every=100",
    ]
    resolved = config.resolve("A100-1x8", config.parse_overrides(pairs))
    assert (resolved.train.epochs, resolved.train.lr_steps) == (26, (16, 22))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("hidden_size = 1024\n", "unknown key 'hidden_size': retinaperf maps "),
        ("do_train = False\n", "do_train=False: retinaperf's case runs with do_train=True only"),
        ("fp16 = True\namp = True\n", "precision=fp16 and precision=amp: set fp16 or amp"),
    ],
)
def test_a_key_that_would_change_the_workload_unseen_is_refused(source, message, tmp_path):
    path = write(tmp_path / "config_A100x1x8.py", source)
    with pytest.raises(UserError, match=message):
        flagperf.set_pairs(flagperf.read_config(path), path)


def test_the_preset_follows_the_config_files_shape():
    assert flagperf.preset_for("config_H100x2x8.py") == ("A100-2x8", [])
    assert flagperf.preset_for("config_H100x1x4.py") == (
        "A100-1x8",
        ["nodes=1", "devices_per_node=4"],
    )
    with pytest.raises(UserError, match=r"config_<hardware>x<nodes>x<devices>\.py"):
        flagperf.preset_for("my_config.py")


HARNESS_ARGS = ["--vendor", "nvidia", "--enable_extern_config", "--extern_module_dir", "ext"]


def test_the_script_maps_the_harness_arguments_and_asks_for_perflog(tmp_path, monkeypatch):
    script = load_script()
    write(tmp_path / "config_A100x1x8.py", 'data_dir = "/in/the/file"\nlr = 0.02\n')
    args = script.parse_args(
        [
            *("--extern_config_dir", str(tmp_path), "--extern_config_file", "config_A100x1x8.py"),
            *("--data_dir", "/data/coco2017", *HARNESS_ARGS, "--set", "max_steps=5"),
        ]
    )
    expected = ["run", "--preset", "A100-1x8"]
    expected += ["--set", "data_dir=/data/coco2017", "--set", "lr=0.02", "--set", "max_steps=5"]
    # with the setting that prints FlagPerf's [PerfLog] lines: asked for on every rank
    keys = [*config.all_keys(), config.Key("perflog_console", "true|false", "false", "")]
    monkeypatch.setattr(config, "all_keys", lambda: keys)
    assert script.run_arguments(args) == [*expected, "--set", "perflog_console=true"]


def test_without_perflog_in_the_installed_retinaperf_the_script_runs_and_says_so(
    tmp_path, monkeypatch, capsys
):
    script = load_script()
    write(tmp_path / "config_A100x1x1.py", "lr = 0.04\n")
    keys = [key for key in config.all_keys() if key.name != script.PERFLOG]
    monkeypatch.setattr(config, "all_keys", lambda: keys)
    args = script.parse_args(
        ["--extern_config_dir", str(tmp_path), "--extern_config_file", "config_A100x1x1.py"]
    )
    assert script.run_arguments(args) == ["run", "--preset", "A100-1x1", "--set", "lr=0.04"]
    assert "no perflog_console setting" in capsys.readouterr().err


def test_a_refused_config_is_one_line_and_exit_status_one(tmp_path, capsys):
    script = load_script()
    write(tmp_path / "config_A100x1x8.py", "from config_common import *\n")
    code = script.main(
        ["--extern_config_dir", str(tmp_path), "--extern_config_file", "config_A100x1x8.py"]
    )
    assert code == 1
    assert capsys.readouterr().err.startswith("retinaperf: error: FlagPerf config ")


# The tiny run of conftest's tiny_run_args, as a FlagPerf config of a 1x2 shape: FlagPerf's keys
# where it has them, retinaperf's own in `retinaperf = {...}`.
TINY_CASE = """\
vendor: str = "nvidia"
train_batch_size = 2
eval_batch_size = 4
num_workers = 0
max_epoch = 1
log_freq = 1
retinaperf = {{
    "min_size": 64, "max_size": 86, "precision": "fp32", "max_steps": 2,
    "backbone_weights": "none", "output_dir": "{out}",
}}
"""


@pytest.fixture(scope="module")
def harness_run(tiny_dataset, tmp_path_factory):
    """Two ranks of one node started as FlagPerf's start_pytorch_task.py starts them: `python -u
    run_pretraining.py ...` per rank, RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    and NODE_RANK set, no torchrun; each rank's output and errors in one log, as its `2>&1 | tee
    rank<R>.out.log`. Returns (exit statuses, logs, run directory)."""
    from test_distributed import per_rank_environments

    work = tmp_path_factory.mktemp("flagperf")
    out = work / "run"
    configs = work / "config"
    configs.mkdir()
    write(configs / "config_CPUx1x2.py", TINY_CASE.format(out=out))
    command = [sys.executable, "-u", str(SCRIPT), "--extern_config_dir", str(configs)]
    command += ["--extern_config_file", "config_CPUx1x2.py", "--data_dir", str(tiny_dataset)]
    command += [*HARNESS_ARGS[:-1], str(work / "extern")]
    ranks = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for env in per_rank_environments(nodes=1, per_node=2)
    ]
    logs = [rank.communicate(timeout=300)[0] for rank in ranks]
    return [rank.returncode for rank in ranks], logs, out


@pytest.mark.integration
def test_two_ranks_started_as_flagperfs_harness_starts_them_complete(harness_run):
    codes, logs, out = harness_run
    assert codes == [0, 0], "\n".join(f"rank {r}:\n{log[-3000:]}" for r, log in enumerate(logs))
    results = json.loads((out / "results.json").read_text())
    m = results["metrics"]
    assert (m["world_size"], m["nodes"], m["devices_per_node"]) == (2, 1, 2)
    assert m["steps"] == 2 and m["trained_images"] == 2 * 2 * 2
    assert results["config"]["preset"] == "A100-1x8"
    assert logs[0].count("| 配置 |") == 1


@pytest.mark.integration
def test_rank_zeros_log_holds_one_finished_line_with_the_runs_throughputs(harness_run):
    """What FlagPerf's CI greps rank 0's log for: one FINISHED line, whose throughputs are the
    run's p_whole, p_train and p_core; no other rank prints one."""
    codes, logs, out = harness_run
    assert codes == [0, 0]
    finished = [line for line in logs[0].splitlines() if '"event": "FINISHED"' in line]
    assert len(finished) == 1 and finished[0].startswith("[PerfLog] ")
    value = json.loads(finished[0].removeprefix("[PerfLog] "))["value"]
    m = json.loads((out / "results.json").read_text())["metrics"]
    assert value["throughput(ips)_raw"] == m["p_whole"]
    assert value["throughput(ips)_no_eval"] == m["p_train"]
    assert value["throughput(ips)_pure_compute"] == m["p_core"]
    assert "[PerfLog]" not in logs[1]
