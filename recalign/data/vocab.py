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
import itertools
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import sentencepiece as spm
import seqio

from recalign.data.prepare import PreparedData, item_id

NUM_EXTRA_IDS = 100
VOCAB_FILE = "spm.model"
MAX_SENTENCES = 2_000_000   # the vocabulary trainer's input: templates, then item texts in item-index order


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
                     extra_text: Iterable[str] = (), pieces: Sequence[str] = ()) -> Path:
  """Trains `<out_dir>/spm.model`; returns its path. `vocab_size` excludes the 100 sentinels and
  `pieces`, whole tokens to add (item ID codes such as `▁<a_12>`, `<b_7>`)."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  model = io.BytesIO()
  # streamed, at most MAX_SENTENCES (SentencePiece reads no more either): memory stays bounded on catalogues
  # of millions of items; item indices are a random permutation, so the first items are a random sample
  sentences = itertools.islice((s for s in itertools.chain(training_text(data), extra_text) if s), MAX_SENTENCES)
  spm.SentencePieceTrainer.train(
      sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size + len(pieces),
      model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
      split_digits=True, character_coverage=1.0, hard_vocab_limit=False,
      normalization_rule_name="nmt_nfkc", num_threads=2, user_defined_symbols=list(pieces),
      input_sentence_size=MAX_SENTENCES, shuffle_input_sentence=False, minloglevel=2)
  path = out_dir / VOCAB_FILE
  path.write_bytes(model.getvalue())
  return path


def load_vocabulary(path: Path | str, extra_ids: int = NUM_EXTRA_IDS):
  """A `seqio.SentencePieceVocabulary` with T5's 100 sentinel ids, from a model file or a folder
  holding one (a data set's vocab/, a Hugging Face T5 directory's spiece.model)."""
  path = Path(path)
  if path.is_dir() and not any((path / n).exists() for n in (VOCAB_FILE, *CHECKPOINT_VOCAB_FILES)):
    raise FileNotFoundError(f"{path / VOCAB_FILE}: no vocabulary (run `recalign vocab DATA_DIR` first)")
  return seqio.SentencePieceVocabulary(str(sentencepiece_path(path).resolve()), extra_ids=extra_ids)


def continuation_encoder(vocab) -> Callable[[str], list[int]]:
  """Encodes text that continues the previous token with no space before it (", Title: x;", "?").

  SentencePiece prefixes every encoded string with a word boundary ("▁"); this encoder is the same
  model without that prefix, so `encode("Item ID:") + encode(id) + continuation(", Title: x;")`
  decodes to exactly "Item ID: <id>, Title: x;" while the ID keeps the tokens it has alone.
  """
  from sentencepiece import sentencepiece_model_pb2
  if hasattr(vocab, "continuation"):      # an ExtendedVocabulary knows its own pieces
    return vocab.continuation
  proto = getattr(vocab, "sp_model", None)
  if proto is None:
    raise TypeError(f"{type(vocab).__name__}: recalign's prompts need a SentencePiece vocabulary")
  model = sentencepiece_model_pb2.ModelProto.FromString(proto)
  model.normalizer_spec.add_dummy_prefix = False
  sp = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
  return lambda text: list(sp.encode(text)) if text else []


# (text before the ID, text right after it) in every context the templates put an ID in.
ID_CONTEXTS = (("Item ID:", ", Title: x;"), ("Item ID:", ";"), ("Candidate items are: I1,", ", I2"),
               ("Candidate items are:", ""), ("What's the title of", "?"), ("", ""))


CHECKPOINT = "checkpoint"   # VOCABULARY = 'checkpoint': the initial checkpoint's own SentencePiece model
# Where checkpoints keep their SentencePiece model: Hugging Face T5 directories, T5X-style folders.
CHECKPOINT_VOCAB_FILES = ("spiece.model", "sentencepiece.model", "tokenizer.model")


def sentencepiece_path(path: Path | str) -> Path:
  """A SentencePiece model file, or the one inside a folder (recalign's vocab/ or a checkpoint's)."""
  path = Path(path)
  if path.is_dir():
    for name in (VOCAB_FILE, *CHECKPOINT_VOCAB_FILES):
      if (path / name).exists():
        return path / name
    raise FileNotFoundError(f"{path}: no SentencePiece model ({', '.join((VOCAB_FILE, *CHECKPOINT_VOCAB_FILES))})")
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such SentencePiece model")
  return path


def same_vocabulary(a, b) -> bool:
  """Two seqio vocabularies give every token the same id (same SentencePiece model, same extra ids)."""
  if a is b:
    return True
  if hasattr(a, "base") or hasattr(b, "base"):
    return a == b
  pa, pb = getattr(a, "sp_model", None), getattr(b, "sp_model", None)
  if pa is None or pb is None:
    return a == b
  return pa == pb and a.extra_ids == b.extra_ids and a.vocab_size == b.vocab_size


def describe(vocab) -> str:
  path = getattr(vocab, "sentencepiece_model_file", None)
  return f"{path or type(vocab).__name__} ({vocab.vocab_size} ids)"


@dataclasses.dataclass
class IdTokenization:
  max_tokens: int
  token_ids: set[int]               # every token that occurs in some item ID
  failures: list[str]               # IDs that cannot be used: not round-tripping, not unique
  merged_in_context: list[str]      # IDs whose tokens change when the whole prompt text is tokenised
  mean_tokens: float = 0.0


def check_item_ids(vocab, ids: Sequence[str], *, limit: Optional[int] = None) -> IdTokenization:
  """How item IDs tokenise under `vocab`, and whether recalign can use them.

  recalign gives every ID one tokenisation -- its tokens alone -- and splices it into prompts,
  targets and the decoding trie. A failure is an ID that does not decode back to itself, shares its
  tokens with another ID, or whose spliced prompt does not decode to the prompt's text.
  `merged_in_context` lists IDs that a vocabulary which does not split digits (T5's) would tokenise
  differently inside a prompt if the prompt were tokenised as one string: informational, since
  recalign splices. Works with any SentencePiece vocabulary, the standard T5 / FLAN-T5 one included.
  """
  cont = continuation_encoder(vocab)
  failures, merged, tokens, lengths = [], [], set(), []
  seen: dict[tuple, str] = {}
  for iid in ids[:limit] if limit else ids:
    alone = tuple(vocab.encode(iid))
    lengths.append(len(alone))
    tokens.update(alone)
    if vocab.decode(list(alone)) != iid:
      failures.append(f"{iid}: decodes to {vocab.decode(list(alone))!r}")
      continue
    if alone in seen:
      failures.append(f"{iid}: same tokens as {seen[alone]}")
    seen[alone] = iid
    changed = []
    for before, after in ID_CONTEXTS:
      text = f"{before} {iid}{after}".strip()
      spliced = (vocab.encode(before) if before else []) + list(alone) + cont(after)
      if vocab.decode(spliced) != text:
        failures.append(f"{iid}: spliced tokens decode to {vocab.decode(spliced)!r}, not {text!r}")
      elif not _contains(vocab.encode(text), alone):
        changed.append(text)
    if changed:
      merged.append(f"{iid}: tokens {list(alone)} change inside {changed[0]!r}"
                    + (f" (and {len(changed) - 1} more contexts)" if len(changed) > 1 else ""))
  return IdTokenization(max(lengths, default=0), tokens, failures, merged,
                        float(np.mean(lengths)) if lengths else 0.0)


def _contains(seq: Sequence[int], sub: Sequence[int]) -> bool:
  n = len(sub)
  return any(tuple(seq[i:i + n]) == tuple(sub) for i in range(len(seq) - n + 1))


class ExtendedVocabulary(seqio.Vocabulary):
  """A SentencePiece vocabulary with whole-token pieces appended after all of its ids (its 100
  sentinels included): every existing id keeps its meaning -- and a pretrained checkpoint its
  embedding rows -- while the new pieces (item ID codes) get new rows. A piece written with a
  leading '▁' takes the space before it, as SentencePiece's own pieces do."""

  def __init__(self, base, pieces: Sequence[str]):
    super().__init__(extra_ids=0)
    self.base, self.pieces = base, list(pieces)
    self._ids = {p: base.vocab_size + k for k, p in enumerate(self.pieces)}
    bare = sorted({p.lstrip("▁") for p in self.pieces}, key=len, reverse=True)
    self._pattern = re.compile(" ?(" + "|".join(map(re.escape, bare)) + ")")
    self._continuation = continuation_encoder(base)

  @property
  def sentinel_top(self) -> int:
    """Span corruption's sentinels stay the base's: <extra_id_0> is id sentinel_top - 1."""
    return self.base.vocab_size

  @property
  def eos_id(self):
    return self.base.eos_id

  @property
  def unk_id(self):
    return self.base.unk_id

  @property
  def sentencepiece_model_file(self) -> str:
    return self.base.sentencepiece_model_file

  @property
  def _base_vocab_size(self):
    return self.base.vocab_size + len(self.pieces)

  def continuation(self, text: str) -> list[int]:
    return self._encode(text, continuation=True)

  def _text(self, text: str, continuation: bool) -> list[int]:
    if not text:
      return []
    return self._continuation(text) if continuation and not text.startswith(" ") else list(self.base.encode(text))

  def _encode(self, s: str, continuation: bool = False) -> list[int]:
    out, pos = [], 0
    for m in self._pattern.finditer(s):
      tok = m.group(1)
      spaced = m.group(0).startswith(" ") or m.start() == 0
      if spaced and "▁" + tok in self._ids:
        piece, start = "▁" + tok, m.start()
      elif tok in self._ids:
        piece, start = tok, m.start(1)
      else:
        continue
      out += self._text(s[pos:start], continuation or pos > 0)
      out.append(self._ids[piece])
      pos = m.end()
    return out + self._text(s[pos:], continuation or pos > 0)

  def _decode(self, ids) -> str:
    sp, n = self.base.tokenizer, self.base.tokenizer.get_piece_size()
    pieces = []
    for i in map(int, ids):
      if i >= self.base.vocab_size:
        pieces.append(self.pieces[i - self.base.vocab_size])
      elif i >= n:
        pieces.append(f"▁<extra_id_{self.base.vocab_size - 1 - i}>")
      elif i > 2:   # (seqio's decode already stops at EOS and drops padding)
        pieces.append(sp.id_to_piece(i))
      elif i == 2:
        pieces.append(" ⁇ ")
    text = "".join(pieces).replace("▁", " ")
    return text[1:] if text.startswith(" ") else text

  def _encode_tf(self, s):
    import tensorflow as tf
    return tf.py_function(lambda x: tf.constant(self._encode(x.numpy().decode()), tf.int32), [s], tf.int32)

  def _decode_tf(self, ids):
    import tensorflow as tf
    return tf.py_function(lambda x: tf.constant(self._decode(x.numpy().tolist())), [ids], tf.string)

  def __eq__(self, other):
    return (isinstance(other, ExtendedVocabulary) and same_vocabulary(self.base, other.base)
            and self.pieces == other.pieces)

  def __hash__(self):
    return hash(tuple(self.pieces))


def extend(vocab, pieces: Sequence[str]):
  """`vocab` itself when it has every piece already (the project's, trained with them), else an
  `ExtendedVocabulary` that appends the missing ones."""
  if not pieces:
    return vocab
  sp = getattr(vocab, "tokenizer", None)
  missing = [p for p in pieces if sp is None or sp.piece_to_id(p) == sp.unk_id()]
  if not missing:
    return vocab
  if len(missing) < len(pieces):
    raise ValueError(f"{describe(vocab)} has some ID pieces but not {missing[:3]}: re-run `recalign vocab`")
  return ExtendedVocabulary(vocab, pieces)
