"""Runs tests/integration/trainers/ddp_trainer.py as N local rank processes (the reference runs of multi-rank tests)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

TRAINER = Path(__file__).parent / "integration" / "trainers" / "ddp_trainer.py"


EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")


def rendezvous_port() -> int:
    """A free port for MASTER_PORT, below the kernel's ephemeral range: between this call and rank 0's listen
    (seconds of imports later), no other process's bind(0) or outgoing connection can take it."""
    low = int(EPHEMERAL_PORTS.read_text().split()[0]) if EPHEMERAL_PORTS.exists() else 32768
    for port in random.sample(range(max(1024, low - 10000), low), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low} for a rendezvous")


def start_ranks(ckpt_dir: Path, out: Path, mode: str, steps: int, *extra: str, world: int = 2,
                rank_env: dict[int, dict[str, str]] | None = None) -> list[subprocess.Popen[str]]:
    """Every rank of one local run, rendezvous on 127.0.0.1 (stdout and stderr merged, as text); `rank_env` adds
    variables to some ranks only."""
    port = rendezvous_port()
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
