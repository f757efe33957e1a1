"""The PSI protocol through two real `PsiParty`s in memory: correctness, fresh keys, domain separation, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import rbcl

from vfl_cli.errors import DataError, ProtocolError
from vfl_cli.psi import (
    Intersection,
    PsiParty,
    check_min_intersection,
    check_peer_size,
    group,
    psi_tag,
    run_psi_locally,
)
from vfl_cli.psi.protocol import exchange

TAG = psi_tag("0123456789abcdef")
IDENTITY = bytes(32)
NOT_AN_ENCODING = b"\x01" + bytes(31)  # an odd ("negative") field element: never a canonical ristretto255 encoding


def make_sets(n_leader: int, n_follower: int, shared: int, seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    """Two lists of distinct ids with exactly `shared` in common, each in its own random order."""
    rng = np.random.default_rng(seed)
    numbers = rng.permutation(10 * (n_leader + n_follower))
    common = numbers[:shared]
    leader = np.concatenate([common, numbers[shared:n_leader]])
    follower = np.concatenate([common, numbers[n_leader : n_leader + n_follower - shared]])
    as_ids = lambda xs: [f"cust-{x}".encode() for x in rng.permutation(xs)]  # noqa: E731
    return as_ids(leader), as_ids(follower)


def assert_agreed(leader: Intersection, follower: Intersection, leader_ids: list[bytes], follower_ids: list[bytes]):
    expected = set(leader_ids) & set(follower_ids)
    assert leader.role == "leader" and follower.role == "follower"
    assert leader.size == follower.size == len(expected)
    assert {leader_ids[i] for i in leader.rows} == expected
    # the same ids in the same agreed order on both sides, ascending by the shared key
    assert [leader_ids[i] for i in leader.rows] == [follower_ids[i] for i in follower.rows]
    assert np.array_equal(leader.keys, follower.keys)
    assert [bytes(k) for k in leader.keys] == sorted(bytes(k) for k in leader.keys)
    assert leader.digest() == follower.digest()
    sizes = (len(leader_ids), len(follower_ids))
    assert (leader.my_size, leader.peer_size) == (follower.peer_size, follower.my_size) == sizes
    assert leader.rows.dtype == np.int64 and leader.keys.dtype == np.uint8 and leader.keys.shape == (leader.size, 32)


@pytest.mark.parametrize("batch_size", [1, 97, 5000])
@pytest.mark.parametrize(
    ("n_leader", "n_follower", "shared"),
    [(300, 300, 0), (300, 300, 150), (300, 300, 300), (400, 150, 75), (150, 400, 75)],
    ids=["overlap-0", "overlap-50", "overlap-100", "leader-bigger", "follower-bigger"],
)
def test_intersection_is_the_plain_set_intersection(n_leader, n_follower, shared, batch_size):
    leader_ids, follower_ids = make_sets(n_leader, n_follower, shared, seed=n_leader + n_follower + shared)
    leader, follower = run_psi_locally(leader_ids, follower_ids, TAG, batch_size)
    assert_agreed(leader, follower, leader_ids, follower_ids)


def test_numpy_bytes_arrays_and_two_threads_give_the_same_intersection():
    leader_ids, follower_ids = make_sets(1500, 1200, 700)
    leader, follower = run_psi_locally(np.array(leader_ids), np.array(follower_ids), TAG, batch_size=1024, threads=2)
    assert_agreed(leader, follower, leader_ids, follower_ids)


def test_fresh_keys_blind_the_same_ids_differently():
    ids = make_sets(200, 1, 0)[0]
    first = next(PsiParty("leader", ids, TAG, shuffle_seed=1).blinded_batches(1000))
    second = next(PsiParty("leader", ids, TAG, shuffle_seed=1).blinded_batches(1000))
    assert first.shape == second.shape == (200, 32)
    assert not {bytes(p) for p in first} & {bytes(p) for p in second}


def test_agreed_order_changes_between_runs_but_not_between_parties():
    leader_ids, follower_ids = make_sets(300, 300, 200)
    runs = [run_psi_locally(leader_ids, follower_ids, TAG, 128) for _ in range(2)]
    for leader, follower in runs:
        assert_agreed(leader, follower, leader_ids, follower_ids)
    orders = [[leader_ids[i] for i in leader.rows] for leader, _ in runs]
    assert orders[0] != orders[1]
    assert runs[0][0].digest() != runs[1][0].digest()


def test_sent_order_is_shuffled_and_returns_come_back_in_it():
    ids = make_sets(300, 1, 0)[0]
    sent_orders = []
    for _ in range(2):
        leader, follower = PsiParty("leader", ids, TAG), PsiParty("follower", ids, TAG)
        kept = exchange(leader, follower, batch_size=64)
        seen = follower.intersect(kept["follower"])  # the leader's double-blinded values, in the leader's sent order
        id_of = {bytes(key): ids[row] for key, row in zip(seen.keys, seen.rows, strict=True)}
        sent_orders.append([id_of[bytes(p)] for batch in kept["follower"] for p in batch])
        assert sorted(sent_orders[-1]) == sorted(ids)
    assert sent_orders[0] != ids and sent_orders[1] != ids and sent_orders[0] != sent_orders[1]


def test_another_jobs_tag_matches_nothing():
    ids = make_sets(200, 1, 0)[0]
    leader = PsiParty("leader", ids, psi_tag("0123456789abcdef"))
    follower = PsiParty("follower", ids, psi_tag("fedcba9876543210"))
    kept = exchange(leader, follower, batch_size=50)
    assert leader.intersect(kept["leader"]).size == follower.intersect(kept["follower"]).size == 0


def test_tag_has_label_and_fingerprint():
    assert psi_tag("abc") == b"vfl-psi-v1\0abc\0"
    with pytest.raises(ValueError):
        psi_tag("")


def valid_points(n: int) -> np.ndarray:
    points = b"".join(rbcl.crypto_core_ristretto255_random() for _ in range(n))
    return np.frombuffer(points, np.uint8).reshape(n, 32).copy()


@pytest.mark.parametrize(
    ("bad", "reason"),
    [(IDENTITY, "the identity element"), (NOT_AN_ENCODING, "not a canonical")],
    ids=["identity", "not-an-encoding"],
)
def test_reblind_rejects_identity_and_invalid_encodings(bad, reason):
    party = PsiParty("leader", [b"a", b"b"], TAG)
    party.reblind(valid_points(3))  # batch 0 is fine
    batch = valid_points(5)
    batch[2] = np.frombuffer(bad, np.uint8)
    with pytest.raises(ProtocolError, match=rf"follower's blinded batch 1, point 2: {reason}"):
        party.reblind(batch)


def test_libsodium_refusals_are_translated_at_the_boundary():
    batch = valid_points(4)
    batch[3] = 0  # the identity: libsodium's scalar multiplication refuses it (RuntimeError in rbcl)
    with pytest.raises(ProtocolError, match="test batch, point 3: the identity element") as caught:
        group.multiply(group.new_scalar(), batch, "test batch", validate=False)
    assert isinstance(caught.value.__cause__, RuntimeError)


@pytest.mark.parametrize("bad", [IDENTITY, NOT_AN_ENCODING, b"\xff" * 32], ids=["identity", "odd", "non-canonical"])
def test_returned_points_are_validated(bad):
    party = PsiParty("follower", [b"a", b"b", b"c"], TAG)
    next(party.blinded_batches(10))
    batch = valid_points(3)
    batch[1] = np.frombuffer(bad, np.uint8)
    with pytest.raises(ProtocolError, match=r"returned by the leader, batch 0, point 1"):
        party.add_my_double_blinded(batch)


@pytest.mark.parametrize(
    "batch",
    [
        np.zeros((3, 31), np.uint8),  # points one byte short
        np.zeros((3, 33), np.uint8),
        np.zeros(32, np.uint8),  # one point, but not [n, 32]
        np.zeros((3, 32), np.float32),
        np.zeros((3, 32), np.int64),
        [[0] * 32],
    ],
    ids=["31-bytes", "33-bytes", "1-d", "float32", "int64", "list"],
)
def test_wrong_shape_or_dtype_is_rejected(batch):
    party = PsiParty("leader", [b"a"], TAG)
    with pytest.raises(ProtocolError, match="follower's blinded batch 0"):
        party.reblind(batch)
    with pytest.raises(ProtocolError, match="returned by the follower, batch 0"):
        party.add_my_double_blinded(batch)


def test_peer_that_returns_or_announces_the_wrong_number_of_points():
    leader, follower = PsiParty("leader", [b"a", b"b", b"c"], TAG), PsiParty("follower", [b"a", b"b"], TAG)
    sent = next(leader.blinded_batches(2))  # 2 of the leader's 3 points
    returned = follower.reblind(sent)
    with pytest.raises(ProtocolError, match="returned 3 points but we sent 2"):
        leader.add_my_double_blinded(np.concatenate([returned, returned[:1]]))
    leader.add_my_double_blinded(returned)
    with pytest.raises(ProtocolError, match="returned 2 of our 3 points"):
        leader.intersect([])

    leader, follower = PsiParty("leader", [b"a", b"b"], TAG), PsiParty("follower", [b"a", b"b"], TAG)
    kept = exchange(leader, follower, batch_size=1)
    with pytest.raises(ProtocolError, match="announced 3 ids but sent 2"):
        leader.intersect(kept["leader"], peer_size=3)
    with pytest.raises(ProtocolError, match="holds one value twice"):
        leader.intersect(kept["leader"] + kept["leader"][:1])


def test_blinded_batches_run_once():
    party = PsiParty("leader", [b"a"], TAG)
    list(party.blinded_batches(1))
    with pytest.raises(RuntimeError):
        list(party.blinded_batches(1))


@pytest.mark.parametrize("as_array", [False, True])
def test_duplicate_ids_are_refused_naming_one(as_array):
    ids = [b"alice", b"bob", b"carol", b"bob"]
    with pytest.raises(DataError, match=r"duplicate customer id b'bob' \(positions 1 and 3\)"):
        PsiParty("leader", np.array(ids) if as_array else ids, TAG)


def test_empty_inputs_are_refused():
    with pytest.raises(DataError, match="no customer ids"):
        PsiParty("follower", [], TAG)
    with pytest.raises(DataError, match="no customer ids"):
        PsiParty("follower", np.array([], dtype="S4"), TAG)
    with pytest.raises(DataError, match="position 1 is empty"):
        PsiParty("follower", [b"a", b""], TAG)
    with pytest.raises(TypeError):
        PsiParty("follower", ["not-bytes"], TAG)  # type: ignore[list-item]


def test_min_intersection_refusal():
    leader_ids, follower_ids = make_sets(200, 150, 40)
    leader, follower = run_psi_locally(leader_ids, follower_ids, TAG, 64)
    check_min_intersection(leader, 40)
    sizes = r"\((leader 200, follower 150|follower 150, leader 200)\)"  # this party's first
    with pytest.raises(DataError, match=rf"only 40 common ids {sizes}.*psi.min_intersection = 41"):
        check_min_intersection(follower, 41)
    check_peer_size("follower", 150, 100)
    with pytest.raises(DataError, match="the follower has only 50 ids"):
        check_peer_size("follower", 50, 100)
