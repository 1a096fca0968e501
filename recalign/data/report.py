"""Bad-input accounting: every skipped or repaired record is counted, never lost silently."""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional


class DataError(ValueError):
  """Bad input, with the place it was found (file, line, field)."""

  def __init__(self, file: str, line: Optional[int], field: Optional[str], message: str):
    self.file, self.line, self.field, self.message = file, line, field, message
    where = file + (f":{line}" if line is not None else "") + (f" [{field}]" if field else "")
    super().__init__(f"{where}: {message}")


@dataclasses.dataclass
class IngestReport:
  """Counts of skipped / repaired records by kind, plus the first few examples of each.

  With `strict=True`, any skip raises `DataError` instead (repairs such as HTML unescaping
  are still only counted).
  """
  strict: bool = False
  max_examples: int = 5
  rows: int = 0             # interaction records read (lines of the interaction file)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  repaired: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=dict)
  first: Optional[DataError] = None   # the first skip (what strict would have raised)

  def skip(self, kind: str, file: str, line: Optional[int], field: Optional[str], message: str):
    err = DataError(file, line, field, message)
    if self.strict:
      raise err
    self.first = self.first or err
    self.skipped[kind] += 1
    ex = self.examples.setdefault(kind, [])
    if len(ex) < self.max_examples:
      ex.append(str(err))

  def repair(self, kind: str, n: int = 1):
    self.repaired[kind] += n

  def dominant_skip(self) -> str:
    """The most frequent skip reason with its count and first example, for error messages."""
    if not self.skipped:
      return "nothing was skipped"
    kind, n = self.skipped.most_common(1)[0]
    ex = self.examples.get(kind, [""])[0]
    return f"{n} skipped as {kind}" + (f", e.g. {ex}" if ex else "")

  def to_json(self) -> dict:
    return {"rows": self.rows, "skipped": dict(sorted(self.skipped.items())),
            "repaired": dict(sorted(self.repaired.items())),
            "examples": self.examples}

  def summary_lines(self) -> list[str]:
    lines = [f"skipped {n:>8d}  {k}" for k, n in sorted(self.skipped.items())]
    lines += [f"repaired {n:>7d}  {k}" for k, n in sorted(self.repaired.items())]
    return lines
