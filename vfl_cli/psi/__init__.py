"""Private set intersection of the parties' customer ids: ECDH on ristretto255 via libsodium (`rbcl`).

`group` wraps the libsodium calls (hash to group, blind, validate); `protocol` holds one party's side of the
protocol and an in-memory driver, neither knows about transport; `session` drives one party's side over a
`Peer` (uint8 [n, 32] arrays as tensors) and writes its aligned data.
"""

from vfl_cli.psi.group import POINT_BYTES, psi_tag
from vfl_cli.psi.protocol import (
    Intersection,
    PsiParty,
    check_min_intersection,
    check_peer_size,
    run_psi_locally,
)

__all__ = [
    "POINT_BYTES",
    "Intersection",
    "PsiParty",
    "check_min_intersection",
    "check_peer_size",
    "psi_tag",
    "run_psi_locally",
]
