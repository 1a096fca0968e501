import re

import numpy as np
import pytest
import tensorflow as tf

from conftest import (large_graph_constants, prepare_tiny, shared, synthetic_dataset, train_t5_like_vocab,
                      write_tiny_tsv)
from recalign import metrics as M
import recalign.tasks as rt
from recalign.data import PreparedData, item_id, prepare, read_source
from recalign.data.vocab import load_vocabulary, train_vocabulary
from recalign.tasks import preprocessors as pp
from recalign.tasks import sources

LENGTHS = {"inputs": 512, "targets": 64}
H = ("A user has purchased the following Amazon products (arranged in chronological order, "
     "from earliest to most recent):")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  prepare_tiny(root)
  rt.register_dataset(root / "tiny", config=rt.TaskConfig(num_candidates=3))
  return PreparedData.load(root / "tiny"), load_vocabulary(root / "tiny" / "vocab")


def first(task, split="train", lengths=LENGTHS, n=1):
  ds = rt.get(task).get_dataset(lengths, split=split, shuffle=False)
  return list(ds.take(n).as_numpy_iterator())


def names(data, seq):
  return [data.items[i].title for i in seq]


def e(data, i, semi=True):
  return f"Item ID: {item_id(i)}, Title: {data.items[i].title}" + (";" if semi else "")


def test_exact_text_and_tokens_of_every_task(tiny):
  data, vocab = tiny
  u1 = data.users.index("u1")
  seq = data.sequences[u1]                      # b, c, a | d (validation) | e (test)
  assert names(data, seq) == ["Lip Balm & Tint", "Nail Polish", "Rose Oil", "Hair Gel", "Face Cream"]
  b, c, a, d, ee = (int(x) for x in seq)
  ex = {x["user"]: x for x in first("tiny_retrieval", n=6)}[u1]
  assert ex["inputs_pretokenized"].decode() == (
      f"{H} Item ID: {item_id(b)}, Title: Lip Balm & Tint; Item ID: {item_id(c)}, Title: Nail Polish; "
      "What would the user buy next?")
  assert ex["targets_pretokenized"].decode() == item_id(a)
  # Token-level assembly equals tokenising the text; EOS (1) appended.
  assert ex["inputs"].tolist() == vocab.encode(ex["inputs_pretokenized"].decode()) + [1]
  assert ex["targets"].tolist() == vocab.encode(item_id(a)) + [1]

  test = {x["user"]: x for x in first("tiny_retrieval", "test", n=6)}[u1]
  assert test["inputs_pretokenized"].decode() == (
      f"{H} {e(data, b)} {e(data, c)} {e(data, a)} {e(data, d)} What would the user buy next?")
  assert test["targets_pretokenized"].decode() == item_id(ee)

  rank = {x["user"]: x for x in first("tiny_ranking", "validation", n=6)}[u1]
  cands = [item_id(int(i)) for i in rank["candidates"]]
  assert rank["inputs_pretokenized"].decode() == (
      f"{H} {e(data, b)} {e(data, c)} {e(data, a)} Which of the following candidate items would you "
      f"recommend the user to buy next? Candidate items are: {', '.join(cands)}")
  assert item_id(d) in cands and len(set(cands)) == 3
  assert rank["inputs"].tolist() == vocab.encode(rank["inputs_pretokenized"].decode()) + [1]

  rating = {x["user"]: x for x in first("tiny_rating", "test", n=6)}[u1]   # ratings b4 c2 a5 d5 | e1
  assert rating["inputs_pretokenized"].decode() == (
      f"A user likes the following Amazon products: {e(data, b)} {e(data, a)} {e(data, d)} "
      f"The user dislikes the following Amazon products: {e(data, c)} Predict whether the user would "
      f"like the following item. Answer yes or no. {e(data, ee, semi=False)}")
  assert rating["targets_pretokenized"].decode() == "no" and rating["label"] == 0

  mim = {x["user"]: x for x in first("tiny_mim", n=6)}[u1]
  window = [b, c, a]
  text = mim["inputs_pretokenized"].decode()
  masked = [i for i in window if e(data, i) not in text]
  assert text.count("[masked item];") == len(masked) == 1      # 20% of 3 items, at least one
  assert mim["targets_pretokenized"].decode() == " ".join(e(data, i) for i in masked)
  assert text.endswith("What are the masked items, in chronological order?")

  bpr = {x["user"]: x for x in first("tiny_bpr", n=6)}[u1]
  pair = [int(i) for i in bpr["candidates"]]
  assert a in pair and len(set(pair)) == 2
  assert bpr["inputs_pretokenized"].decode() == (
      f"{H} {e(data, b)} {e(data, c)} Which of the following two items would the user buy next? "
      f"{e(data, pair[0])} {e(data, pair[1])}")
  assert bpr["targets_pretokenized"].decode() == e(data, a, semi=False)

  qa = first("tiny_item_qa", n=2)
  assert qa[0]["inputs_pretokenized"].decode() == "What's the title of I1?"
  assert qa[0]["targets_pretokenized"].decode() == data.items[0].title


def test_id_only_and_compact_histories(tiny, tmp_path):
  """`with_titles=False` keeps the paper's `Item ID: ...;` entries without titles; `item_prefix=False`
  writes the IDs alone; `prompt_words=False` drops the retrieval template's words. Tokens still equal the
  tokenised text."""
  data, vocab = tiny
  tiny_dir = rt.registry.task_info("tiny_retrieval").data_dir
  u1 = data.users.index("u1")
  b, c, a, d, ee = (item_id(int(x)) for x in data.sequences[u1])
  for name, cfg, hist in [("tiny_ids", rt.TaskConfig(with_titles=False), f"Item ID: {b}; Item ID: {c};"),
                          ("tiny_compact", rt.TaskConfig(with_titles=False, item_prefix=False), f"{b}; {c};"),
                          ("tiny_bare", rt.TaskConfig(with_titles=False, item_prefix=False, prompt_words=False),
                           f"{b}; {c};")]:
    rt.register_dataset(tiny_dir, name=name, config=cfg)
    ex = {x["user"]: x for x in first(f"{name}_retrieval", n=6)}[u1]
    words = name != "tiny_bare"      # prompt_words=False: the history alone
    assert ex["inputs_pretokenized"].decode() == (f"{H} {hist} What would the user buy next?" if words else hist)
    assert ex["inputs"].tolist() == vocab.encode(ex["inputs_pretokenized"].decode()) + [1]
    if not words:   # other tasks keep their words (the model must tell them apart)
      assert first(f"{name}_mim", n=6)[0]["inputs_pretokenized"].decode().startswith(H)


def test_sample_counts_per_split(tiny):
  data, _ = tiny
  # training lengths (items minus validation and test): u1 3, u2 2, u3 3, u4 2, u5 2, u6 3
  assert len(sources.build_examples(data, "train", window=20)) == 6
  assert len(sources.build_examples(data, "train", window=2)) == 2 + 1 + 2 + 1 + 1 + 2
  ex = sources.build_examples(data, "train", window=2)
  assert all(len(h) == 1 for h in ex.histories())
  assert len(sources.build_examples(data, "validation")) == len(sources.build_examples(data, "test")) == 6
  # Every training item after the first a target (TIGER / P5): L - 1 examples per user.
  pre = sources.build_examples(data, "train", window=20, train_examples="prefixes")
  assert len(pre) == 2 + 1 + 2 + 1 + 1 + 2
  for u, h, t in zip(pre.user, pre.histories(), pre.target):
    train = data.train_sequence(int(u)).tolist()
    assert train[len(h)] == t and train[:len(h)] == h.tolist()     # history = the items before the target
  w2 = sources.build_examples(data, "train", window=2, train_examples="prefixes")
  assert len(w2) == len(pre) and all(len(h) == 1 for h in w2.histories())
  assert rt.get("tiny_retrieval").num_input_examples("train") == 6


def test_continuation_rows_cover_every_training_item_in_chunks(tiny):
  data, _ = tiny
  for window, m in [(20, 2), (2, 2), (3, 5)]:
    ex = sources.build_examples(data, "train", window=window, train_examples="continuations", next_items=m)
    following = [ex.following[a:b].tolist() for a, b in zip(ex.following_splits[:-1], ex.following_splits[1:])]
    starts = {}
    for u, h, t, f in zip(ex.user, ex.histories(), ex.target, following):
      train = data.train_sequence(int(u)).tolist()
      lo = train.index(int(t))
      assert h.tolist() == train[max(0, lo - (window - 1)):lo] and f == train[lo + 1:lo + 2 * m - 1]
      starts.setdefault(int(u), []).append(lo)
    assert starts == {u: list(range(1, len(data.train_sequence(u)), m)) for u in range(data.num_users)}
  with pytest.raises(ValueError, match="continuations"):
    sources.build_examples(data, "train", next_items=3)


def test_retrieval_continuations_redraw_the_split_point_each_epoch_with_exact_tokens(tiny):
  """next_items=2 with atomic IDs: u1's training items b, c, a make one row; each epoch splits it at c
  (`b -> c a`) or at a (`b c -> a`), drawn from the seed; targets are the IDs' own pieces (= the text
  tokenised); a targets budget of one ID keeps the first; evaluation asks for one item. Random IDs (I1 is
  a prefix of I12) are refused."""
  from recalign.data.ids import build_ids
  data, _ = tiny
  tiny_dir = rt.registry.task_info("tiny_retrieval").data_dir
  build_ids(data, "atomic").save(tiny_dir)
  cfg = rt.TaskConfig(with_titles=False, item_prefix=False, id_scheme="atomic", next_items=2)
  rt.register_dataset(tiny_dir, name="tiny_cont", config=cfg)
  vocab = rt.registry.task_info("tiny_cont_retrieval").vocab
  u1 = data.users.index("u1")
  b, c, a, d, ee = (f"<item_{int(x)}>" for x in data.sequences[u1])
  assert rt.get("tiny_cont_retrieval").num_input_examples("train") == 6     # one chunk per user

  def u1_rows(seed, lengths=LENGTHS):
    ds = rt.get("tiny_cont_retrieval").get_dataset(lengths, split="train", shuffle=False, seed=seed)
    return [(x["inputs_pretokenized"].decode(), x["targets_pretokenized"].decode(), tuple(x["targets"].tolist()))
            for x in ds.take(6 * 8).as_numpy_iterator() if x["user"] == u1]    # 8 epochs

  rows = u1_rows(0)
  assert len(rows) == 8 and rows == u1_rows(0)
  split_c = (f"{H} {b}; What would the user buy next?", f"{c} {a}", tuple(vocab.encode(f"{c} {a}") + [1]))
  split_a = (f"{H} {b}; {c}; What would the user buy next?", a, tuple(vocab.encode(a) + [1]))
  assert set(rows) == {split_c, split_a} and len(split_c[2]) == 3      # one piece per ID + EOS
  assert u1_rows(1) != rows
  short = u1_rows(0, {"inputs": 512, "targets": 2})
  assert {r[1] for r in short} == {c, a}                                # only the first ID fits
  test = {x["user"]: x for x in first("tiny_cont_retrieval", "test", n=6)}[u1]
  assert test["targets_pretokenized"].decode() == ee
  with pytest.raises(ValueError, match="prefix"):
    rt.register_dataset(tiny_dir, name="tiny_cont_random", config=rt.TaskConfig(next_items=2))


def test_training_samples_never_contain_validation_or_test_items(tiny):
  data, _ = tiny
  held = {u: {item_id(data.validation_target(u)), item_id(data.test_target(u))}
          for u in range(data.num_users)}
  for task in ("tiny_retrieval", "tiny_ranking", "tiny_rating", "tiny_mim", "tiny_mlm", "tiny_bpr"):
    for ex in first(task, n=6 * 5):   # five epochs
      text = ex["inputs_pretokenized"].decode() + " " + ex["targets_pretokenized"].decode()
      ids = set(re.findall(r"I\d+", text))
      assert ids and not ids & held[int(ex["user"])], (task, text)


def test_negatives_exclude_user_items_and_follow_popularity(tiny):
  data, _ = tiny
  for ex in first("tiny_ranking", n=6 * 10):
    user_items = set(data.sequences[int(ex["user"])].tolist())
    negs = set(int(i) for i in ex["candidates"]) - {int(ex["target_item"])}
    assert len(negs) == 2 and not negs & user_items
  # Gumbel top-k samples without replacement in proportion to popularity.
  log_pop = tf.math.log(tf.constant([1.0, 2.0, 7.0, 0.0, 10.0]))
  counts = np.zeros(5)
  for s in range(2000):
    neg = pp.sample_negatives(tf.constant([s, 1], tf.int64), log_pop, tf.constant([4], tf.int32), 1)
    counts[int(neg[0])] += 1
  np.testing.assert_allclose(counts / counts.sum(), [0.1, 0.2, 0.7, 0.0, 0.0], atol=0.03)


def test_resampling_differs_across_epochs_and_reproduces(tiny):
  def stream(task, n=6 * 4):
    return [(int(x["example_id"]), int(x["epoch"]), x["inputs"].tolist(), x["targets"].tolist())
            for x in first(task, n=n)]
  for task in ("tiny_mim", "tiny_mlm", "tiny_bpr", "tiny_ranking"):
    a, b = stream(task), stream(task)
    assert a == b                                       # same seed: same samples
    by_epoch = {}
    for eid, ep, inp, tgt in a:
      by_epoch.setdefault(eid, {})[ep] = (inp, tgt)
    changed = sum(len({str(v) for v in d.values()}) > 1 for d in by_epoch.values())
    assert changed >= 3, task                           # most examples re-drawn across 4 epochs
  # Evaluation candidates are fixed.
  v1, v2 = first("tiny_ranking", "validation", n=6), first("tiny_ranking", "validation", n=6)
  assert [x["inputs"].tolist() for x in v1] == [x["inputs"].tolist() for x in v2]


def test_item_and_negative_tables_are_captured_not_copied_into_map_graphs(tmp_path):
  """The item tables (every item's tokens and text), popularity and the negatives' exclusion table are
  eager tensors the map functions capture: as graph constants tf.data copies them into every graph it
  serialises (measured at 10M interactions: 0.42 GiB of a training process's peak)."""
  from recalign.data import tfds_data
  data = synthetic_dataset(tmp_path, "captured", users=150, num_candidates=20)
  tfds_data.save(data, tmp_path / "captured")
  rt.register_dataset(tmp_path / "captured", name="captured_s", config=rt.TaskConfig(num_candidates=20, streamed=True))
  for kind in ("retrieval", "ranking", "bpr", "mim", "mlm"):
    for name in ("captured", "captured_s"):   # streamed: nor the per-user arrays that number the examples
      ds = rt.get(f"{name}_{kind}").get_dataset(LENGTHS, split="train", shuffle=False)
      assert large_graph_constants(ds, min(data.num_items, data.num_users)) == [], (name, kind)
      assert len(list(ds.take(2).as_numpy_iterator())) == 2
  rt.unregister("captured_s")
  # ... made once per task: a second dataset (another validation) captures the same tensors
  options = rt.get("captured_ranking").preprocessors[0].keywords["options"]
  made = dict(options.tensors)
  rt.get("captured_ranking").get_dataset(LENGTHS, split="validation", shuffle=False)
  assert all(options.tensors[k] is made[k] for k in ("log_popularity", "user_items"))
  # the tables are made once and shared by every pipeline of the data set
  a = rt.get("captured_retrieval").preprocessors[0].keywords["tables"].entry.tf()
  b = rt.get("captured_ranking").preprocessors[0].keywords["tables"].entry.tf()
  assert a is b


def test_an_evaluation_sample_is_rendered_alone_and_as_in_the_whole_split(tiny):
  from recalign.evaluator import task_examples
  for task in ("tiny_retrieval", "tiny_ranking"):
    whole = task_examples(task, "test", LENGTHS)
    ids = np.array([e["example_id"] for e in whole[1::2]])
    view = rt.registry.example_subset(rt.get(task), "test", ids)
    assert view.num_input_examples("test") == len(ids)   # the source itself yields only the sample
    assert [int(x["example_id"]) for x in view.source.get_dataset("test").as_numpy_iterator()] == ids.tolist()
    sample = task_examples(task, "test", LENGTHS, example_ids=ids)
    assert len(sample) == len(ids)
    for a, b in zip(sample, whole[1::2]):
      assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_long_histories_drop_the_oldest_items_never_the_target(tiny):
  data, vocab = tiny
  lengths = {"inputs": 60, "targets": 16}
  for split in ("test", "validation"):
    for ex in first("tiny_retrieval", split, lengths, n=6):
      text = ex["inputs_pretokenized"].decode()
      assert len(ex["inputs"]) <= 60 and ex["inputs"][-1] == 1
      assert ex["inputs"].tolist() == vocab.encode(text) + [1]   # not cut by seqio's trim
      assert text.endswith("What would the user buy next?")
      u = int(ex["user"])
      end = len(data.sequences[u]) - (1 if split == "test" else 2)
      kept = [int(item_id_num) - 1 for item_id_num in re.findall(r"Item ID: I(\d+)", text)]
      assert kept == data.sequences[u][end - len(kept):end].tolist()   # a suffix: newest items kept
  assert any(len(re.findall("Item ID", x["inputs_pretokenized"].decode())) < 4
             for x in first("tiny_retrieval", "test", lengths, n=6))


def test_span_corruption_properties():
  vocab_size = 1000
  tokens = tf.range(10, 110, dtype=tf.int32)   # 100 distinct tokens
  for s in range(20):
    key = tf.constant([s, 7], tf.int64)
    mask = pp.random_spans_noise_mask(tf.constant(100), key).numpy()
    assert mask.sum() == 20 and not mask[0]                      # 20% noise, starts with non-noise
    spans = int(np.sum(mask[1:] & ~mask[:-1]))
    assert spans == round(20 / 3)
    inputs, targets = (t.numpy() for t in pp.span_corruption(tokens, key, vocab_size))
    sent_in = [t for t in inputs if t >= vocab_size - 100]
    sent_tg = [t for t in targets if t >= vocab_size - 100]
    assert sent_in == list(range(vocab_size - 1, vocab_size - 1 - spans, -1))   # <extra_id_0>, 1, ...
    assert sent_tg == sent_in and targets[0] == vocab_size - 1   # targets: <extra_id_k> span_k ...
    assert len(targets) == pp.span_corruption_targets_length(100)
    # Reconstruct: replace each sentinel in inputs by the target span following the same sentinel.
    spans_of, cur = {}, None
    for t in targets:
      if t >= vocab_size - 100:
        cur = t
        spans_of[cur] = []
      else:
        spans_of[cur].append(t)
    rebuilt = [x for t in inputs for x in (spans_of[t] if t >= vocab_size - 100 else [t])]
    assert rebuilt == list(range(10, 110))


def test_mixtures_and_helpful_errors(tiny):
  _, vocab = tiny
  mix = rt.get("tiny_reat")
  assert sorted(t.name for t in mix.tasks) == ["tiny_mim", "tiny_mlm", "tiny_retrieval"]
  ut = rt.get("tiny_ut")
  assert sorted(t.name for t in ut.tasks) == ["tiny_ranking", "tiny_rating", "tiny_retrieval"]
  ds = mix.get_dataset(LENGTHS, split="train", shuffle=True, seed=3)
  got = list(ds.take(60).as_numpy_iterator())
  texts = [vocab.decode(x["inputs"].tolist()) for x in got]
  kinds = {("masked" in t, "next?" in t) for t in texts}
  assert len(kinds) >= 3
  with pytest.raises(ValueError, match="unknown task or mixture 'tiny_nope'.*tiny_reat"):
    rt.get("tiny_nope")


@pytest.fixture(scope="module")
def beauty(tmp_path_factory):
  root = tmp_path_factory.mktemp("beauty")
  data = prepare(read_source(shared("amazon-beauty")), name="beauty")
  data.save(root / "beauty")
  train_vocabulary(data, root / "beauty" / "vocab")
  names = rt.register_dataset(root / "beauty")
  return data, load_vocabulary(root / "beauty" / "vocab"), names


def test_beauty_has_no_rating_task_and_renders_real_titles(beauty):
  _, _, names = beauty
  assert "beauty_rating" not in names and "beauty_rpat" not in names and "beauty_ut_at" in names
  with pytest.raises(ValueError, match="has no ratings"):
    rt.get("beauty_rating")
  ex = first("beauty_ranking", "test", {"inputs": 1024, "targets": 16})[0]
  text = ex["inputs_pretokenized"].decode()
  assert len(re.findall(r"I\d+", text.split("Candidate items are:")[1])) == 100
  assert text.endswith(item_id(int(ex["candidates"][-1])))
  with pytest.raises(tf.errors.InvalidArgumentError, match="raise it"):
    first("beauty_ranking", "test", {"inputs": 256, "targets": 16})


@pytest.mark.parametrize("lengths", [(320, 64), pytest.param((1024, 64), marks=pytest.mark.slow),
                                     pytest.param((512, 128), marks=pytest.mark.slow)])
def test_targets_are_never_cut_on_the_beauty_training_stream(beauty, lengths):
  """MIM, BPR and item QA budget inputs and targets together: over the first 2,000 training examples
  every target decodes to its rendered text in full (seqio's trim would cut it otherwise)."""
  _, vocab, _ = beauty
  lengths = {"inputs": lengths[0], "targets": lengths[1]}
  for task in ("beauty_mim", "beauty_bpr", "beauty_mlm", "beauty_item_qa"):
    masked = 0
    for ex in rt.get(task).get_dataset(lengths, split="train", shuffle=False).take(2000).as_numpy_iterator():
      tgt, inp = ex["targets"].tolist(), ex["inputs"].tolist()
      assert len(tgt) <= lengths["targets"] and len(inp) <= lengths["inputs"]
      assert tgt[-1] == 1 and inp[-1] == 1, task
      if task == "beauty_mlm":
        continue   # span corruption: the *_pretokenized fields hold the uncorrupted source
      assert vocab.decode(tgt[:-1]) == ex["targets_pretokenized"].decode(), task
      assert vocab.decode(inp[:-1]) == ex["inputs_pretokenized"].decode(), task
      if task == "beauty_mim":
        text = ex["inputs_pretokenized"].decode()
        n_masks = text.count("[masked item];")
        assert n_masks >= 1 and ex["targets_pretokenized"].decode().count("Item ID:") == n_masks
        masked += n_masks
    if task == "beauty_mim":
      assert masked > 2000   # masks were not simply dropped


def test_evaluation_draws_are_independent_of_training_and_seeds_change_the_data(tmp_path):
  synthetic_dataset(tmp_path, "syn")
  lengths = {"inputs": 512, "targets": 64}

  def by_id(task, split, seed=None, n=60):   # {(example id, epoch): example}
    ds = rt.get(task).get_dataset(lengths, split=split, shuffle=seed is not None, seed=seed)
    return {(int(x["example_id"]), int(x["epoch"])): x for x in ds.take(n).as_numpy_iterator()}

  # Test example i and training example i (epoch 0) are the same user, but not the same negatives.
  test, train = by_id("syn_ranking", "test"), by_id("syn_ranking", "train")
  assert all(test[i]["user"] == train[i]["user"] for i in test) and len(test) == 60
  same = sum(set(test[i]["candidates"]) - {test[i]["target_item"]}
             == set(train[i]["candidates"]) - {train[i]["target_item"]} for i in test)
  assert same == 0, same
  # RANDOM_SEED reaches the draws: other masks and negatives for the same training examples...
  for task in ("syn_mim", "syn_bpr", "syn_ranking"):
    a, b = by_id(task, "train", seed=0, n=300), by_id(task, "train", seed=1, n=300)
    common = a.keys() & b.keys()
    changed = sum(a[i]["inputs"].tolist() != b[i]["inputs"].tolist() for i in common)
    assert len(common) > 20 and changed > 0.6 * len(common), (task, changed, len(common))
    again = by_id(task, "train", seed=0, n=300)
    assert again.keys() == a.keys() and all(again[i]["inputs"].tolist() == a[i]["inputs"].tolist() for i in a)
  # ...while evaluation candidates are the same for every run seed.
  v0, v1 = by_id("syn_ranking", "validation", seed=0), by_id("syn_ranking", "validation", seed=1)
  assert all(v0[i]["candidates"].tolist() == v1[i]["candidates"].tolist() for i in v0)
  # The tasks of a mixture shuffle independently.
  order = {t: [int(x["example_id"]) for x in rt.get(t).get_dataset(lengths, split="train", shuffle=True, seed=3)
                                                    .take(60).as_numpy_iterator()]
           for t in ("syn_retrieval", "syn_mim", "syn_bpr")}
  assert order["syn_retrieval"] != order["syn_mim"] != order["syn_bpr"] != order["syn_retrieval"]


def _count(seq, sub):
  n = len(sub)
  return sum(seq[i:i + n] == sub for i in range(len(seq) - n + 1))


def test_one_tokenisation_per_id_under_a_t5_like_vocabulary(tmp_path):
  """Prompts, targets and the decoding trie use each ID's own tokens even where tokenising the
  prompt text as a whole would merge the ID with the comma after it."""
  from recalign.decoding import EOS, ItemTrie
  data = prepare(read_source(write_tiny_tsv(tmp_path / "src")), name="t5tiny", kcore=0, seed=0)
  data.save(tmp_path / "t5tiny")
  vocab = load_vocabulary(train_t5_like_vocab(data, tmp_path / "t5.model"))
  rt.register_dataset(tmp_path / "t5tiny", vocab=vocab, config=rt.TaskConfig(num_candidates=3))
  canon = {item_id(k): vocab.encode(item_id(k)) for k in range(data.num_items)}
  merged = 0
  for task, split in [("retrieval", "test"), ("ranking", "validation"), ("mim", "train"), ("bpr", "train"),
                      ("rating", "test"), ("item_qa", "train")]:
    for ex in first(f"t5tiny_{task}", split, n=12):
      for field in ("inputs", "targets"):
        toks, text = ex[field].tolist(), ex[f"{field}_pretokenized"].decode()
        assert toks[-1] == EOS and vocab.decode(toks[:-1]) == text, (task, field, text)
        for iid in set(re.findall(r"I\d+", text)):
          assert _count(toks, canon[iid]) == len(re.findall(rf"\b{iid}\b", text)), (task, iid, text)
        merged += toks[:-1] != vocab.encode(text)
      if task in ("retrieval", "ranking"):
        assert ex["targets"].tolist() == canon[item_id(int(ex["target_item"]))] + [EOS]
  assert merged > 0          # the whole-text tokenisation really differs: the test can fail
  trie = ItemTrie.for_items(vocab, list(canon))
  for k, iid in enumerate(canon):
    path = [int(trie.alphabet[np.flatnonzero(trie.next_node[n] == m)[0]])
            for n, m in zip([0, *trie.item_path[k][:-1]], trie.item_path[k]) if m < len(trie.next_node)]
    assert path == canon[iid] + [EOS]


def test_task_metric_fns_under_seqio_evaluator(tiny):
  """The tasks' metric_fns, called by seqio.Evaluator exactly as T5X's trainer and eval job call them:
  retrieval gets one decoded string per example; rating gets each target's log-likelihood."""
  import seqio
  data, vocab = tiny
  lengths = {"inputs": 256, "targets": 16}

  def evaluator(task):
    return seqio.Evaluator(task, seqio.EncDecFeatureConverter(pack=False), eval_split="validation",
                           sequence_length=lengths, use_memory_cache=False, async_compute_metrics=False)

  # retrieval: a model that decodes the right ID for even example indices and another item for odd ones
  ev = evaluator("tiny_retrieval")
  expected, seen = [], []

  def predict_fn(ds):
    out = []
    for index, ex in ds.as_numpy_iterator():
      tgt = [t for t in ex["decoder_target_tokens"] if t not in (0, 1)]
      if index % 2:
        tgt = vocab.encode(item_id((vocab.decode(tgt) == item_id(0)) + 0))   # a wrong item's ID
      expected.append(index % 2 == 0)
      seen.append(vocab.decode(tgt))
      out.append((index, tgt))
    return out

  metrics = ev.evaluate(compute_metrics=True, predict_fn=predict_fn, score_fn=lambda ds: [])[0].result()
  m = metrics["tiny_retrieval"]
  assert m["hr@1"] == pytest.approx(np.mean(expected)) and m["ndcg@1"] == m["hr@1"]
  assert 0 < m["hr@1"] < 1 and all(s.startswith("I") for s in seen)
  # ranked lists (all beams) add @5 / @10
  ranked = M.seqio_retrieval_metrics(["I1", "I2"], [["I9", "I1", "I3", "I4", "I5"], ["I2", "I8", "I7", "I6", "I5"]])
  assert ranked["hr@1"] == 0.5 and ranked["hr@5"] == 1.0
  assert ranked["ndcg@5"] == pytest.approx((1 / np.log2(3) + 1) / 2)

  # rating: the log-likelihood of each example's own answer; P(yes) = exp(s) for "yes", 1 - exp(s) for "no"
  ev = evaluator("tiny_rating")
  labels, p_yes = [], []

  def score_fn(ds):
    out = []
    for index, ex in ds.as_numpy_iterator():
      answer = vocab.decode([t for t in ex["decoder_target_tokens"] if t not in (0, 1)])
      p = 0.2 + 0.6 * ((index * 7) % 5) / 4              # the model's P(yes), P(no) = 1 - P(yes)
      labels.append(answer == "yes")
      p_yes.append(p)
      out.append((index, float(np.log(p if answer == "yes" else 1 - p))))
    return out

  metrics = ev.evaluate(compute_metrics=True, predict_fn=lambda ds: [], score_fn=score_fn)[0].result()
  assert 0 < sum(labels) < len(labels)
  assert metrics["tiny_rating"]["auc"] == pytest.approx(M.auc(p_yes, labels))


def test_preprocessors_are_partials_with_checked_options(tiny):
  """Each task's preprocessor is the module-level `preprocess` bound by functools.partial; an option
  the task function does not take is an error at registration, not swallowed."""
  import functools
  task = rt.get("tiny_ranking")
  pre = task.preprocessors[0]
  assert isinstance(pre, functools.partial) and pre.func is pp.preprocess
  assert pre.keywords["kind"] == "ranking" and pre.keywords["options"]["num_candidates"] == 3
  assert pp.task_options("mlm") == ("window_size", "noise_density", "mean_noise_span_length")
  info = rt.registry.task_info("tiny_ranking")
  tables = pp.ItemTables(PreparedData.load(info.data_dir), info.vocab)
  with pytest.raises(TypeError, match=r"takes no option num_candidate \(it takes: log_popularity, user_items, "
                                      r"num_candidates\)"):
    pp.make_preprocessor("ranking", tables, None, task_name="x", num_candidate=3)
  with pytest.raises(TypeError, match="retrieval task takes no option mask_rate"):
    pp.make_preprocessor("retrieval", tables, None, task_name="x", mask_rate=0.2)


def test_a_name_registered_again_is_the_same_or_refused_unless_replaced(tmp_path, monkeypatch):
  """As seqio's registries: the same folder, vocabulary and config again is a no-op (the same task objects,
  nothing rebuilt); another config, folder or a rewritten folder is an error naming what differs."""
  import os
  first, other = prepare_tiny(tmp_path / "a", name="again"), prepare_tiny(tmp_path / "b", name="again")
  names = rt.register_dataset(first, config=rt.TaskConfig(num_candidates=3))
  task = rt.get("again_retrieval")
  with monkeypatch.context() as m:      # the same registration again decides without loading the data
    m.setattr(PreparedData, "load", classmethod(lambda cls, path: pytest.fail("loaded the data again")))
    assert rt.register_dataset(first, config=rt.TaskConfig(num_candidates=3)) == names and "again_reat" in names
  assert rt.get("again_retrieval") is task
  with pytest.raises(ValueError, match=r"'again' is already registered, with another TaskConfig \(window=20 -> 5\)"
                                       r".*replace=True"):
    rt.register_dataset(first, config=rt.TaskConfig(num_candidates=3, window=5))
  assert rt.get("again_retrieval") is task                      # the refused call changed nothing
  with pytest.raises(ValueError, match=re.escape(f"another folder ({first}, now {other})")):
    rt.register_dataset(other, config=rt.TaskConfig(num_candidates=3))
  manifest = first / "manifest.json"
  os.utime(manifest, ns=(manifest.stat().st_atime_ns, manifest.stat().st_mtime_ns + 10**9))   # prepared again
  with pytest.raises(ValueError, match="another preparation .* was rewritten since"):
    rt.register_dataset(first, config=rt.TaskConfig(num_candidates=3))
  rt.register_dataset(first, config=rt.TaskConfig(num_candidates=3, window=5), replace=True)
  assert rt.registry.task_info("again_retrieval").config.window == 5 and rt.get("again_retrieval") is not task
  rt.unregister("again")
  with pytest.raises(ValueError, match="again_retrieval"):
    rt.get("again_retrieval")


def test_seqio_metric_fns_and_recalign_eval_cannot_disagree(tiny):
  """The same decodes scored by the metric_fns the tasks carry (what seqio.Evaluator / T5X apply) and by
  RecEvaluator's finish step (what `recalign eval` applies): the same numbers, for retrieval (all beams),
  ranking (the scored candidates) and rating (a model whose mass is on "yes" / "no")."""
  from recalign.evaluator import KINDS, RecEvaluator
  data, vocab = tiny
  ev = RecEvaluator(None, data, vocab)
  rng = np.random.default_rng(3)
  n = 40
  examples = [{"user": u % data.num_users, "target_item": int(rng.integers(data.num_items))} for u in range(n)]
  targets = np.array([e["target_item"] for e in examples])
  ranked = np.stack([rng.permutation(data.num_items)[:10] for _ in range(n)]).astype(np.int32)   # (a small catalogue)
  ranked[::3, 2] = targets[::3]                                     # some hits at rank 3, some anywhere / none
  ranked[1::3] = np.where(ranked[1::3] == targets[1::3, None], ranked[1::3, ::-1], ranked[1::3])
  ours, _ = KINDS["retrieval"].finish(ev, examples, {"items": ranked, "scores": np.zeros(ranked.shape, np.float32)})
  theirs = rt.get("tiny_retrieval").metric_fns[0]([item_id(t) for t in targets],
                                                  [[item_id(i) for i in row] for row in ranked])
  common = [k for k in KINDS["retrieval"].metrics if k in theirs]
  assert "ndcg@5" in common and 0 < ours["hr@5"] < 1
  assert {k: ours[k] for k in common} == pytest.approx({k: theirs[k] for k in common})
  cands = np.stack([np.r_[t, rng.permutation(np.setdiff1d(np.arange(data.num_items), [t]))[:4]] for t in targets])
  scored = M.rank_by_scores(rng.normal(size=cands.shape), cands)
  ours, _ = KINDS["ranking"].finish(ev, [{**e, "candidates": c} for e, c in zip(examples, cands)],
                                    {"beam": scored, "scored": scored})
  theirs = rt.get("tiny_ranking").metric_fns[0]([item_id(t) for t in targets],
                                                [[item_id(i) for i in r] for r in scored])
  assert 0 < theirs["ndcg@5"] < 1
  assert {k: ours[f"score/{k}"] for k in theirs} == pytest.approx(theirs)     # (@10: beyond 5 candidates)
  labels = rng.integers(0, 2, n)
  labels[:2] = (0, 1)
  p = rng.uniform(0.05, 0.95, n)
  ours, _ = KINDS["rating"].finish(ev, [{**e, "label": y} for e, y in zip(examples, labels)],
                                   {"yes": np.log(p), "no": np.log1p(-p)})
  theirs = rt.get("tiny_rating").metric_fns[0](["yes" if y else "no" for y in labels],
                                               np.where(labels == 1, np.log(p), np.log1p(-p)))
  assert ours["auc"] == pytest.approx(theirs["auc"]) and 0 < ours["auc"] < 1


def test_every_evaluable_kind_has_one_spec_whose_headline_it_reports():
  """Adding a task kind is one KindSpec: what the registry registers and the evaluator can score agree."""
  from recalign.evaluator import KINDS
  from recalign.tasks import itdr
  registered = {"retrieval", "ranking", "rating", *(f"itdr_{k}" for k in itdr.KINDS + itdr.TEXT_KINDS),
                "profile", "collab_profile", "item_profile"}
  assert set(KINDS) == registered
  for kind, spec in KINDS.items():
    assert spec.headline in spec.metrics, kind
    assert spec.generated == (kind not in ("retrieval", "ranking", "rating")), kind
