"""Documents in, shards out, batches back: the data path of every training stage.

``TokenLoader`` and ``permute`` are imported on first use: they need torch, which the
tokenizing worker processes of ``prepare`` have no reason to import.
"""

from gptlab.data.documents import iter_documents, require_documents
from gptlab.data.shards import open_shard, prepare, read_meta, write_shard

__all__ = [
    "iter_documents",
    "require_documents",
    "open_shard",
    "prepare",
    "read_meta",
    "write_shard",
    "TokenLoader",
    "permute",
]


def __getattr__(name: str):
    if name in ("TokenLoader", "permute"):
        from gptlab.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
