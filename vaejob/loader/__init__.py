"""The shard loader: epoch planning (``plan``), the stream stages (``pipeline``), worker processes
(``workers``), the batch type (``batch``) and the API (``loader``). See docs/CONTRACTS.md."""

from vaejob.loader.batch import Batch, np_unit_float, unit_float
from vaejob.loader.loader import ShardLoader, make_loader

__all__ = ["Batch", "ShardLoader", "make_loader", "np_unit_float", "unit_float"]
