"""Item ID schemes: unique, deterministic for a seed, built from training data only, one piece per
code in every template context, and constrained decoding that returns only valid items."""

import collections
import json
import re

import jax
import numpy as np
import pytest
from flax import linen as nn

from conftest import train_t5_like_vocab
import recalign.tasks as rt
from recalign import cli
from recalign.data import AMAZON, prepare
from recalign.data.ids import build_ids, cooccurrence, id_pieces, load_ids, scheme_pieces
from recalign.data.ingest import Interaction, ItemMeta, RawData
from recalign.data.report import IngestReport
from recalign.data.vocab import check_item_ids, extend, load_vocabulary, train_vocabulary
from recalign.decoding import ItemTrie, beam_search_items
from recalign.models.model import EncoderDecoderModel
from recalign.models.network import CONFIGS, padded_vocab_size

WORDS = ["rose", "oil", "lip", "balm", "nail", "polish", "hair", "gel", "face", "cream", "soap", "bar"]


def _raw(users=150, items=120, seed=0, held_out_shift=0):
  """Users walk a few item communities; every item has a title (some without, to test the fallback).
  `held_out_shift` changes only each user's last two items (validation / test)."""
  rng = np.random.default_rng(seed)
  seqs = {}
  for u in range(users):
    start = int(rng.integers(0, items))
    seq = [(start + 3 * t + int(rng.integers(0, 2))) % items for t in range(8)]
    seq = list(dict.fromkeys(seq))
    while len(seq) < 6:
      seq.append(int(rng.integers(0, items)))
      seq = list(dict.fromkeys(seq))
    seq[-2:] = [(x + held_out_shift) % items for x in seq[-2:]]
    seq = list(dict.fromkeys(seq))
    seqs[f"u{u:03d}"] = [Interaction(f"i{x:03d}", float(t), None) for t, x in enumerate(seq)]
  meta = {f"i{k:03d}": ItemMeta(title="" if k % 17 == 0 else f"{WORDS[k % 12]} {WORDS[(k // 12) % 12]} {k % 5}",
                                 categories=() if k % 17 == 0 else (f"Beauty > {WORDS[k % 6]}",))
          for k in range(items)}
  return RawData(seqs, meta, AMAZON, "synthetic", [], IngestReport())


@pytest.fixture(scope="module")
def data():
  return prepare(_raw(), name="idt", kcore=0)


SMALL = {"collaborative": dict(codebook=6), "semantic": dict(levels=2, codebook=8), "atomic": {},
         "hybrid": dict(codebook=6)}


@pytest.mark.parametrize("scheme", ["collaborative", "semantic", "hybrid"])
def test_ids_are_unique_deterministic_and_seeded(data, scheme):
  a = build_ids(data, scheme, seed=0, **SMALL[scheme])
  assert len(set(a.ids)) == data.num_items and all(re.fullmatch(r"(<[a-z]_\d+>)+(<item_\d+>)?", i) for i in a.ids)
  assert build_ids(data, scheme, seed=0, **SMALL[scheme]).ids == a.ids
  assert build_ids(data, scheme, seed=1, **SMALL[scheme]).ids != a.ids
  s = a.stats
  assert s["unique"] and s["items"] == data.num_items and s["mean_codes"] >= 2
  if scheme == "semantic":
    assert s["max_codes"] == 3 and s["collisions_before_dedup"] > 0        # 2 levels of 8 codes: 64 < 120
    assert a.params["items_without_text"] == sum(1 for m in data.items if not m.title and not m.categories) > 0
  else:
    assert all(len(re.findall("<", i)) <= 6 for i in a.ids)


def test_large_catalogues_cluster_in_mini_batches(data, monkeypatch):
  """Above MINIBATCH_ABOVE rows k-means runs in mini-batches (bounded memory on millions of items); the IDs
  are still unique and seeded. Below it (Beauty), Lloyd's k-means as before."""
  from sklearn.cluster import MiniBatchKMeans
  from recalign.data import ids as I
  small = build_ids(data, "collaborative", seed=0, codebook=6)
  used = []
  fit = MiniBatchKMeans.fit
  monkeypatch.setattr(MiniBatchKMeans, "fit", lambda self, x, *a, **k: used.append(len(x)) or fit(self, x, *a, **k))
  monkeypatch.setattr(I, "MINIBATCH_ABOVE", 50)
  got = {}
  for scheme in ("collaborative", "semantic"):
    got[scheme] = build_ids(data, scheme, seed=0, **SMALL[scheme]).ids
    assert len(set(got[scheme])) == data.num_items
    assert got[scheme] == build_ids(data, scheme, seed=0, **SMALL[scheme]).ids
  assert used and max(used) == data.num_items and min(used) > 50    # the whole catalogue, and only big clusters
  assert got["collaborative"] != small.ids                          # another algorithm: other clusters
  monkeypatch.setattr(I, "MINIBATCH_ABOVE", 10 ** 9)
  used.clear()
  assert build_ids(data, "collaborative", seed=0, codebook=6).ids == small.ids and not used


@pytest.mark.parametrize("scheme", ["collaborative", "semantic"])
def test_ids_use_training_interactions_only(data, scheme):
  """Changing every user's validation and test items changes nothing: only training sequences count."""
  other = prepare(_raw(held_out_shift=7), name="idt", kcore=0)
  assert [s[:-2].tolist() for s in other.sequences] == [s[:-2].tolist() for s in data.sequences]
  assert [s[-2:].tolist() for s in other.sequences] != [s[-2:].tolist() for s in data.sequences]
  assert other.source_item_ids == data.source_item_ids
  assert (cooccurrence(other) != cooccurrence(data)).nnz == 0
  assert build_ids(other, scheme, **SMALL[scheme]).ids == build_ids(data, scheme, **SMALL[scheme]).ids


def test_atomic_and_hybrid_ids_end_with_the_items_own_piece(data):
  """Atomic: one piece per item, carrying the word boundary; hybrid (P5's CID+IID): the collaborative
  (or semantic) codes, then the item's own piece, which does not carry it."""
  atomic = build_ids(data, "atomic")
  assert atomic.ids[:3] == ["<item_0>", "<item_1>", "<item_2>"] and len(atomic.ids) == data.num_items
  assert atomic.pieces() == [f"▁<item_{k}>" for k in range(data.num_items)]     # sorted by value
  assert atomic.stats["mean_codes"] == 1 and atomic.stats["code_usage"] == {
      "item": {"codes_used": data.num_items, "largest": data.num_items}}
  for base in ("collaborative", "semantic"):
    inner = build_ids(data, base, **SMALL[base])
    hybrid = build_ids(data, "hybrid", base=base, **SMALL[base])
    assert hybrid.ids == [i + f"<item_{k}>" for k, i in enumerate(inner.ids)]
    assert hybrid.params["base"] == base
    assert hybrid.stats["mean_codes"] == pytest.approx(inner.stats["mean_codes"] + 1, abs=1e-3)
    pieces = hybrid.pieces()
    assert {p for p in pieces if "item" in p} == {f"<item_{k}>" for k in range(data.num_items)}
    assert set(pieces) - {f"<item_{k}>" for k in range(data.num_items)} == set(inner.pieces())
  with pytest.raises(ValueError, match="collaborative or semantic"):
    build_ids(data, "hybrid", base="random")


def test_hybrid_item_leaf_puts_the_items_piece_in_place_of_the_code_that_tells_items_apart(data):
  """P5's hybrid: every code, then the item's piece -- decided by the codes (no two IDs share what precedes
  it). leaf='item': the codes but the last, then the piece, which now chooses among the items sharing them."""
  def largest_choice(ids):   # the most IDs that share what comes before their last piece
    return max(collections.Counter(i[:i.rindex("<")] for i in ids).values())

  for base in ("collaborative", "semantic"):
    inner = build_ids(data, base, **SMALL[base])
    p5, leaf = (build_ids(data, "hybrid", base=base, leaf=x, **SMALL[base]) for x in ("codes", "item"))
    assert leaf.params["leaf"] == "item" and leaf.stats["unique"] and len(leaf.ids) == data.num_items
    assert leaf.ids == [i[:i.rindex("<")] + f"<item_{k}>" for k, i in enumerate(inner.ids)]
    assert leaf.stats["mean_codes"] == pytest.approx(inner.stats["mean_codes"], abs=1e-3)
    assert largest_choice(p5.ids) == 1 and largest_choice(leaf.ids) > 1
  with pytest.raises(ValueError, match="'codes' or 'item'"):
    build_ids(data, "hybrid", leaf="last")


def test_ids_cli_vocabulary_pieces_and_tokenisation_in_every_context(data, tmp_path, capsys):
  data.save(tmp_path / "idt")
  for scheme in ("collaborative", "semantic", "atomic", "hybrid"):
    assert cli.main(["ids", str(tmp_path / "idt"), "--scheme", scheme, "--codebook", "6", "--levels", "2"]) == 0
  assert cli.main(["vocab", str(tmp_path / "idt"), "--size", "300"]) == 0
  out = capsys.readouterr().out
  assert "ids semantic" in out and "consistent" in out
  manifest = json.loads((tmp_path / "idt" / "manifest.json").read_text())
  assert set(manifest["id_schemes"]) == {"collaborative", "semantic", "atomic", "hybrid"}
  project = load_vocabulary(tmp_path / "idt" / "vocab")
  t5_like = load_vocabulary(train_t5_like_vocab(data, tmp_path / "t5.model"))
  for scheme in ("collaborative", "semantic", "atomic", "hybrid"):
    ids = load_ids(tmp_path / "idt", scheme, data.num_items)
    for base in (project, t5_like):      # pieces of the project vocabulary / appended to a pretrained one
      vocab = extend(base, id_pieces(ids))
      assert (vocab is base) == (base is project)
      check = check_item_ids(vocab, ids)
      assert check.failures == [] and check.merged_in_context == []
      for i in ids:
        assert len(vocab.encode(i)) == i.count("<")              # exactly one token per code
        assert vocab.decode(vocab.encode(i)) == i


@pytest.mark.parametrize("variant", ["random", "collaborative", "semantic", "atomic", "hybrid", "hybrid_item"])
def test_tasks_and_constrained_decoding_under_each_scheme(data, tmp_path, variant):
  scheme, _, leaf = variant.partition("_")     # hybrid_item: the hybrid IDs with leaf="item"
  root = tmp_path / variant
  data.save(root)
  if scheme != "random":
    build_ids(data, scheme, **SMALL[scheme], **({"leaf": leaf} if leaf else {})).save(root)
  train_vocabulary(data, root / "vocab", vocab_size=300, pieces=scheme_pieces(root))
  rt.register_dataset(root, name=f"ids_{variant}", config=rt.TaskConfig(num_candidates=10, id_scheme=scheme))
  info = rt.registry.task_info(f"ids_{variant}_retrieval")
  ids = list(info.ids)
  ex = next(rt.get(f"ids_{variant}_retrieval").get_dataset({"inputs": 256, "targets": 16}, split="test",
                                                          shuffle=False).as_numpy_iterator())
  assert ex["targets_pretokenized"].decode() == ids[int(ex["target_item"])]
  assert ex["targets"].tolist() == info.vocab.encode(ids[int(ex["target_item"])]) + [1]
  last = ids[int(data.sequences[int(ex["user"])][-2])]       # the newest history item (the validation one)
  assert re.search(re.escape(f"Item ID: {last}") + "[,;]", ex["inputs_pretokenized"].decode())
  model = EncoderDecoderModel(CONFIGS["tiny"].replace(vocab_size=padded_vocab_size(info.vocab.vocab_size)))
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  trie = ItemTrie.for_items(info.vocab, ids)
  enc = np.array([ex["inputs"]])
  items, _ = beam_search_items(model, params, enc, trie, beam_size=30)
  assert (items >= 0).all() and len(set(items[0].tolist())) == 30 and items.max() < data.num_items


def test_finetuning_a_pretrained_vocabulary_appends_id_pieces_as_new_rows(data, tmp_path):
  """Semantic IDs on a checkpoint's own vocabulary: the pieces become new ids after the checkpoint's
  (sentinels included), its embedding rows are kept at their ids and new rows are appended."""
  import torch
  import transformers
  from recalign import train as T
  from recalign import trainer
  from recalign.models import checkpoints as ck
  data.save(tmp_path / "d")
  build_ids(data, "semantic", levels=2, codebook=64).save(tmp_path / "d")     # ~130 pieces: rows must grow
  hf_dir = tmp_path / "hf"
  t5 = load_vocabulary(train_t5_like_vocab(data, hf_dir / "spiece.model"))
  rows = padded_vocab_size(t5.vocab_size)
  torch.manual_seed(0)
  transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=rows, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0)).save_pretrained(hf_dir)
  before = ck.load_params(hf_dir)
  T.train(model_dir=str(tmp_path / "ft"), train_steps=1, progress=False,
          dataset=trainer.DatasetConfig("idt_reat", {"inputs": 256, "targets": 64}, 4, data_dirs=[str(tmp_path / "d")],
                                        task_config=rt.TaskConfig(num_candidates=10, id_scheme="semantic")),
          model=trainer.ModelConfig(ck.config_from_hf(json.loads((hf_dir / "config.json").read_text())),
                                    initial_checkpoint_path=str(hf_dir), vocabulary="checkpoint"))
  vocab = rt.registry.task_info("idt_retrieval").vocab
  assert vocab.base.sp_model == t5.sp_model and vocab.vocab_size == t5.vocab_size + len(vocab.pieces)
  assert vocab.encode("<extra_id_0>") == t5.encode("<extra_id_0>")           # sentinels unchanged
  after = ck.load_params(tmp_path / "ft" / "checkpoints" / "1")       # warm-up step 0: lr 0, nothing moved
  emb = after["token_embedder"]["embedding"]
  assert emb.shape[0] == padded_vocab_size(vocab.vocab_size) > rows
  np.testing.assert_allclose(emb[:rows], before["token_embedder"]["embedding"], atol=1e-6)
  run = json.loads((tmp_path / "ft" / "run.json").read_text())
  assert run["task_config"]["id_scheme"] == "semantic" and run["vocabulary"]["appended_pieces"] == len(vocab.pieces)


def test_experiments_build_a_scheme_again_when_asked_for_other_settings(tmp_path, capsys):
  """ensure_prepared (the studies' data folders): a scheme built once is reused; asked for with other
  `build_ids` settings (hybrid leaf="item"), it is built again with them (its pieces in the vocabulary)."""
  from conftest import write_tiny_tsv
  from recalign.data.ids import load_ids
  from recalign.experiments import ensure_prepared
  src, out = write_tiny_tsv(tmp_path / "src"), tmp_path / "tiny"
  ensure_prepared(src, out, "tiny", kcore=0, id_schemes={"hybrid": {"codebook": 2}})
  p5 = load_ids(out, "hybrid")
  ensure_prepared(src, out, "tiny", kcore=0, id_schemes=("hybrid",))
  assert "building" not in capsys.readouterr().out.split("using prepared")[-1]      # reused
  ensure_prepared(src, out, "tiny", kcore=0, id_schemes={"hybrid": {"codebook": 2, "leaf": "item"}})
  leaf = load_ids(out, "hybrid")
  assert "building hybrid item IDs" in capsys.readouterr().out
  assert leaf == [i[:i[:i.rindex("<")].rindex("<")] + i[i.rindex("<"):] for i in p5]   # one code fewer
  assert json.loads((out / "manifest.json").read_text())["id_schemes"]["hybrid"]["params"]["leaf"] == "item"
  sp = load_vocabulary(out / "vocab").tokenizer
  pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
  assert set(scheme_pieces(out)) <= pieces
