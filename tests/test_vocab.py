import pytest
import sentencepiece as spm

from conftest import train_t5_like_vocab, write_tiny_tsv
from recalign.data import item_id, prepare, read_source
from recalign.data.vocab import check_item_ids, continuation_encoder, load_vocabulary, train_vocabulary
from recalign.tasks.templates import MASK, Templates, entry, item_list


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  data = prepare(read_source(write_tiny_tsv(root / "src")), name="tiny", kcore=0)
  path = train_vocabulary(data, root / "vocab", vocab_size=300)
  return data, load_vocabulary(path), path


def test_special_ids_match_t5(tiny):
  _, vocab, path = tiny
  sp = spm.SentencePieceProcessor(model_file=str(path))
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert vocab.extra_ids == 100
  assert vocab.vocab_size == sp.get_piece_size() + 100
  assert vocab.decode([vocab.vocab_size - 1]) == "<extra_id_0>"  # sentinels at the top, as T5


def test_templates_and_item_ids_round_trip(tiny):
  data, vocab, _ = tiny
  t = Templates(data.domain)
  prompt = " ".join([t.history, item_list([entry(item_id(0), data.items[0].title), MASK]), t.retrieval])
  for text in [prompt, *t.all_text(), "I4821", "I10537, I11849, I3"]:
    assert vocab.decode(vocab.encode(text)) == text
  # Digits are single pieces: every ID is "▁I" followed by its digits.
  pieces = vocab.tokenizer.encode("I4821", out_type=str)
  assert pieces == ["▁I", "4", "8", "2", "1"]


def test_item_ids_tokenise_consistently_in_context(tiny):
  _, vocab, _ = tiny
  ids = [f"I{n}" for n in (1, 7, 10, 99, 4821, 12101, 100000, 356)]
  check = check_item_ids(vocab, ids)
  assert check.failures == [] and check.max_tokens == 7
  assert len(check.token_ids) == 11  # "▁I" + ten digits


def test_t5_like_vocabulary_merges_ids_in_context_and_the_check_reports_it(tiny, tmp_path):
  """T5's SentencePiece model does not split digits: "I7," can become "▁I 7," inside a prompt while
  "I7" alone is "▁I 7". recalign splices each ID's own tokens, so the check reports the merges
  (informational) and finds no failure; an ID that cannot round-trip is a failure."""
  data, _, _ = tiny
  vocab = load_vocabulary(train_t5_like_vocab(data, tmp_path / "t5.model"))
  assert vocab.extra_ids == 100 and vocab.decode([vocab.vocab_size - 1]) == "<extra_id_0>"
  ids = [item_id(k) for k in range(data.num_items)]
  check = check_item_ids(vocab, ids)
  assert check.failures == []
  assert len(check.merged_in_context) >= len(ids) - 2, check.merged_in_context
  assert vocab.encode("Item ID: I7, Title: x;") != (vocab.encode("Item ID:") + vocab.encode("I7")
                                                     + continuation_encoder(vocab)(", Title: x;"))
  assert vocab.decode(vocab.encode("Item ID:") + vocab.encode("I7") + continuation_encoder(vocab)(", Title: x;")) \
      == "Item ID: I7, Title: x;"
  bad = check_item_ids(vocab, ["I7", "I\u2603"])            # a character the model does not know
  assert [f.split(":")[0] for f in bad.failures] == ["I\u2603"]


def test_the_vocabulary_trainer_reads_a_bounded_stream(tmp_path, monkeypatch):
  """Its input is streamed and capped at MAX_SENTENCES (catalogues of millions of items): with a cap of 3,000
  sentences the templates and the first items fill it, and text after the cap is never read."""
  from recalign.data import vocab as V
  data = prepare(read_source(write_tiny_tsv(tmp_path / "src")), name="t", kcore=0)
  read = []

  def extra():
    for k in range(10):
      read.append(k)
      yield f"never read {k}"

  monkeypatch.setattr(V, "MAX_SENTENCES", 3000)
  assert sum(1 for _ in V.training_text(data)) > 3000        # the templates alone are weighted 1,000 times
  path = V.train_vocabulary(data, tmp_path / "vocab", vocab_size=200, extra_text=extra())
  assert read == [] and path.exists()
