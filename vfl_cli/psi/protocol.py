"""ECDH private set intersection of two parties' customer ids, one `PsiParty` per side, no transport here.
(With more than two parties the leader runs one such PSI with each follower: `vfl_cli.psi.session`.)

    each party:  P_x = from_hash(SHA-512(tag || id_x)) for its ids; secret scalar k (fresh per PsiParty)
    leader -> follower: shuffled {k_l * P_x}    follower -> leader: shuffled {k_f * P_y}
    each reblinds what it received with its own k and returns it in the order received;
    equal k_l * k_f * P mark the intersection

What crosses the wire is uint8 [n, 32] arrays only: `blinded_batches()` (my points, to the peer), `reblind()`'s
output (the peer's points, back to the peer). One party's run, in the order the transport drives it:

    me = PsiParty("leader", ids, psi_tag(job.fingerprint()), threads=2)
    for batch in me.blinded_batches(job.psi.batch_size):  send(batch)
    for batch in received():                            kept.append(out := me.reblind(batch)); send_back(out)
    for batch in returned():                            me.add_my_double_blinded(batch)
    result = me.intersect(kept, peer_size=announced)   # kept: the peer's double-blinded values
    check_min_intersection(result, job.psi.min_intersection)

The last two loops may interleave in any order; `reblind` needs nothing from this party's own progress.
Both parties learn the intersection and both set sizes, nothing else (semi-honest model: a peer that blinds
ids it does not hold can test them for membership; `check_peer_size` and `check_min_intersection` refuse the
crude forms of that). The agreed order of the intersection is ascending by the 32-byte double-blinded value,
which both sides hold for every common id: no further message is needed, and it changes with every run.

Memory: the ids, an int64 permutation and the lookup table of my double-blinded values (40 bytes per id plus
the ids; `intersect` needs as much again while it sorts), plus one batch of points at a time; the peer's
double-blinded values are the caller's to keep (32 bytes per peer id) or to stream into `intersect`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vfl_cli.errors import DataError, ProtocolError
from vfl_cli.psi import group

Role = str  # a party's key in the job; "leader" and "follower" in a two-party job
_KEY = np.dtype(f"V{group.POINT_BYTES}")  # one 32-byte point as a single sortable, comparable numpy item
_DIGEST_LABEL = b"vfl-psi-intersection-v1\0"


@dataclass(frozen=True, eq=False)
class Intersection:
    """One party's view of the intersection; `keys` and `digest()` are identical on both sides."""

    role: Role
    peer: Role
    rows: np.ndarray  # int64 [size]: my row indices (into the ids I gave), in the agreed order
    keys: np.ndarray  # uint8 [size, 32]: the double-blinded values in that order (ascending bytes)
    my_size: int  # ids I put in
    peer_size: int  # ids the peer put in

    @property
    def size(self) -> int:
        return len(self.rows)

    def digest(self) -> str:
        """sha256 over the size and the sorted keys, hex: equal on both sides iff they agree on the intersection."""
        h = hashlib.sha256(_DIGEST_LABEL)
        h.update(self.size.to_bytes(8, "big"))
        h.update(np.ascontiguousarray(self.keys).tobytes())
        return h.hexdigest()


class PsiParty:
    """One side of the PSI: my ids, my secret scalar, my shuffle, and the table of my double-blinded values.

    `ids` are bytes (UTF-8 of the customer id), as a sequence or a numpy S array (which drops trailing NULs);
    an empty set, an empty id or a repeated id is a DataError. `shuffle_seed` fixes the order in which my points
    are sent (tests only; by default it comes from `secrets`); the scalar is fresh in every case. `threads`
    blinds on that many threads (libsodium runs without the GIL).
    """

    def __init__(
        self,
        role: Role,
        ids: Sequence[bytes] | np.ndarray,
        tag: bytes,
        *,
        threads: int = 1,
        shuffle_seed: int | None = None,
        peer: Role | None = None,
    ) -> None:
        if peer is None and role not in ("leader", "follower"):
            raise ValueError(f"PSI role {role!r}: name the peer")
        self.role: Role = role
        self.peer: Role = peer or ("follower" if role == "leader" else "leader")
        self.ids = _as_ids(ids)  # S [n]
        self.tag = tag
        self.threads = max(1, threads)
        self._k = group.new_scalar()
        self._order = _permutation(len(self.ids), shuffle_seed)  # int64 [n]: the row sent at each position
        self._mine = np.zeros((len(self.ids), group.POINT_BYTES), dtype=np.uint8)  # [n, 32] by row: the lookup
        self._started = False
        self._sent = 0  # my points handed out so far
        self._returned = 0  # my points the peer has returned reblinded
        self._returned_batches = 0
        self._reblinded_batches = 0

    @property
    def size(self) -> int:
        return len(self.ids)

    def blinded_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """My ids hashed to the group and blinded with my k, in my shuffled order: uint8 [<=batch_size, 32] each."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        if self._started:
            raise RuntimeError("blinded_batches() runs once per PsiParty: the peer reblinds each point once")
        self._started = True
        for start in range(0, self.size, batch_size):
            rows = self._order[start : start + batch_size]
            points = group.hash_to_group(self.tag, self.ids[rows].tolist(), self.threads)
            blinded = group.multiply(self._k, points, "own points", self.threads)
            self._sent = start + len(rows)
            yield blinded

    def reblind(self, batch: np.ndarray) -> np.ndarray:
        """The peer's blinded points times my k, same order; every point is validated first (ProtocolError)."""
        what = f"the {self.peer}'s blinded batch {self._reblinded_batches}"
        self._reblinded_batches += 1
        return group.multiply(self._k, batch, what, self.threads, validate=True)

    def add_my_double_blinded(self, batch: np.ndarray) -> None:
        """Record my points as the peer returned them reblinded, in the order I sent them (any batching)."""
        what = f"our points returned by the {self.peer}, batch {self._returned_batches}"
        self._returned_batches += 1
        group.check_points(group.points_to_bytes(batch, what), what, self.threads)
        end = self._returned + len(batch)
        if end > self._sent:
            raise ProtocolError(f"{what}: the {self.peer} returned {end:,} points but we sent {self._sent:,}")
        self._mine[self._order[self._returned : end]] = batch
        self._returned = end

    def intersect(self, peer_double_blinded: Iterable[np.ndarray], peer_size: int | None = None) -> Intersection:
        """Match the peer's double-blinded values (my `reblind` outputs) against mine; `peer_size` as announced."""
        if self._returned != self.size:
            raise ProtocolError(f"the {self.peer} returned {self._returned:,} of our {self.size:,} points reblinded")
        mine = self._mine.view(_KEY).ravel()  # [n]
        by_key = np.argsort(mine, kind="stable")  # my rows in ascending double-blinded value
        sorted_keys = mine[by_key]
        if self.size > 1 and (sorted_keys[1:] == sorted_keys[:-1]).any():
            raise ProtocolError(f"the {self.peer} returned one reblinded point for two of our ids")

        hits, seen = [], 0
        for i, batch in enumerate(peer_double_blinded):
            group.check_shape(batch, f"the {self.peer}'s double-blinded batch {i}")
            values = np.ascontiguousarray(batch).view(_KEY).ravel()
            at = np.minimum(np.searchsorted(sorted_keys, values), self.size - 1)
            hits.append(at[sorted_keys[at] == values])
            seen += len(values)
        if peer_size is not None and seen != peer_size:
            raise ProtocolError(f"the {self.peer} announced {peer_size:,} ids but sent {seen:,} points")
        matched = np.sort(np.concatenate(hits)) if hits else np.zeros(0, dtype=np.int64)
        if len(matched) > 1 and (matched[1:] == matched[:-1]).any():
            raise ProtocolError(f"the {self.peer}'s double-blinded set holds one value twice")
        rows = by_key[matched].astype(np.int64)
        return Intersection(self.role, self.peer, rows, self._mine[rows], my_size=self.size, peer_size=seen)


def check_peer_size(peer: Role, peer_size: int, minimum: int) -> None:
    """Refuse a peer whose announced set is smaller than `psi.min_intersection`, before reblinding anything."""
    if peer_size < minimum:
        raise DataError(
            f"the {peer} has only {peer_size:,} ids, fewer than psi.min_intersection = {minimum:,}: "
            "a wrong file, or a peer probing for ids; refusing to run the PSI"
        )


def check_min_intersection(result: Intersection, minimum: int) -> None:
    """Refuse an intersection smaller than `psi.min_intersection` (one line saying why)."""
    if result.size < minimum:
        raise DataError(
            f"only {result.size:,} common ids ({result.role} {result.my_size:,}, {result.peer} {result.peer_size:,}), "
            f"fewer than psi.min_intersection = {minimum:,}: a wrong file, or a peer probing for ids; refusing to align"
        )


def run_psi_locally(
    leader_ids: Sequence[bytes] | np.ndarray,
    follower_ids: Sequence[bytes] | np.ndarray,
    tag: bytes,
    batch_size: int,
    threads: int = 1,
) -> tuple[Intersection, Intersection]:
    """Both sides in one process (tests, the demo's local path): (leader's Intersection, follower's)."""
    leader = PsiParty("leader", leader_ids, tag, threads=threads)
    follower = PsiParty("follower", follower_ids, tag, threads=threads)
    kept = exchange(leader, follower, batch_size)
    return (
        leader.intersect(kept["leader"], peer_size=follower.size),
        follower.intersect(kept["follower"], peer_size=leader.size),
    )


def exchange(leader: PsiParty, follower: PsiParty, batch_size: int) -> dict[Role, list[np.ndarray]]:
    """Run both blinding rounds in memory; per role, its `reblind` outputs (the peer's double-blinded set)."""
    kept: dict[Role, list[np.ndarray]] = {"leader": [], "follower": []}
    for sender, receiver in ((leader, follower), (follower, leader)):
        for batch in sender.blinded_batches(batch_size):
            returned = receiver.reblind(batch)
            kept[receiver.role].append(returned)
            sender.add_my_double_blinded(returned)
    return kept


def _as_ids(ids: Sequence[bytes] | np.ndarray) -> np.ndarray:
    """The ids as a numpy S array [n]; DataError for an empty set, an empty id or a repeated id (naming one)."""
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind != "S" or ids.ndim != 1:
            raise TypeError(f"PSI ids must be a 1-d numpy bytes (S) array, not {ids.dtype} {ids.shape}")
        arr = ids
    else:
        ids = list(ids)
        wrong = next((x for x in ids if not isinstance(x, bytes)), None)
        if wrong is not None:
            raise TypeError(f"PSI ids must be bytes (UTF-8 of the customer id), not {type(wrong).__name__}")
        arr = np.array(ids, dtype=f"S{max([1, *map(len, ids)])}")
    if len(arr) == 0:
        raise DataError("no customer ids: an empty set cannot be intersected")
    empty = np.flatnonzero(arr == b"")
    if len(empty):
        raise DataError(f"customer id at position {empty[0]:,} is empty")
    order = np.argsort(arr, kind="stable")
    same = np.flatnonzero(arr[order[1:]] == arr[order[:-1]])
    if len(same):
        first, second = order[same[0]], order[same[0] + 1]
        raise DataError(f"duplicate customer id {bytes(arr[first])!r} (positions {first:,} and {second:,})")
    return arr


def _permutation(n: int, seed: int | None) -> np.ndarray:
    """A uniformly random permutation of range(n): from `secrets` (argsort of 64-bit draws) unless seeded."""
    if seed is not None:
        return np.random.default_rng(seed).permutation(n).astype(np.int64)
    draws = np.frombuffer(secrets.token_bytes(8 * n), dtype=np.uint64)
    return np.argsort(draws, kind="stable").astype(np.int64)
