"""`PartyContext`: one party's view of the job (who I am, who my peers are, what crosses the wire), built once.

Every part of a party's run needs the same few facts: my key in the job and my `PartySpec`, my peers (the
leader talks to every follower, a follower to the leader alone: a star) with the names their certificates
and Hellos must carry, the cut-layer kind I receive and the widths of the cut tensors.
`PartyContext.of(job, role)` works them out once, at the edge (the command, or `run_local`), and the
transport, the handshake, the sessions and PSI take it instead of a role string from which each would
rebuild its own view of the job.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vfl_cli.job import JobSpec, PartySpec
from vfl_cli.protocol import RECEIVES, Kind, Side


@dataclass(frozen=True)
class PartyContext:
    """Party `role` of `job`, and its peers."""

    job: JobSpec
    role: str  # me: my key in the job's `parties`, e.g. "leader", "follower", "follower2"
    spec: PartySpec  # my party in the job
    peers: dict[str, PartySpec]  # key -> party, in the job's order: every follower (leader), the leader (follower)

    @classmethod
    def of(cls, job: JobSpec, role: str) -> PartyContext:
        """The context of party `role`; JobError for a party the job does not have."""
        spec = job.party(role)
        return cls(job, role, spec, {key: job.parties[key] for key in job.peers_of(role)})

    def for_worker(self, rank: int) -> PartyContext:
        """The context of worker `rank` of a party of several: it listens on `listen` port + rank and talks to
        worker `rank` of each peer, at their ports + rank, or where `worker_addresses` put them
        (`vfl_cli.train.workers`). Rank 0 without `worker_addresses` is this context."""
        if rank == 0 and self.spec.worker_addresses is None and all(
                p.worker_addresses is None for p in self.peers.values()):
            return self
        return replace(self, spec=worker_spec(self.spec, rank),
                       peers={key: worker_spec(peer, rank) for key, peer in self.peers.items()})

    @property
    def name(self) -> str:
        """My party name (my certificate's CN)."""
        return self.spec.name

    @property
    def is_leader(self) -> bool:
        """Whether I hold the label (and the top)."""
        return self.job.is_leader(self.role)

    @property
    def leader(self) -> str:
        """The label party's key."""
        return self.job.label_party

    @property
    def followers(self) -> tuple[str, ...]:
        """Every follower's key, in the job's order."""
        return self.job.followers

    @property
    def side(self) -> Side:
        """"leader" or "follower": which half of the protocol I run."""
        return "leader" if self.is_leader else "follower"

    @property
    def receives(self) -> Kind:
        """The cut-layer kind I receive (the leader embeddings, a follower gradients)."""
        return RECEIVES[self.side]

    @property
    def cut_widths(self) -> dict[str, int]:
        """A follower's cut tensors, name -> width (the same for every follower): what crosses the wire both ways
        (embeddings, gradients)."""
        return self.job.cut_widths(self.followers[0])

    def peer_key(self, name: str) -> str | None:
        """The key of my peer named `name` (its certificate's CN), or None when no peer of mine has that name."""
        return next((key for key, peer in self.peers.items() if peer.name == name), None)


def worker_spec(spec: PartySpec, rank: int) -> PartySpec:
    """Worker `rank` of party `spec`: at `worker_addresses[rank]` (listening on that port), else with its listen and
    connect ports moved up by `rank`."""
    def moved(host_port: str, port: int | None = None) -> str:
        host, own = host_port.rsplit(":", 1)
        return f"{host}:{int(own) + rank if port is None else port}"

    if spec.worker_addresses is not None:
        address = spec.worker_addresses[rank]
        return spec.model_copy(update={"listen": moved(spec.listen, int(address.rsplit(":", 1)[1])),
                                       "address": address})
    return spec.model_copy(update={"listen": moved(spec.listen),
                                   "address": None if spec.address is None else moved(spec.address)})
