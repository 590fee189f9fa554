"""VMM drivers: one abstract base (`ProcessVMM`, alias `VMMDriver`), a module per backend.

`firecracker.FirecrackerDriver` and `qemu.QemuDriver` implement it (and the test backend
`standin.StandInDriver`); `select` picks one for the config and host. A leaf: imports only
`stoker.runner`, `stoker.errors`, the standard library and aiohttp. The backends are not
imported here, so importing this package (for the records or `choose_vmm`) stays cheap for
the CLI.
"""

from stoker.daemon.vmm.base import (
    AgentChannel,
    Disk,
    MachineConfig,
    ProcessVMM,
    VMMDriver,
    VMMHandle,
)
from stoker.daemon.vmm.select import choose_accel, choose_vmm, driver_for_config, make_driver

__all__ = [
    "AgentChannel",
    "Disk",
    "MachineConfig",
    "ProcessVMM",
    "VMMDriver",
    "VMMHandle",
    "choose_accel",
    "choose_vmm",
    "driver_for_config",
    "make_driver",
]
