"""Two torchrun "nodes" on this machine, round after round: does every process exit clean?

Each round starts two torchrun agents of one process each, which meet in a c10d rendezvous on
loopback as two nodes of a cluster do, and run `retinaperf run` (default: the smoke preset, 3
steps and its evaluation) into a folder of their own. A round is clean when both agents exit 0
within the time limit, neither's output holds an abort ("terminate called", SIGABRT) and
results.json says `completed`. A worker that aborts at exit after writing its results (a
collective's thread outliving the process group) is what this counts; rare faults need many
rounds to show. Prints one line per round and the count of clean ones; exits 1 unless all are.
Not part of `make test`: 30 rounds take about 15 minutes on a 2-core CPU.

    .venv/bin/python benchmarks/stress_nodes.py [--rounds 30] [--out DIR] [-- RUN ARGS...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ABORTS = ("terminate called", "SIGABRT", "Signal 6", "core dumped")
DEFAULT_RUN_ARGS = ["--preset", "smoke", "--set", "max_steps=3"]


@dataclass
class Round:
    number: int
    exit_codes: list[int | None]  # None: killed at the time limit
    status: str | None  # results.json's, None if none was written
    aborts: list[str]  # the abort markers found in each node's output
    seconds: float

    @property
    def clean(self) -> bool:
        return self.exit_codes == [0, 0] and self.status == "completed" and not self.aborts

    def line(self) -> str:
        verdict = "clean" if self.clean else "NOT CLEAN"
        found = f"; aborts: {', '.join(self.aborts)}" if self.aborts else ""
        return (
            f"round {self.number}: {verdict} (exit codes {self.exit_codes}, status "
            f"{self.status}, {self.seconds:.0f} s{found})"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(number: int, out: Path, run_args: list[str], timeout_s: float) -> Round:
    """One round: two agents, the same command, one rendezvous; logs in out/node-<N>.log."""
    out.mkdir(parents=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    command = [
        *torchrun,
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        f"stress-{os.getpid()}-{number}",
        "-m",
        "retinaperf",
        "run",
        "--output-dir",
        str(out / "run"),
        *run_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    logs = [out / f"node-{node}.log" for node in (0, 1)]
    nodes = []
    for log in logs:
        with log.open("w") as sink:  # the child holds its own descriptor
            nodes.append(subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT))
    exit_codes: list[int | None] = []
    for node in nodes:
        try:
            exit_codes.append(node.wait(timeout=max(1.0, timeout_s - (time.monotonic() - started))))
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
            exit_codes.append(None)
    results = out / "run" / "results.json"
    status = json.loads(results.read_text())["status"] if results.exists() else None
    text = [log.read_text(errors="replace") for log in logs]
    aborts = [f"node {i}: {m}" for i, t in enumerate(text) for m in ABORTS if m in t]
    return Round(number, exit_codes, status, aborts, time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="how many rounds (default: 30)")
    parser.add_argument("--out", type=Path, help="new folder for the rounds (default: temporary)")
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds a round may take (default: 600)"
    )
    parser.add_argument(
        "run_args",
        nargs="*",
        help=f"`retinaperf run` arguments (default: {' '.join(DEFAULT_RUN_ARGS)})",
    )
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="stress-nodes-"))
    run_args = args.run_args or DEFAULT_RUN_ARGS
    print(f"{args.rounds} rounds of two torchrun nodes: retinaperf run {' '.join(run_args)}")
    print(f"logs and run directories in {out}", flush=True)
    rounds = []
    for number in range(1, args.rounds + 1):
        rounds.append(two_nodes(number, out / f"round-{number:03d}", run_args, args.timeout))
        print(rounds[-1].line(), flush=True)
    clean = sum(r.clean for r in rounds)
    print(f"\nclean rounds: {clean} of {len(rounds)}")
    return 0 if clean == len(rounds) else 1


if __name__ == "__main__":
    raise SystemExit(main())
