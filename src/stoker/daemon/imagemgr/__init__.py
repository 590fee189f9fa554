"""Image subsystem leaf helpers: golden builds, kernel import, guest injection, ext4 files.

A leaf: it imports only `stoker.runner`, `stoker.errors`, `stoker.model`, the standard
library and its own dependencies, never a service. Import the submodules directly
(`from stoker.daemon.imagemgr import ext4`); this package imports nothing eagerly so
that using one helper does not load the others' dependencies.
"""
