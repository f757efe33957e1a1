"""The one exception tree of vfl. The CLI catches `VflError` once, prints one line, exits with `exit_code`.

    VflError (1)
    ├── JobError (2)          the job spec is missing, malformed or inconsistent
    ├── DataError (3)         input data or prepared arrays are missing, malformed or mismatched
    ├── PeerError (4)         the other party cannot be reached or misbehaves
    │   ├── PeerUnreachable   no connection within the configured timeout
    │   ├── PeerTimeout       connected, but the expected message did not come in time
    │   ├── PeerRefused       the peer answered 4xx: it refused what we sent
    │   ├── PeerAborted       the peer told us it stopped
    │   └── WorkerLost        another worker of this party stopped (`parties.<key>.workers`)
    ├── ProtocolError (5)     a message that breaks the protocol, or a handshake mismatch
    ├── CheckpointError (6)   a checkpoint that is missing, corrupt or from another job
    └── TlsError (7)          certificates or keys that cannot be loaded or made

`VflError` and `DataError` live in `data_prep.errors` (data preparation imports nothing of `vfl_cli`).
Library errors (yaml, pyarrow, msgpack, httpx, ssl) are translated at the boundary with `raise ... from exc`.
"""

from __future__ import annotations

from data_prep.errors import DataError, VflError

__all__ = ["VflError", "JobError", "DataError", "PeerError", "PeerUnreachable", "PeerTimeout", "PeerRefused",
           "PeerAborted", "WorkerLost", "ProtocolError", "CheckpointError", "TlsError"]


class JobError(VflError):
    exit_code = 2


class PeerError(VflError):
    exit_code = 4


class PeerUnreachable(PeerError):
    pass


class PeerTimeout(PeerError):
    pass


class PeerRefused(PeerError):
    pass


class PeerAborted(PeerError):
    pass


class WorkerLost(PeerError):
    pass


class ProtocolError(VflError):
    exit_code = 5


class CheckpointError(VflError):
    exit_code = 6


class TlsError(VflError):
    exit_code = 7
