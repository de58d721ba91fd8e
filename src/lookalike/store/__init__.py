"""Vector stores behind one interface; `LocalStore` (SQLite + FAISS) is the embedded default."""

from lookalike.store.base import Hit, ImageRecord, Store
from lookalike.store.local import LocalStore

__all__ = ["Hit", "ImageRecord", "LocalStore", "Store"]
