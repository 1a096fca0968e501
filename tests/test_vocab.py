import io

import pytest
import sentencepiece as spm

from conftest import write_tiny_tsv
from recalign.data import item_id, prepare, read_source
from recalign.data.vocab import check_item_ids, load_vocabulary, train_vocabulary
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


def test_check_flags_a_vocabulary_that_merges_ids_with_neighbours(tmp_path):
  """A user-supplied model (like T5's) can merge an ID's digits with the following comma."""
  text = ["Candidate items are: I12, I12, I12, I7"] * 200 + ["I12 I7 Title: x ? What's the of"] * 5
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=40,
                                 model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 hard_vocab_limit=False, minloglevel=2)
  (tmp_path / "spm.model").write_bytes(model.getvalue())
  vocab = load_vocabulary(tmp_path)
  check = check_item_ids(vocab, ["I12", "I7"])
  assert any("I12" in f and "Candidate" in f for f in check.failures), check.failures
