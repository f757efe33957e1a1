"""`python -m vfl_cli ...` is `vfl ...` (how `vfl train` starts its workers)."""

from vfl_cli.app import main

main()
