"""Embedding stores: the on-disk format, validation, FAISS indexes, memories and semantic completion.

``cmcr.stores`` imports neither ``cmcr.pipeline`` nor ``cmcr.trainer``.
"""

from cmcr.stores.store import Batch, KeyJoin, PartInfo, Store, join_by_key

__all__ = ["Batch", "KeyJoin", "PartInfo", "Store", "join_by_key"]
