"""Data ingest, leave-one-out splits, random item IDs and the vocabulary."""

from recalign.data.ingest import AMAZON, MOVIES, Domain, ItemMeta, RawData, read_source
from recalign.data.prepare import PreparedData, item_id, item_index, prepare
from recalign.data.report import DataError, IngestReport

__all__ = ["AMAZON", "MOVIES", "DataError", "Domain", "IngestReport", "ItemMeta", "PreparedData", "RawData",
           "item_id", "item_index", "prepare", "read_source"]
