"""SIGTERM and SIGINT: the first asks the run to stop at a checkpoint, a second exits at once, and
the same signal delivered twice in a moment (by Slurm and by torchrun) is one request. Whole runs
stopped by a signal are in test_checkpoint.py."""

import os
import signal
import subprocess
import sys

from retinaperf.run.signals import SIGNALS, ignore_in_worker, run_child


def test_a_second_signal_exits_at_once():
    code = (
        "import os, signal, time\n"
        "from retinaperf.run.signals import StopRequest\n"
        "with StopRequest(repeat_window_s=0.0) as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.1)\n"
        "    assert stop.requested, 'the first signal only asks'\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=25)
    assert done.returncode == 128 + signal.SIGTERM
    assert "SIGTERM received: stopping after this step" in done.stderr
    assert "received again: exiting now" in done.stderr


def test_a_repeat_within_the_window_is_the_same_request():
    code = (
        "import os, signal, time\n"
        "from retinaperf.run.signals import StopRequest\n"
        "with StopRequest(repeat_window_s=60.0) as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # torchrun forwarding the same one\n"
        "    time.sleep(0.1)\n"
        "print('still running', stop.name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=25)
    assert done.returncode == 0 and "still running SIGTERM" in done.stdout


def test_in_a_job_of_several_ranks_the_messages_say_whose_they_are():
    code = (
        "import os, signal, time\n"
        "from retinaperf.run.signals import StopRequest\n"
        "with StopRequest() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.1)\n"
    )
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=25, env=env
    )
    assert done.stderr.startswith("retinaperf: [rank 1] SIGTERM received: stopping")


def test_data_loader_workers_leave_the_signals_to_the_training_process():
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        ignore_in_worker(0)
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in SIGNALS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


CHILD = (
    "import sys, time\n"
    "from retinaperf.run.signals import StopRequest\n"
    "with StopRequest() as stop:\n"
    "    print('ready', flush=True)\n"
    "    while not stop.requested:\n"
    "        time.sleep(0.05)\n"
    "sys.exit(128 + stop.signal)\n"
)


def test_a_launcher_hands_sigterm_to_its_run_and_leaves_sigint_to_the_terminal():
    parent = (
        "import sys\n"
        "from retinaperf.run.signals import run_child\n"
        f"sys.exit(run_child([sys.executable, '-c', {CHILD!r}]))\n"
    )
    job = subprocess.Popen(
        [sys.executable, "-c", parent], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert job.stdout.readline().strip() == "ready"
        job.send_signal(signal.SIGINT)  # to the launcher alone: ignored, the run goes on
        job.send_signal(signal.SIGTERM)  # handed on: the run stops as it would itself
        _, err = job.communicate(timeout=20)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 128 + signal.SIGTERM
    assert "SIGTERM received" in err and "SIGINT" not in err


def test_a_child_a_signal_ended_exits_as_a_shell_says_128_plus_the_signal():
    """Popen gives -N for a child signal N ended: the launcher, `--repeat` and a sweep's point
    say 128 + N, as a shell does (what a sweep reads as interrupted, 130 and 143)."""
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert run_child([sys.executable, "-c", killed]) == 128 + signal.SIGKILL
    assert run_child([sys.executable, "-c", "raise SystemExit(3)"]) == 3
