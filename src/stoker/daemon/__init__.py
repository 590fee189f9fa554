"""stokerd: the composition root (`Daemon`), its four services and their leaf helpers.

Only `stoker.cli` and `stoker.daemon.main` import this package's public surface:
`Daemon.open`, `Daemon.serve` and `Daemon.close` (`stoker doctor` lives in `stoker.hostprobe`).
"""
