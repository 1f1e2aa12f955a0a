"""examples/slurm/retinaperf.sbatch under a real Slurm: the script as shipped runs a job to its
end; a job Slurm requeues stops with a checkpoint, goes on from it and appends to its log; the
time limit's SIGTERM stops the run with a checkpoint; a completed run's job submitted again ends
at once.

Those need the one-node cluster `.ci/slurm.sh start` sets up on this machine (root, Debian's
slurmctld/slurmd/munge): without it they are skipped, saying so, unless
RETINAPERF_REQUIRE_SLURM=1 (CI sets it), where they fail. The rest need no Slurm: the script run
by bash with a job's environment and stand-ins for srun and scontrol (what it derives from the
allocation, which run it starts), bash -n and shellcheck."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "examples" / "slurm" / "retinaperf.sbatch"
SHELL_SCRIPTS = [SCRIPT, ROOT / ".ci" / "slurm.sh", ROOT / ".ci" / "run"]
REQUIRE = "RETINAPERF_REQUIRE_SLURM"
CLUSTER = "retinaperf-ci"  # .ci/slurm.sh's ClusterName
# The script asks for 2 nodes of 8 GPUs; this shrinks it to this machine, on sbatch's command line
# as a site would. A Slurm without GPUs (no GresTypes=gpu) refuses --gpus-per-node=8 ("Invalid
# generic resource (gres) specification") and takes 0: no GPU, so the script runs 1 process.
SHAPE = ["--nodes=1", "--gpus-per-node=0"]
# What the script reads from the environment; the tests set each (a developer's own are dropped).
VARIABLES = (
    "RETINAPERF_DIR",
    "RETINAPERF_VENV",
    "RETINAPERF_DATA_DIR",
    "RETINAPERF_WEIGHTS",
    "RETINAPERF_PRESET",
    "RETINAPERF_OUTPUT_DIR",
    "RETINAPERF_ARGS",
    "RETINAPERF_RESUME_ARGS",
    "RETINAPERF_NUM_WORKERS",
    "RETINAPERF_RDZV_PORT",
    "RETINAPERF_SHUTDOWN_TIMEOUT",
)
# Steps of the runs that are stopped: the first checkpoint comes after step 1, the signal before
# the last.
STEPS = 4
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def _required(reason: str) -> None:
    """Fail where Slurm must be there (CI), skip elsewhere."""
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{reason} ({REQUIRE}=1: the Slurm tests must run)")
    pytest.skip(f"{reason}: `bash .ci/slurm.sh start` (as root) starts a one-node Slurm here")


def _command(*args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def node_cpus() -> int:
    """The CPUs of the one node of .ci/slurm.sh's cluster, once it is seen to answer."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        _required("no Slurm: sbatch and scontrol are not on PATH")
    ping = _command("scontrol", "ping")
    if "is UP" not in ping.stdout:
        said = (ping.stdout + ping.stderr).strip().splitlines() or ["nothing"]
        _required(f"slurmctld does not answer (scontrol ping: {said[0]})")
    cluster = re.search(
        r"^ClusterName\s*=\s*(\S+)", _command("scontrol", "show", "config").stdout, re.M
    )
    if cluster is None or cluster[1] != CLUSTER:
        # The jobs read and write this machine's temporary folders: on another cluster's nodes
        # they would not find them.
        _required(f"this Slurm is not .ci/slurm.sh's one-node cluster {CLUSTER}")
    nodes = _command("sinfo", "-h", "-N", "-o", "%t %c").stdout.split()
    if len(nodes) != 2 or nodes[0] not in ("idle", "mix", "alloc"):
        _required(f"the node of {CLUSTER} is not up (sinfo: {' '.join(nodes) or 'nothing'})")
    return int(nodes[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_env(tiny_run_args, data_dir: Path, out: Path, resume_args: str = "", **settings) -> dict:
    """The environment of `sbatch`: the script's variables for a tiny run of this checkout."""
    args = tiny_run_args(data_dir, out, **settings)
    pairs = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
    env = {name: value for name, value in os.environ.items() if name not in VARIABLES}
    return env | {
        "RETINAPERF_DIR": str(ROOT),
        "RETINAPERF_VENV": sys.prefix,  # the environment running the tests
        "RETINAPERF_DATA_DIR": str(data_dir),
        "RETINAPERF_WEIGHTS": "none",
        "RETINAPERF_PRESET": "smoke",
        "RETINAPERF_OUTPUT_DIR": str(out),
        # num_workers comes from the allocation (the script's own derivation is tested).
        "RETINAPERF_ARGS": " ".join(
            f"--set {pair}" for pair in pairs if not pair.startswith("num_workers=")
        ),
        "RETINAPERF_RESUME_ARGS": resume_args,
        "RETINAPERF_RDZV_PORT": str(_free_port()),
    }


def _submit(env: dict, cwd: Path) -> str:
    """`sbatch` the script in the repository as it is; the job's id. Its log, %x-%j.out, goes to
    `cwd`."""
    done = _command("sbatch", "--parsable", *SHAPE, str(SCRIPT), env=env, cwd=cwd)
    assert done.returncode == 0, f"sbatch refused the script: {done.stderr}"
    return done.stdout.strip().split(";")[0]


def _job(job_id: str) -> dict[str, str]:
    """`scontrol show job`'s fields (those without spaces in their values)."""
    done = _command("scontrol", "show", "job", "-o", job_id)
    assert done.returncode == 0, done.stderr
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def _wait(job_id: str, log: Path, until: Callable[[dict], bool], what: str, timeout: float) -> dict:
    """Poll the job until `until(fields)`; a job that ends first or a timeout fails the test,
    showing the job and its log."""
    deadline = time.monotonic() + timeout
    while True:
        fields = _job(job_id)
        if until(fields):
            return fields
        ended = fields["JobState"] in ENDED
        if ended or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
            why = f"ended {fields['JobState']}" if ended else f"not within {timeout:.0f} s"
            pytest.fail(f"job {job_id}: {what}: {why}; {fields}\n--- {log}:\n{tail}")
        time.sleep(0.1)


def _ended(fields: dict) -> bool:
    return fields["JobState"] in ENDED


def _cancel(job_id: str) -> None:
    """Whatever happened, leave no job behind (an ended job's scancel does nothing)."""
    _command("scancel", job_id)


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _expected_workers(node_cpus: int) -> int:
    """What the script derives: the node's CPUs (--exclusive) for its 1 process, less 1."""
    return max(node_cpus - 1, 0)


@pytest.fixture(scope="module")
def completed_job(node_cpus, tiny_run_args, tiny_dataset, tmp_path_factory):
    """The script as shipped, shrunk to this machine: one job to its end. Its id, its state,
    its log, its run directory."""
    work = tmp_path_factory.mktemp("slurm-completed")
    out = work / "run"
    env = _job_env(tiny_run_args, tiny_dataset, out, max_steps=1)
    job_id = _submit(env, work)
    log = work / f"retinaperf-{job_id}.out"
    try:
        fields = _wait(job_id, log, _ended, "to end", timeout=300)
    finally:
        _cancel(job_id)
    return {"id": job_id, "fields": fields, "log": log, "out": out, "env": env, "work": work}


def test_the_script_as_shipped_runs_a_job_to_its_end(completed_job, node_cpus):
    fields, out = completed_job["fields"], completed_job["out"]
    log = completed_job["log"].read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    results = _results(out)
    assert results["status"] == "completed"
    assert [segment["ended"] for segment in results["segments"]] == ["completed"]
    assert results["metrics"]["steps"] == 1
    # 1 process (no GPU), its data-loader workers from the CPUs Slurm gave the job.
    assert results["config"]["data"]["num_workers"] == _expected_workers(node_cpus)
    assert f"1 node(s) x 1 process(es), {_expected_workers(node_cpus)} data-loader" in log
    assert f"a new run in {out}" in log
    assert f"results: {out / 'results.json'}" in log  # the run's own output reached the log


def test_a_completed_runs_job_submitted_again_ends_at_once_leaving_the_run(completed_job):
    out, work = completed_job["out"], completed_job["work"]
    before = (out / "results.json").read_bytes()
    job_id = _submit(completed_job["env"], work)
    log = work / f"retinaperf-{job_id}.out"
    try:
        fields = _wait(job_id, log, _ended, "to end", timeout=120)
    finally:
        _cancel(job_id)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert f"{out} holds a completed run (results.json): nothing left to do" in text
    assert "retinaperf run:" not in text  # nothing was started
    assert (out / "results.json").read_bytes() == before


def _wait_for_a_checkpoint(job_id: str, log: Path, out: Path) -> None:
    """Until the job's run has written its first checkpoint (a stop then has one to keep)."""
    checkpoints = out / "checkpoints"
    _wait(
        job_id,
        log,
        lambda _: any(checkpoints.glob("step-*.pt")),
        "to write its first checkpoint",
        timeout=300,
    )


def test_a_requeued_job_goes_on_from_its_checkpoint_and_appends_to_its_log(
    node_cpus, tiny_run_args, tiny_dataset, tmp_path
):
    out = tmp_path / "run"
    # A timed checkpoint after every step, so that the first comes after step 1 of 4: the requeue
    # reaches the run with steps to go (the writes are serial, so step 2's waits for step 1's to
    # be on disk). The resumed half writes none (a key a resumed run may change, given to the job
    # from the start).
    env = _job_env(
        tiny_run_args,
        tiny_dataset,
        out,
        resume_args="--set checkpoint_minutes=0",
        max_steps=STEPS,
        checkpoint_minutes=0.001,
    )
    job_id = _submit(env, tmp_path)
    log = tmp_path / f"retinaperf-{job_id}.out"
    try:
        _wait_for_a_checkpoint(job_id, log, out)
        requeue = _command("scontrol", "requeue", job_id)
        assert requeue.returncode == 0, requeue.stderr
        # Slurm SIGTERMs the job (SIGKILL after KillWait, 30 s), then holds it pending for about
        # 2 minutes (Reason=BeginTime); StartTime=now lets it start again at once.
        fields = _wait(
            job_id, log, lambda f: f["JobState"] == "PENDING", "to stop and wait", timeout=120
        )
        assert fields["Restarts"] == "1"
        update = _command("scontrol", "update", f"jobid={job_id}", "StartTime=now")
        assert update.returncode == 0, update.stderr
        fields = _wait(job_id, log, _ended, "to end after its requeue", timeout=300)
    finally:
        _cancel(job_id)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]

    results = _results(out)
    assert results["status"] == "completed"
    first, second = results["segments"]  # exactly two
    assert (first["ended"], second["ended"]) == ("interrupted", "completed")
    assert second["start_step"] == first["end_step"] < STEPS
    assert second["resumed_from"] == f"step-{first['end_step']:08d}.pt"
    assert results["metrics"]["steps"] == STEPS
    assert results["config"]["checkpoint_minutes"] == 0  # RETINAPERF_RESUME_ARGS, resumed half

    # One log, both starts in order (--open-mode=append; without it the first is lost).
    starts = [
        text.index(f"job {job_id}, start 1 "),
        text.index("SIGTERM received"),
        text.index(f"interrupted at step {first['end_step']} (stopped by SIGTERM"),
        text.index(f"job {job_id}, start 2 "),
        text.index(f"going on with the run in {out} (interrupted)"),
        text.index(f"from step {first['end_step']}"),
        text.index(f"results: {out / 'results.json'}"),
    ]
    assert starts == sorted(starts), text[-3000:]
    assert text.count("retinaperf run: preset smoke") == 2


def test_the_time_limits_sigterm_stops_the_run_with_a_checkpoint_and_says_how_to_go_on(
    node_cpus, tiny_run_args, tiny_dataset, tmp_path
):
    out = tmp_path / "run"
    env = _job_env(tiny_run_args, tiny_dataset, out, max_steps=STEPS, checkpoint_minutes=0.001)
    job_id = _submit(env, tmp_path)
    log = tmp_path / f"retinaperf-{job_id}.out"
    try:
        _wait_for_a_checkpoint(job_id, log, out)
        # What --signal=TERM@300 does before the time limit: SIGTERM to the job's steps (here
        # torchrun, which forwards it), not to the batch script, which carries on after srun.
        signal = _command("scancel", "--signal=TERM", job_id)
        assert signal.returncode == 0, signal.stderr
        fields = _wait(job_id, log, _ended, "to end", timeout=120)
    finally:
        _cancel(job_id)
    text = log.read_text()
    assert fields["JobState"] == "FAILED", text[-3000:]  # not requeued: the run did not end
    results = _results(out)
    assert results["status"] == "interrupted"
    assert [segment["ended"] for segment in results["segments"]] == ["interrupted"]
    assert (out / "checkpoints" / f"step-{results['metrics']['steps']:08d}.pt").is_file()
    assert f"submit again with RETINAPERF_OUTPUT_DIR={out}" in text


def _script_outside_slurm(tmp_path: Path, slurm: dict[str, str], **variables: str):
    """The script run by bash with what a job's environment holds (`slurm`), srun and scontrol
    stand-ins on PATH: its exit status, output, and the command srun was given (None if not
    called)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    called = tmp_path / "srun-args"
    called.unlink(missing_ok=True)
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {called}\n')
    # `show hostnames`: the second name once the reader could have gone (SIGPIPE if it has).
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node7\nsleep 0.1\necho node8\n")
    for stand_in in ("srun", "scontrol"):
        (bin_dir / stand_in).chmod(0o755)
    env = {name: value for name, value in os.environ.items() if name not in VARIABLES}
    env = {name: value for name, value in env.items() if not name.startswith("SLURM")}
    env |= {
        "PATH": f"{bin_dir}:{env['PATH']}",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node[7-8]",
        "SLURM_NNODES": "2",
        "RETINAPERF_VENV": sys.prefix,
        "RETINAPERF_OUTPUT_DIR": str(tmp_path / "run"),
        **slurm,
        **variables,
    }
    done = _command("bash", str(SCRIPT), env=env)
    return done, called.read_text().splitlines() if called.exists() else None


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.mark.parametrize(
    ("slurm", "processes", "workers"),
    [
        (
            {"SLURM_GPUS_ON_NODE": "8", "SLURM_GPUS_PER_NODE": "8", "SLURM_CPUS_ON_NODE": "128"},
            8,
            15,
        ),
        ({"SLURM_GPUS_PER_NODE": "a100:4", "SLURM_CPUS_ON_NODE": "32"}, 4, 7),
        ({"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "4"}, 8, 0),  # fewer CPUs than GPUs
        ({"SLURM_GPUS_PER_NODE": "0", "SLURM_CPUS_ON_NODE": "2"}, 1, 1),  # --gpus-per-node=0
        ({}, 1, 0),  # no GPU asked for, no CPU count
    ],
)
def test_processes_and_workers_come_from_the_allocation(tmp_path, slurm, processes, workers):
    done, command = _script_outside_slurm(tmp_path, slurm)
    assert done.returncode == 0, done.stderr
    assert _option(command, "--nproc-per-node") == str(processes)
    assert f"num_workers={workers}" in command
    assert _option(command, "--nnodes") == "2"
    assert _option(command, "--rdzv-endpoint") == "node7:29500"  # the first node
    assert _option(command, "--rdzv-id") == "42"
    assert _option(command, "--shutdown-timeout") == "240"  # below the 300 s of --signal


def test_the_script_starts_a_run_goes_on_with_one_or_leaves_a_completed_one(tmp_path):
    slurm = {"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "64"}
    variables = {
        "RETINAPERF_DATA_DIR": "/data/coco",
        "RETINAPERF_PRESET": "A100-2x8",
        "RETINAPERF_ARGS": "--set epochs=2  --set log_every=50",
        "RETINAPERF_RESUME_ARGS": "--set log_every=10",
        "RETINAPERF_NUM_WORKERS": "3",
        "RETINAPERF_SHUTDOWN_TIMEOUT": "100",
    }
    out = tmp_path / "run"
    done, command = _script_outside_slurm(tmp_path, slurm, **variables)
    assert done.returncode == 0, done.stderr
    run = command[command.index("retinaperf") + 1 :]
    assert run == [
        *("run", "--preset", "A100-2x8", "--data-dir", "/data/coco", "--output-dir", str(out)),
        *("--set", "epochs=2", "--set", "log_every=50", "--set", "num_workers=3"),
    ]  # no --backbone-weights: the default
    assert _option(command, "--shutdown-timeout") == "100"

    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "results.json").write_text('{"status": "interrupted"}')
    done, command = _script_outside_slurm(tmp_path, slurm, **variables)
    assert done.returncode == 0, done.stderr
    run = command[command.index("retinaperf") + 1 :]
    assert run == ["run", "--resume", str(out), "--set", "log_every=10", "--set", "num_workers=3"]
    assert f"going on with the run in {out} (interrupted)" in done.stdout

    (out / "results.json").write_text('{"status": "completed"}')
    done, command = _script_outside_slurm(tmp_path, slurm, **variables)
    assert (done.returncode, command) == (0, None)  # srun not called
    assert f"{out} holds a completed run (results.json): nothing left to do" in done.stdout


def test_the_shell_scripts_parse():
    for script in SHELL_SCRIPTS:
        done = _command("bash", "-n", str(script))
        assert done.returncode == 0, f"{script}: {done.stderr}"


def test_the_shell_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"shellcheck is not installed ({REQUIRE}=1: .ci/run installs it)")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = _command("shellcheck", *map(str, SHELL_SCRIPTS))
    assert done.returncode == 0, done.stdout + done.stderr
