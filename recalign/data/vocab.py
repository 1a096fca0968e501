"""A T5-compatible SentencePiece vocabulary trained from a prepared data set.

Layout as T5's: pad=0, eos=1, unk=2, no BOS, NFKC normalisation; `seqio` adds the
100 sentinels `<extra_id_0..99>` at the top of the id range (`load_vocabulary`). Digits are split
into single pieces, so an item ID such as `I4821` always tokenises to `▁I 4 8 2 1` -- short,
unambiguous and independent of its neighbours, which constrained decoding relies on. We train a BPE
model: sentencepiece 0.2's unigram trainer split the template words on this corpus
("▁f ollow ing"), costing ~50% more tokens per prompt.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import sentencepiece as spm

from recalign.data.prepare import PreparedData, item_id

NUM_EXTRA_IDS = 100
VOCAB_FILE = "spm.model"


def training_text(data: PreparedData) -> Iterator[str]:
  from recalign.tasks import templates as tpl  # (recalign.tasks imports this module)
  t = tpl.Templates(data.domain)
  for _ in range(1000):  # templates are in every example: weight them like frequent text
    yield from t.all_text()
  for k, meta in enumerate(data.items):
    iid = item_id(k)
    yield tpl.entry(iid, meta.title) + ";"
    for cat in meta.categories:
      yield cat
    if meta.brand:
      yield meta.brand
    if meta.price:
      yield meta.price


def train_vocabulary(data: PreparedData, out_dir: Path | str, *, vocab_size: int = 8000,
                     extra_text: Iterable[str] = ()) -> Path:
  """Trains `<out_dir>/spm.model`; returns its path. `vocab_size` excludes the 100 sentinels."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  model = io.BytesIO()
  sentences = [s for s in (*training_text(data), *extra_text) if s]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
      split_digits=True, character_coverage=1.0, hard_vocab_limit=False,
      normalization_rule_name="nmt_nfkc", num_threads=2,
      input_sentence_size=2_000_000, shuffle_input_sentence=False, minloglevel=2)
  path = out_dir / VOCAB_FILE
  path.write_bytes(model.getvalue())
  return path


def load_vocabulary(path: Path | str, extra_ids: int = NUM_EXTRA_IDS):
  """A `seqio.SentencePieceVocabulary` with T5's 100 sentinel ids."""
  import seqio  # heavy import (TensorFlow): only where needed
  path = Path(path)
  if path.is_dir():
    path = path / VOCAB_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path}: no vocabulary (run `recalign vocab DATA_DIR` first)")
  return seqio.SentencePieceVocabulary(str(path), extra_ids=extra_ids)


@dataclasses.dataclass
class IdTokenization:
  max_tokens: int
  token_ids: set[int]               # every token that occurs in some item ID
  failures: list[str]               # human-readable descriptions of inconsistent IDs


def check_item_ids(vocab, ids: Sequence[str], *, limit: Optional[int] = None) -> IdTokenization:
  """Checks that each ID tokenises the same alone and in every context the templates put it in.

  Works with any seqio vocabulary, including the standard T5 / FLAN-T5 SentencePiece model.
  """
  contexts = ["Item ID: {}, Title: x;", "Candidate items are: I1, {}, I2", "Candidate items are: {}",
              "What's the title of {}?", "{}"]
  failures, tokens, longest = [], set(), 0
  seen: dict[tuple, str] = {}
  for iid in ids[:limit] if limit else ids:
    alone = tuple(vocab.encode(iid))
    longest = max(longest, len(alone))
    tokens.update(alone)
    if vocab.decode(list(alone)) != iid:
      failures.append(f"{iid}: decodes to {vocab.decode(list(alone))!r}")
      continue
    if alone in seen:
      failures.append(f"{iid}: same tokens as {seen[alone]}")
    seen[alone] = iid
    for ctx in contexts:
      toks = vocab.encode(ctx.format(iid))
      if not _contains(toks, alone):
        failures.append(f"{iid}: tokens {list(alone)} not found in context {ctx.format(iid)!r}")
  return IdTokenization(longest, tokens, failures)


def _contains(seq: Sequence[int], sub: Sequence[int]) -> bool:
  n = len(sub)
  return any(tuple(seq[i:i + n]) == tuple(sub) for i in range(len(seq) - n + 1))
