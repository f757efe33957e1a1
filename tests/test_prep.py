"""Criteo preparation semantics on hand-written rows, streaming invariants, staging, and the real sample."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import yaml

from data_prep.criteo import PrepResult, prepare_criteo
from data_prep.fit import ValueCounter
from data_prep.reader import COLUMNS
from data_prep.splits import in_test_split, split_uniform
from data_prep.store import open_party
from data_prep.synth import write_synth
from vfl_cli.errors import DataError
from vfl_cli.job import JobSpec, Role, load_job, parse_job

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/criteo-sample/train.txt"
REPO = Path(__file__).resolve().parents[1]


def criteo_line(label: object, **values: object) -> str:
    """One raw line: every column empty unless given, e.g. criteo_line(1, I1=4, C1="b")."""
    fields = {"label": label, **values}
    return "\t".join(str(fields.get(column, "")) for column in COLUMNS) + "\n"


# Six rows; with threshold 1 the frequent values are C1: a, b (c once); C2: x; C3: q.
ROWS = [
    criteo_line(1, I1=4, I2=-2, I3=-5, C1="b", C2="x"),
    criteo_line(0, I1=8, C1="a", C2="x", C3="q"),
    criteo_line(0, I2=3, C1="b", C2="y", C3="q"),
    criteo_line(1, I1=2, I2=1, C1="a", C3="q"),
    criteo_line(0, I1=0, I2=0, C1="c", C2="x", C3="p"),
    criteo_line(1, I1=-4, C1="b", C2="z"),
]


def small_job(seed: int = 3, test_fraction: float = 0.5) -> JobSpec:
    # Leader fields deliberately out of Criteo order: the job's order is the column order.
    return parse_job(
        {
            "name": "t",
            "seed": seed,
            "data": {"threshold": 1, "test_fraction": test_fraction},
            "parties": {
                "leader": {"name": "leader", "fields": ["C2", "I1", "C1"]},
                "follower": {"name": "follower", "fields": ["I2", "C3", "I3"]},
            },
        }
    )


def prep(raw: Path, job: JobSpec, out: Path, threshold: int, roles: tuple[Role, ...], **options: Any) -> PrepResult:
    """`prepare_criteo` as `vfl prep criteo` calls it: each role's schema from the job, at this threshold."""
    schemas = [replace(job.table_schema(role), threshold=threshold) for role in roles]
    return prepare_criteo(raw, schemas, out, job.seed, job.data.test_fraction, **options)


def write_rows(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(rows))
    return path


def splitmix_uniform(seed: int, row: int) -> float:
    """Independent pure-Python reference for u(seed, row)."""
    mask = 2**64 - 1
    z = (seed + (row + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return (z >> 11) / 2**53


def all_rows(out: Path, role: str) -> dict[str, np.ndarray]:
    """Train and test of one party merged back into raw row order."""
    party = open_party(out, role)
    train, test = party.split("train"), party.split("test")
    sample_ids = np.concatenate([train.sample_ids, test.sample_ids])
    order = np.argsort(sample_ids)
    merged = {
        "sample_ids": sample_ids[order],
        "ids": np.concatenate([train.ids, test.ids])[order],
        "vals": np.concatenate([train.vals, test.vals])[order],
    }
    if train.labels is not None and test.labels is not None:
        merged["labels"] = np.concatenate([train.labels, test.labels])[order]
    return merged


def test_hand_written_rows_exact_ids_vals_labels(tmp_path: Path) -> None:
    raw = write_rows(tmp_path / "train.txt", ROWS)
    result = prep(raw, small_job(), tmp_path / "out", 1, ("leader", "follower"))

    leader = open_party(tmp_path / "out", "leader").meta
    assert leader.fields == ("C2", "I1", "C1")
    assert leader.field_offsets == {"C2": 0, "I1": 2, "C1": 3}  # C2: OOV 0, x 1 | I1: 2 | C1: OOV 3, a 4, b 5
    assert leader.vocab_size == 6 and leader.has_labels and leader.threshold == 1 and leader.source == "train.txt"
    follower = open_party(tmp_path / "out", "follower").meta
    assert follower.field_offsets == {"I2": 0, "C3": 1, "I3": 3}  # C3: OOV 1, q 2
    assert follower.vocab_size == 4 and not follower.has_labels
    assert result.vocab_sizes == {"leader": 6, "follower": 4}

    got = all_rows(tmp_path / "out", "leader")
    assert got["sample_ids"].tolist() == list(range(6))
    assert got["ids"].tolist() == [[1, 2, 5], [1, 2, 4], [0, 2, 5], [0, 2, 4], [1, 2, 3], [0, 2, 5]]
    # I1 max is 8; missing I1 (row 2) has val 0 and the same id; negative values are kept.
    np.testing.assert_array_equal(
        got["vals"], np.array([[1, 0.5, 1], [1, 1, 1], [1, 0, 1], [1, 0.25, 1], [1, 0, 1], [1, -0.5, 1]], np.float32)
    )
    assert got["labels"].tolist() == [1, 0, 0, 1, 0, 1] and got["labels"].dtype == np.float32

    got = all_rows(tmp_path / "out", "follower")
    assert got["ids"].tolist() == [[0, 1, 3], [0, 2, 3], [0, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 3]]
    # I2 max is 3; I3's only value is -5, a max <= 0, so its divisor is 1.
    expected = np.array([[-2 / 3, 1, -5], [0, 1, 0], [1, 1, 0], [1 / 3, 1, 0], [0, 1, 0], [0, 1, 0]], np.float32)
    np.testing.assert_allclose(got["vals"], expected, rtol=1e-6)
    assert "labels" not in got

    vocab = json.loads((tmp_path / "out/leader/vocab.json").read_text())
    assert vocab == {"C2": ["x"], "C1": ["a", "b"]}
    assert json.loads((tmp_path / "out/follower/vocab.json").read_text()) == {"C3": ["q"]}


def test_split_membership_follows_the_seeded_hash(tmp_path: Path) -> None:
    raw = write_rows(tmp_path / "train.txt", ROWS * 5)  # 30 rows
    job = small_job(seed=11, test_fraction=0.3)
    result = prep(raw, job, tmp_path / "out", 1, ("leader", "follower"))
    expected_test = [r for r in range(30) if splitmix_uniform(11, r) < 0.3]
    assert 0 < len(expected_test) < 30
    for role in ("leader", "follower"):
        party = open_party(tmp_path / "out", role)
        assert party.split("test").sample_ids.tolist() == expected_test
        assert party.split("train").sample_ids.tolist() == [r for r in range(30) if r not in expected_test]
        party.verify()
        for split in ("train", "test"):
            digest = hashlib.sha256(np.ascontiguousarray(party.split(split).sample_ids).tobytes()).hexdigest()
            assert party.meta.splits[split].sample_ids_digest == digest
    assert result.split_rows == {"train": 30 - len(expected_test), "test": len(expected_test)}


def test_split_uniform_is_elementwise_and_matches_reference() -> None:
    rows = np.arange(1000, dtype=np.int64)
    whole = split_uniform(5, rows)
    assert np.array_equal(whole[300:700], split_uniform(5, rows[300:700]))
    assert [float(u) for u in whole[:20]] == [splitmix_uniform(5, r) for r in range(20)]
    assert np.array_equal(in_test_split(5, 300, 400, 0.1), whole[300:700] < 0.1)
    assert abs(float((whole < 0.1).mean()) - 0.1) < 0.03


def test_value_counter_merges_exactly_across_many_batches() -> None:
    rng = np.random.default_rng(0)
    words = np.array([f"v{int(k):05d}" for k in rng.zipf(1.3, 20_000) % 3000], dtype=object)
    words[rng.random(len(words)) < 0.1] = None  # missing values are not counted
    counter = ValueCounter(merge_floor=50)  # forces many intermediate merges
    for start in range(0, len(words), 700):
        counter.add(pa.array(words[start : start + 700], pa.string()).dictionary_encode())
    expected = Counter(w for w in words if w is not None)
    assert counter.frequent(3).to_pylist() == sorted(w for w, n in expected.items() if n > 3)
    assert counter.compacted_rows == len(expected)


def test_threshold_boundary_count_equal_to_threshold_is_oov(tmp_path: Path) -> None:
    raw = write_rows(tmp_path / "train.txt", ROWS)
    prep(raw, small_job(), tmp_path / "out", 2, ("leader",))
    # C1: b seen 3 times (> 2) keeps an id, a seen exactly 2 times goes to OOV; C2: x seen 3 times.
    assert json.loads((tmp_path / "out/leader/vocab.json").read_text()) == {"C2": ["x"], "C1": ["b"]}
    got = all_rows(tmp_path / "out", "leader")
    assert got["ids"][:, 2].tolist() == [4, 3, 4, 3, 3, 4]


def test_role_only_prep_equals_both_role_prep(tmp_path: Path) -> None:
    raw = tmp_path / "synth.txt"
    write_synth(raw, 3000, seed=1)
    job = load_job(REPO / "jobs/smoke.yaml")
    prep(raw, job, tmp_path / "both", 5, ("leader", "follower"))
    for role in ("leader", "follower"):
        prep(raw, job, tmp_path / role, 5, (role,))
        assert not (tmp_path / role / next(r for r in job.parties if r != role)).exists()
        assert_same_prepared(tmp_path / "both" / role, tmp_path / role / role)


def assert_same_prepared(a: Path, b: Path) -> None:
    for name in ("meta.json", "vocab.json", "dense_max.json"):
        assert (a / name).read_text() == (b / name).read_text(), name
    for split in ("train", "test"):
        for file in sorted(p.name for p in (a / split).iterdir()):
            assert (a / split / file).read_bytes() == (b / split / file).read_bytes(), file


def test_gz_input_equals_plain_and_chunking_does_not_matter(tmp_path: Path) -> None:
    raw = tmp_path / "train.txt"
    write_synth(raw, 3000, seed=2)
    packed = tmp_path / "train.txt.gz"
    packed.write_bytes(gzip.compress(raw.read_bytes()))
    job = load_job(REPO / "jobs/smoke.yaml")
    prep(raw, job, tmp_path / "plain", 5, ("leader", "follower"))
    prep(packed, job, tmp_path / "gz", 5, ("leader", "follower"))
    prep(raw, job, tmp_path / "small-blocks", 5, ("leader", "follower"), block_size=8192)
    for role in ("leader", "follower"):
        assert_same_prepared(tmp_path / "small-blocks" / role, tmp_path / "plain" / role)
        gz_meta = json.loads((tmp_path / "gz" / role / "meta.json").read_text())
        assert gz_meta.pop("source") == "train.txt.gz"
        plain_meta = json.loads((tmp_path / "plain" / role / "meta.json").read_text())
        assert plain_meta.pop("source") == "train.txt"
        assert gz_meta == plain_meta


def test_failed_prep_leaves_previous_output_and_no_staging(tmp_path: Path) -> None:
    out = tmp_path / "out"
    good = write_rows(tmp_path / "good.txt", ROWS)
    prep(good, small_job(), out, 1, ("leader", "follower"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    bad = write_rows(tmp_path / "bad.txt", ROWS + ["1\t2\n"])
    with pytest.raises(DataError, match=r"bad\.txt:7: expected 40 tab-separated columns, found 2"):
        prep(bad, small_job(), out, 1, ("leader", "follower"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["follower", "leader"]

    # A successful run replaces the old output, again without leftovers.
    prep(write_rows(tmp_path / "more.txt", ROWS * 2), small_job(), out, 1, ("leader",))
    assert open_party(out, "leader").meta.source == "more.txt"
    assert sorted(p.name for p in out.iterdir()) == ["follower", "leader"]


def test_progress_reports_both_passes(tmp_path: Path) -> None:
    raw = tmp_path / "train.txt"
    write_synth(raw, 2000, seed=4)
    seen: list[tuple[str, int, int]] = []
    prep(raw, small_job(), tmp_path / "out", 1, ("leader",), on_progress=lambda *r: seen.append(r),
         block_size=16384)
    phases = [phase for phase, _, _ in seen]
    assert phases[0] == "count" and phases[-1] == "encode" and phases.count("encode") > 1
    assert seen[-1] == ("encode", 2000, 2000)


@pytest.mark.skipif(not SAMPLE.is_file(), reason=f"real Criteo sample not present at {SAMPLE}")
def test_real_criteo_sample(tmp_path: Path) -> None:
    job = load_job(REPO / "jobs/criteo.yaml")
    result = prep(SAMPLE, job, tmp_path / "out", 5, ("leader", "follower"))
    assert sum(result.split_rows.values()) == 7200
    expected_test = int((split_uniform(job.seed, np.arange(7200)) < job.data.test_fraction).sum())
    assert result.split_rows == {"train": 7200 - expected_test, "test": expected_test}
    assert 600 < expected_test < 840
    assert result.label_rate == pytest.approx(0.215, abs=0.0005)
    leader, follower = open_party(tmp_path / "out", "leader"), open_party(tmp_path / "out", "follower")
    assert leader.split("train").ids.shape == (7200 - expected_test, 20)
    assert follower.split("test").vals.shape == (expected_test, 19)
    for party in (leader, follower):
        party.verify()
        ids = np.concatenate([party.split("train").ids, party.split("test").ids])
        assert ids.min() >= 0 and ids.max() < party.meta.vocab_size
    config = yaml.safe_load((REPO / "jobs/criteo.yaml").read_text())
    assert list(leader.meta.fields) == config["parties"]["leader"]["fields"]


def test_held_out_test_files_are_the_test_split_and_teach_nothing(tmp_path: Path) -> None:
    """--test: every input row trains; the held-out rows are the test split, in file order, numbered after the
    input, encoded with the input's vocabulary and divisors (a value seen only in them is out-of-vocabulary)."""
    train = write_rows(tmp_path / "train.txt", ROWS)
    dev = write_rows(tmp_path / "dev.txt", [criteo_line(1, I1=16, C1="a", C2="w"), criteo_line(0, C1="new")])
    test = write_rows(tmp_path / "test.txt", [criteo_line(0, I1=2, C1="b")])
    result = prep(train, small_job(), tmp_path / "out", 1, ("leader", "follower"), test_files=[dev, test])
    assert result.split_rows == {"train": 6, "test": 3}
    leader = open_party(tmp_path / "out", "leader")
    assert list(leader.split("train").sample_ids) == [0, 1, 2, 3, 4, 5]
    assert list(leader.split("test").sample_ids) == [6, 7, 8]
    assert list(leader.split("test").labels) == [1.0, 0.0, 0.0]
    held_out = leader.split("test")
    i1 = leader.meta.fields.index("I1")
    assert held_out.vals[0, i1] == pytest.approx(16 / 8)  # divided by the training rows' max (8), not 16
    reference = prep(train, small_job(), tmp_path / "plain", 1, ("leader",))
    assert leader.meta.vocab_size == reference.vocab_sizes["leader"]  # the vocabulary is the input's alone
    c1 = leader.meta.fields.index("C1")
    offset = leader.meta.field_offsets["C1"]
    assert held_out.ids[1, c1] == offset  # "new" is the field's out-of-vocabulary id
