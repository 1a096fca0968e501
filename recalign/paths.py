"""Paths that may be remote: MODEL_DIR, checkpoints and evaluation results on `gs://` (or another
scheme etils.epath knows: s3://, az://), as orbax and T5X handle them; local paths behave as pathlib's."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional, Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def as_path(path: PathLike) -> epath.Path:
  return epath.Path(path)


def is_remote(path: PathLike) -> bool:
  return "://" in str(path)


def local_or_remote(path: PathLike) -> Union[pathlib.Path, epath.Path]:
  """A pathlib.Path for a local path (everything pathlib offers, e.g. `stat().st_mtime_ns`), an epath.Path
  for a URL (gs://...): the data readers and writers take either."""
  return epath.Path(path) if is_remote(path) else pathlib.Path(path)


def resolve(path: PathLike) -> epath.Path:
  """Absolute: a local path resolved (orbax wants absolute paths), a remote one as it is."""
  path = as_path(path)
  return path if is_remote(path) else path.resolve()


def read_json(path: PathLike) -> Optional[dict]:
  path = as_path(path)
  return json.loads(path.read_text()) if path.exists() else None


def read_json_lines(path: PathLike) -> list[dict]:
  path = as_path(path)
  return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def append_line(path: PathLike, line: str) -> None:
  """Appends a line; object stores cannot append, so there the file is rewritten (small logs only)."""
  path = as_path(path)
  if not is_remote(path):
    with path.open("a") as f:
      f.write(line + "\n")
    return
  path.write_text((path.read_text() if path.exists() else "") + line + "\n")
