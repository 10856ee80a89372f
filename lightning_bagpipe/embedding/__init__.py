"""The embedding side: CachedEmbedding, its stores, and the machinery that moves rows."""

from lightning_bagpipe.embedding.cached import CachedEmbedding
from lightning_bagpipe.embedding.store import EmbeddingStore, MemoryStore, MmapStore
from lightning_bagpipe.embedding.store_lock import StoreInUseError
from lightning_bagpipe.embedding.tiered_store import TieredStore

__all__ = ["CachedEmbedding", "EmbeddingStore", "MemoryStore", "MmapStore", "StoreInUseError", "TieredStore"]
