"""Generic registry for in-flight asynchronous operations (create, pull, build, prepare)."""

from stoker.daemon.opstate.registry import AsyncOp, Registry

__all__ = ["AsyncOp", "Registry"]
