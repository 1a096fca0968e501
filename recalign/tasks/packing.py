"""First-fit packing of encoder-decoder examples into fixed-length rows.

seqio's `EncDecFeatureConverter(pack=True)` packs next-fit: one open row, closed as soon as the
next example does not fit. Recommendation prompts range from ~50 tokens to the inputs cap, so
next-fit rows end up about a third empty. Here all rows of a batch are open at once and every
example goes into the first row with room for both its inputs and its targets (first-fit). An
example that fits in no row waits for the next batch, which starts with the waiting examples
(longest first); a batch is closed once `lookahead` examples are waiting. With
lookahead <= rows every waiting example fits into the next batch, so no example is delayed by more
than one batch and none is dropped or cut beyond the feature lengths.

The output has the features of seqio's packed EncDecFeatureConverter (T5X's trainer input), so
the model needs nothing new: relative position biases depend only on distances within a segment,
and segment ids keep attention inside each example.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

FEATURES = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions", "decoder_target_tokens",
            "decoder_input_tokens", "decoder_loss_weights", "decoder_segment_ids", "decoder_positions")


class _Batch:
  """`rows` rows under construction: token lists per row and the space left."""

  def __init__(self, rows: int, lengths: tuple[int, int]):
    self.rows = [[] for _ in range(rows)]
    self.free = np.tile(np.asarray(lengths, np.int64), (rows, 1))

  def place(self, example: tuple[np.ndarray, np.ndarray]) -> bool:
    need = np.array([len(example[0]), len(example[1])])
    fits = np.all(self.free >= need, axis=1)
    if not fits.any():
      return False
    i = int(np.argmax(fits))
    self.rows[i].append(example)
    self.free[i] -= need
    return True

  def arrays(self, lengths: tuple[int, int]) -> dict[str, np.ndarray]:
    n, (li, lt) = len(self.rows), lengths
    out = {k: np.zeros((n, li if k.startswith("encoder") else lt), np.int32) for k in FEATURES}
    for r, row in enumerate(self.rows):
      ie = it = 0
      for seg, (inputs, targets) in enumerate(row, start=1):
        a, b = len(inputs), len(targets)
        out["encoder_input_tokens"][r, ie:ie + a] = inputs
        out["encoder_segment_ids"][r, ie:ie + a] = seg
        out["encoder_positions"][r, ie:ie + a] = np.arange(a)
        out["decoder_target_tokens"][r, it:it + b] = targets
        out["decoder_input_tokens"][r, it + 1:it + b] = targets[:-1]  # shifted right, 0 first
        out["decoder_loss_weights"][r, it:it + b] = 1
        out["decoder_segment_ids"][r, it:it + b] = seg
        out["decoder_positions"][r, it:it + b] = np.arange(b)
        ie, it = ie + a, it + b
    return out


class Packer:
  """Batches of `rows` packed rows from examples with "inputs" and "targets" token arrays (an iterator).

  Examples longer than `lengths` are cut as seqio cuts them; empty ones are skipped (they carry
  no tokens). A finite stream ends with a last, partly filled batch. `waiting` (the examples drawn
  but not yet placed) is the packer's whole state: a packer given the same examples, from the point
  its `examples` iterator has reached, and the same `waiting` makes the same batches (a resume).
  """

  def __init__(self, examples: Iterable[Mapping[str, np.ndarray]], lengths: Mapping[str, int], rows: int,
               lookahead: Optional[int] = None, waiting: Sequence[tuple[np.ndarray, np.ndarray]] = ()):
    self.lengths = int(lengths["inputs"]), int(lengths["targets"])
    self.rows, self.lookahead = rows, rows if lookahead is None else lookahead
    if not 0 < self.lookahead <= rows:
      raise ValueError(f"lookahead must be in 1..rows={rows} (so waiting examples fit the next batch), "
                       f"got {self.lookahead}")
    self.examples, self.waiting, self.exhausted = iter(examples), list(waiting), False

  def __iter__(self) -> "Packer":
    return self

  def _draw(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
    li, lt = self.lengths
    for ex in self.examples:
      ex = (np.asarray(ex["inputs"])[:li], np.asarray(ex["targets"])[:lt])
      if len(ex[0]) or len(ex[1]):
        return ex
    self.exhausted = True
    return None

  def __next__(self) -> dict[str, np.ndarray]:
    while self.waiting or not self.exhausted:
      batch = _Batch(self.rows, self.lengths)
      queue, self.waiting = sorted(self.waiting, key=lambda e: -len(e[0])), []
      for ex in queue:
        if not batch.place(ex):  # cannot happen with lookahead <= rows; kept for safety
          self.waiting.append(ex)
      while len(self.waiting) < self.lookahead and (ex := self._draw()) is not None:
        if not batch.place(ex):
          self.waiting.append(ex)
      if any(batch.rows):
        return batch.arrays(self.lengths)
    raise StopIteration

  def state(self) -> dict[str, np.ndarray]:
    """`waiting` as flat arrays (what a checkpoint stores): each side's tokens end to end, and lengths."""
    out = {}
    for k, side in (("inputs", 0), ("targets", 1)):
      arrays = [ex[side] for ex in self.waiting]
      out[k] = np.concatenate(arrays) if arrays else np.zeros([0], np.int32)
      out[f"{k}_len"] = np.array([len(a) for a in arrays], np.int64)
    return out

  def restore(self, state: Mapping[str, np.ndarray]) -> None:
    """Sets `waiting` from a `state()`."""
    sides = [np.split(state[k], np.cumsum(state[f"{k}_len"])[:-1]) if len(state[f"{k}_len"]) else []
             for k in ("inputs", "targets")]
    self.waiting = list(zip(*sides))


def real_tokens(batch: Mapping[str, np.ndarray]) -> int:
  """Non-padding tokens of a batch, inputs + targets (the "useful tokens" of throughput numbers)."""
  return int((batch["encoder_input_tokens"] > 0).sum() + (batch["decoder_target_tokens"] > 0).sum())


def num_examples(batch: Mapping[str, np.ndarray]) -> int:
  """Examples in a batch: packed segments, or rows with a target when padded."""
  if "decoder_segment_ids" in batch:
    seg = batch["decoder_segment_ids"]
    starts = (seg > 0) & (seg != np.pad(seg, ((0, 0), (1, 0)))[:, :-1])
    return int(starts.sum())
  return int((batch["decoder_target_tokens"] > 0).any(axis=1).sum())


def density(batch: Mapping[str, np.ndarray]) -> float:
  """Share of token slots (inputs + targets) holding real tokens."""
  return real_tokens(batch) / (batch["encoder_input_tokens"].size + batch["decoder_target_tokens"].size)
