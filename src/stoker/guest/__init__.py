"""What runs inside the VM, shipped as package data (`files/` is laid out as in the guest)."""
