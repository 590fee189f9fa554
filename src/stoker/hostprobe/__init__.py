"""Host probes and `stoker doctor`'s checks: below both the CLI and the daemon.

`probes` answers questions about this host (is /dev/kvm usable, is a binary installed,
what version is it, is this host itself a VM); `vmm` turns those answers and the config
into the VMM choice the daemon makes and doctor reports; `confine` plans QEMU's
confinement (user, seccomp, cgroups) for the daemon and doctor alike; `doctor` holds one
function per doctor check and the short driver over them. Imports only the standard library and
`stoker.config`, `stoker.layout`, `stoker.runner`, `stoker.errors`, `stoker.store` (for
its schema version): never `stoker.daemon`, so `stoker doctor` runs without loading the
daemon, and the daemon (`daemon.vmm.select`) asks the same probes.
"""
