"""`vfl train` for a party of W workers on one machine: start W copies of this command as its workers, with
the environment torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free
MASTER_PORT), and wait. When one fails, the others are stopped (SIGTERM, so each tells its peers; SIGKILL after a
grace period) and the launcher exits with the first failure's code; SIGTERM or Ctrl-C here stops them all.
Under torchrun this module is not used: torchrun is the launcher."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

STOP_GRACE_S = 10.0  # how long a stopped worker has to tell its peers before it is killed
POLL_S = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(rank: int, count: int, port: int) -> dict[str, str]:
    env = os.environ | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(count),
                        "LOCAL_WORLD_SIZE": str(count), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if "GLOO_SOCKET_IFNAME" not in env and "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # the workers' all-reduce stays on loopback
    return env


def stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every worker still running, then SIGKILL those still running after the grace period."""
    running = [p for p in processes if p.poll() is None]
    for p in running:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in running:
        try:
            p.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(argv: Sequence[str], count: int) -> int:
    """Run `vfl <argv>` as `count` workers; 0 when every worker exits 0, else the first failure's exit code."""
    port = free_port()
    processes = [subprocess.Popen([sys.executable, "-m", "vfl_cli", *argv], env=worker_env(rank, count, port))
                 for rank in range(count)]

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        stop(processes)
        sys.exit(128 + signum)

    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = next((code for code in codes if code not in (None, 0)), None)
            if failed is not None:
                stop(processes)
                return failed if failed > 0 else 128 - failed  # killed by a signal: 128 + its number
            if all(code == 0 for code in codes):
                return 0
            time.sleep(POLL_S)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
