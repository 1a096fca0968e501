"""The run record, MODEL_DIR/run.json: what a run was trained with, so `recalign eval`, a resumed run and
the checkpoint readers rebuild its model, vocabulary and tasks. One owner of the format, versioned;
files of older versions still read.

  version 1 (no "version" key): runs before 2026-12-02; before 2026-11-30 TaskConfig was "dataset_config".
  version 2: "version" written.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from recalign import paths

FILE = "run.json"
VERSION = 2


@dataclasses.dataclass(frozen=True)
class RunRecord:
  network_config: dict                       # T5Config fields (models.network.T5Config.from_dict)
  mixture_or_task_name: str
  task_feature_lengths: dict
  train_steps: int
  vocabulary: Optional[dict] = None          # path, sha256, ids, extra_ids, appended_pieces
  data_dirs: tuple = ()
  task_config: Optional[dict] = None         # recalign.tasks.TaskConfig fields
  ema_decay: Optional[float] = None          # EMA_DECAY: the checkpoints hold the parameters' moving average
  version: int = VERSION

  def write(self, model_dir: paths.PathLike) -> None:
    (paths.as_path(model_dir) / FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2))

  @classmethod
  def from_dict(cls, d: dict) -> "RunRecord":
    d = dict(d)
    if "dataset_config" in d:
      d.setdefault("task_config", d.pop("dataset_config"))
    d.setdefault("version", 1)
    known = {f.name for f in dataclasses.fields(cls)}
    missing = {"network_config", "mixture_or_task_name", "task_feature_lengths", "train_steps"} - set(d)
    if missing:
      raise ValueError(f"{FILE} lacks {sorted(missing)}: not a recalign run record")
    return cls(**{k: (tuple(v) if k == "data_dirs" else v) for k, v in d.items() if k in known})

  @classmethod
  def read(cls, model_dir: paths.PathLike) -> Optional["RunRecord"]:
    """The record in MODEL_DIR (None: not a recalign run)."""
    path = paths.as_path(model_dir) / FILE
    return cls.from_dict(json.loads(path.read_text())) if path.exists() else None

  @classmethod
  def find(cls, checkpoint: paths.PathLike) -> Optional["RunRecord"]:
    """The record of the run a checkpoint belongs to (MODEL_DIR/checkpoints/<step>, MODEL_DIR/best, MODEL_DIR)."""
    model_dir = find_model_dir(checkpoint)
    return cls.read(model_dir) if model_dir is not None else None


def find_model_dir(path: paths.PathLike) -> Optional[paths.epath.Path]:
  """The MODEL_DIR at or above `path` (the nearest folder with a run.json; not above a bucket)."""
  path = paths.resolve(path)
  for p in [path, *path.parents]:
    if paths.is_remote(path) and (str(p).endswith("://") or "://" not in str(p)):
      break
    if (p / FILE).exists():
      return p
  return None
