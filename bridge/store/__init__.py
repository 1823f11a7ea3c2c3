"""Durable state behind one interface; see :mod:`bridge.store.base`."""

from bridge.store.base import Store, StoreUnavailable

__all__ = ["Store", "StoreUnavailable", "open_store"]


def open_store(url: str) -> Store:
    """Build the store that ``url`` names: ``sqlite:///path/to/file`` or ``memory://``."""
    if url.startswith("sqlite:///"):
        from bridge.store.sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///"))
    if url == "memory://":
        from bridge.store.memory import MemoryStore

        return MemoryStore()
    raise ValueError(f"unsupported store URL {url!r}: use sqlite:///path or memory://")
