"""The root of vfl's exception tree and the data errors, here so that `data_prep` imports nothing of `vfl_cli`.

`vfl_cli.errors` re-exports both and adds the rest of the tree; the CLI catches `VflError` once.
"""

from __future__ import annotations


class VflError(Exception):
    exit_code = 1


class DataError(VflError):
    """Input data or prepared arrays that are missing, malformed or mismatched (exit code 3)."""

    exit_code = 3
