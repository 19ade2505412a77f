"""Shard sets: the format (``format``), tar reader and writer (``tar``), image codecs (``codec``), opening
and validation (``open``), split planning (``plan``), the parallel writer (``write``), output-dir safety
(``outdir``) and the dataset readers (``sources``). See docs/CONTRACTS.md."""

from vaejob.shards.format import FORMAT, MANIFEST, DataError, ShardSet, SplitShards
from vaejob.shards.open import open_shards, sha256_file

__all__ = ["FORMAT", "MANIFEST", "DataError", "ShardSet", "SplitShards", "open_shards", "sha256_file"]
