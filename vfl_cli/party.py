"""`PartyContext`: one party's view of the job (who I am, who the peer is, what crosses the wire), built once.

Every part of a party's run needs the same few facts: my role and my `PartySpec`, the peer's role and
`PartySpec` (its name is what its certificate and its Hello must say), the cut-layer kind each side receives
and the widths of the cut tensors. `PartyContext.of(job, role)` works them out once, at the edge (the command,
or `run_local`), and the transport, the handshake, the sessions and PSI take it instead of a role string from
which each would rebuild its own view of the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from vfl_cli.job import JobSpec, PartySpec, Role
from vfl_cli.protocol import RECEIVES, Kind


@dataclass(frozen=True)
class PartyContext:
    """Party `role` of `job`, and its peer."""

    job: JobSpec
    role: Role  # me: "leader" or "follower"
    spec: PartySpec  # my party in the job
    peer_role: Role  # the other party
    peer: PartySpec  # the other party in the job

    @classmethod
    def of(cls, job: JobSpec, role: str) -> PartyContext:
        """The context of party `role`; JobError for a role the job does not have."""
        spec = job.party(role)
        peer_role = job.peer_role(role)
        return cls(job, cast(Role, role), spec, peer_role, job.party(peer_role))  # party() checked the role

    @property
    def name(self) -> str:
        """My party name (my certificate's CN)."""
        return self.spec.name

    @property
    def peer_name(self) -> str:
        """The peer's party name: what its certificate and its Hello must say."""
        return self.peer.name

    @property
    def is_leader(self) -> bool:
        return self.role == "leader"

    @property
    def receives(self) -> Kind:
        """The cut-layer kind I receive (the leader embeddings, the follower gradients)."""
        return RECEIVES[self.role]

    @property
    def cut_widths(self) -> dict[str, int]:
        """The follower's cut tensors, name -> width: what crosses the wire both ways (embeddings, gradients)."""
        return self.job.cut_widths("follower")

