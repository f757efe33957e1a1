"""Two real processes over mutual TLS through a bad network: each party reaches the other through a
`FaultProxy` that drops 5% of connections, adds 50 ms to every chunk and cuts 1% of request chunks. The run
must end with the same final test AUC as a clean run, and each party's /metrics must show the resends."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, write_job, write_planted_data
from tests.faultproxy import FaultProxy
from tests.test_two_party import VFL, environment, finish, start, tls_job


def retries_on(metrics_url: str) -> float | None:
    """Sum of vfl_retries_total on a party's /metrics, or None when it does not answer (not up, or gone)."""
    try:
        text = httpx.get(metrics_url, timeout=1, trust_env=False).text
    except httpx.HTTPError:
        return None
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "vfl_retries_total"
    )


def test_a_bad_network_changes_nothing_but_the_retry_count(tmp_path: Path) -> None:
    spec = tls_job(tmp_path, epochs=2, batch_size=32, checkpoint_every=25)
    write_planted_data(Path(spec["data"]["dir"]), rows=2400)
    clean_job = write_job(tmp_path, spec)
    made = subprocess.run([*VFL, "certs", "--job", str(clean_job)], capture_output=True, env=environment())
    assert made.returncode == 0
    local = subprocess.run([*VFL, "train", "--role", "local", "--job", str(clean_job)], capture_output=True,
                           text=True, env=environment())
    assert local.returncode == 0, local.stderr
    clean_auc = float(re.search(r"test: AUC (\d\.\d+)", local.stdout).group(1))

    faults = {"drop_rate": 0.05, "delay_s": 0.05, "cut_rate": 0.01}
    ports = {role: int(spec["parties"][role]["listen"].rsplit(":", 1)[1]) for role in ("leader", "follower")}
    with (
        FaultProxy(("127.0.0.1", ports["leader"]), seed=1, **faults) as to_leader,  # type: ignore[arg-type]
        FaultProxy(("127.0.0.1", ports["follower"]), seed=2, **faults) as to_follower,  # type: ignore[arg-type]
    ):
        spec["parties"]["leader"]["address"] = to_leader.address
        spec["parties"]["follower"]["address"] = to_follower.address
        metrics = {role: f"127.0.0.1:{free_port()}" for role in ("leader", "follower")}
        spec["metrics"] = {"listen": metrics}
        spec["transport"] |= {"timeout_s": 30, "retries": 8}
        spec["train"]["run_dir"] = str(tmp_path / "run-through-proxy")
        (tmp_path / "proxied").mkdir()
        job = write_job(tmp_path / "proxied", spec)
        follower = start("follower", "train", "--job", str(job))
        leader = start("leader", "train", "--job", str(job))
        seen = dict.fromkeys(metrics, 0.0)
        while leader.poll() is None or follower.poll() is None:  # scrape while the parties are up
            for role, address in metrics.items():
                seen[role] = max(seen[role], retries_on(f"http://{address}/metrics") or 0.0)
            time.sleep(0.2)
        leader_code, leader_out, leader_err = finish(leader)
        follower_code, _, follower_err = finish(follower)
        stats = (to_leader.stats(), to_follower.stats())
    assert (leader_code, follower_code) == (0, 0), leader_err + follower_err
    auc = float(re.search(r"leader test: AUC (\d\.\d+)", leader_out).group(1))
    assert abs(auc - clean_auc) <= 1e-6
    assert sum(s.dropped + s.cut for s in stats) >= 1, stats  # the network really was bad ...
    assert seen["leader"] + seen["follower"] >= 1, seen  # ... and /metrics showed the resends
    assert "Traceback" not in leader_err + follower_err
