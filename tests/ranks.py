"""Runs tests/integration/trainers/ddp_trainer.py as N local rank processes (the reference runs of multi-rank tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

TRAINER = Path(__file__).parent / "integration" / "trainers" / "ddp_trainer.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_ranks(ckpt_dir: Path, out: Path, mode: str, steps: int, *extra: str, world: int = 2,
                rank_env: dict[int, dict[str, str]] | None = None) -> list[subprocess.Popen[str]]:
    """Every rank of one local run, rendezvous on 127.0.0.1 (stdout and stderr merged, as text); `rank_env` adds
    variables to some ranks only."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPT_", "MASTER_", "RANK", "WORLD_"))}
        env.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   GLOO_SOCKET_IFNAME="lo", **(rank_env or {}).get(rank, {}))
        cmd = [sys.executable, str(TRAINER), "--dir", str(ckpt_dir), "--out", str(out), "--mode", mode,
               "--steps", str(steps), *extra]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    return procs


def finish(procs: list[subprocess.Popen[str]], timeout: float = 180) -> list[tuple[int, str]]:
    """(exit code, output) of every rank."""
    return [(proc.wait(timeout=timeout), proc.stdout.read() if proc.stdout else "") for proc in procs]
