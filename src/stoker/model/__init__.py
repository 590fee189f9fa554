"""Plain records and validation shared by the CLI and the daemon."""

from stoker.model.names import generate_name, validate_name
from stoker.model.records import Image, Kernel, Operation, VMRecord, VMSpec, VMState
from stoker.model.sizes import format_size, parse_size

__all__ = [
    "Image",
    "Kernel",
    "Operation",
    "VMRecord",
    "VMSpec",
    "VMState",
    "format_size",
    "generate_name",
    "parse_size",
    "validate_name",
]
