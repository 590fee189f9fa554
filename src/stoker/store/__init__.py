"""The state store: SQLite, forward-only migrations, the one place that writes SQL."""

from stoker.store.db import SCHEMA_VERSION, Store

__all__ = ["SCHEMA_VERSION", "Store"]
