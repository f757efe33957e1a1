"""`psi.threads`: the threads of a party's PSI curve arithmetic, a local setting (not in the job fingerprint), that
`vfl psi` uses in place of the party's `threads` and that changes nothing in what the PSI writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from data_prep.store import table_dir
from data_prep.table import prepare_table
from tests.serving import serving_spec, write_tables
from vfl_cli.errors import JobError
from vfl_cli.job import JobSpec, load_job, parse_job
from vfl_cli.party import PartyContext
from vfl_cli.psi import session
from vfl_cli.psi.protocol import PsiParty
from vfl_cli.psi.session import psi_locally, psi_threads

PARTIES = ("leader", "follower1")


def spec_with(tmp_path: Path, threads: int | None, party_threads: int | None = 1) -> dict[str, Any]:
    spec = serving_spec(tmp_path, PARTIES, "binary")
    spec["psi"] = {"min_intersection": 100, "batch_size": 600, **({"threads": threads} if threads else {})}
    for party in spec["parties"].values():
        party["threads"] = party_threads
    return spec


def test_psi_threads_loads_and_stays_out_of_the_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec_with(tmp_path, 2)))
    job = load_job(path)
    assert job.psi.threads == 2
    assert job.fingerprint() == parse_job(spec_with(tmp_path, None)).fingerprint()
    assert job.fingerprint() != parse_job({**spec_with(tmp_path, 2), "psi": {"batch_size": 601}}).fingerprint()
    with pytest.raises(JobError, match="threads"):
        parse_job(spec_with(tmp_path, None) | {"psi": {"threads": 0}})


@pytest.mark.parametrize(("threads", "party_threads", "used"), [(2, 1, 2), (3, None, 3), (None, 4, 4), (None, None, 1)])
def test_psi_threads_then_the_partys_threads_then_one(tmp_path: Path, threads: int | None,
                                                      party_threads: int | None, used: int) -> None:
    job = parse_job(spec_with(tmp_path, threads, party_threads))
    assert psi_threads(PartyContext.of(job, "leader")) == used


def _psi(job: JobSpec, out: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, int], dict[str, bytes]]:
    """`vfl psi --role local` into `out`: the threads each PsiParty got, and every file written, by path."""
    used: dict[str, int] = {}

    class Recorded(PsiParty):
        def __init__(self, role: str, *args: Any, **kwargs: Any) -> None:
            super().__init__(role, *args, **kwargs)
            used[role] = self.threads

    monkeypatch.setattr(session, "PsiParty", Recorded)
    outcomes = psi_locally(job, out=out)
    assert {key: outcome.threads for key, outcome in outcomes.items()} == used
    return used, {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_two_threads_write_exactly_what_one_thread_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tables(tmp_path, PARTIES, "binary", n=1500)  # ~1350 ids each: 2 threads of >= 256 points per batch
    one, two = parse_job(spec_with(tmp_path, None)), parse_job(spec_with(tmp_path, 2))
    for key in PARTIES:
        prepare_table(tmp_path / f"{key}.csv", one.table_schema(key), table_dir(one.data.dir, key))
    used1, written1 = _psi(one, tmp_path / "one", monkeypatch)
    used2, written2 = _psi(two, tmp_path / "two", monkeypatch)
    assert used1 == dict.fromkeys(PARTIES, 1) and used2 == dict.fromkeys(PARTIES, 2)
    assert written1 and written1.keys() == written2.keys()
    assert written1 == written2  # same common set, same order, same bytes (the PSI's own keys differ per run)
