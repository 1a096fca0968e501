"""SeqIO tasks and mixtures for recommendation.

Importing this module registers every prepared data set listed in the environment variable
`RECALIGN_DATA` (folders separated by os.pathsep), so gin files and `--gin.import` can name tasks.
"""

import os

from recalign.tasks.registry import MIXTURES, DatasetConfig, get, register_dataset

__all__ = ["MIXTURES", "DatasetConfig", "get", "register_dataset"]

for _dir in filter(None, os.environ.get("RECALIGN_DATA", "").split(os.pathsep)):
  register_dataset(_dir)
