"""RecLM-style silver profiles and the profile distillation task, on a hand-made data set."""

import itertools

import numpy as np
import pytest

import recalign.tasks as rt
from recalign.tasks import reclm

GENRES = {"a": "Comedy", "b": "Comedy", "f": "Comedy", "c": "Drama", "e": "Drama", "d": "Horror"}
TITLES = {"a": "Alpha", "b": "Bravo", "c": "Charlie", "d": "Delta", "e": "Echo", "f": "Foxtrot"}
# user -> [(item, rating)] in time order; the last two are validation and test (never read)
USERS = {"u1": [("a", 5), ("b", 4), ("c", 5), ("e", 4), ("d", 5), ("f", 4)],
         "u2": [("a", 5), ("b", 5), ("f", 5), ("d", 1), ("c", 5), ("e", 5)],
         "u3": [("f", 4), ("a", 4), ("d", 5), ("c", 2), ("b", 5), ("e", 5)]}
ATTRS = {"u1": {"age": "30", "gender": "F", "occupation": "artist"},
         "u2": {"age": "19", "gender": "M", "occupation": "student"},
         "u3": {"age": "60", "gender": "M", "occupation": "retired"}}


@pytest.fixture
def data(tmp_path):
  from recalign.data import AMAZON, prepare
  from recalign.data.ingest import Interaction, ItemMeta, RawData
  from recalign.data.report import IngestReport
  from recalign.data.vocab import train_vocabulary
  seqs = {u: [Interaction(i, float(t), float(r)) for t, (i, r) in enumerate(s)] for u, s in USERS.items()}
  meta = {i: ItemMeta(title=TITLES[i], categories=(f"Movies > {g}",)) for i, g in GENRES.items()}
  d = prepare(RawData(seqs, meta, AMAZON, "hand", [], IngestReport(), True, ATTRS), name="hand", kcore=0)
  d.save(tmp_path / "hand")
  train_vocabulary(d, tmp_path / "hand" / "vocab", vocab_size=120)
  return d, tmp_path / "hand"


def _item(d, source_id):
  return d.source_item_ids.index(source_id)


def test_silver_user_profiles_hand_computed(data):
  d, _ = data
  p = dict(zip(d.users, reclm.silver_user_profiles(d)))
  # training interactions: Comedy 7, Drama 3, Horror 2 of 12. u1 liked a b c e: Comedy 2 (lift .5/.583 = .86),
  # Drama 2 (lift .5/.25 = 2) -> Drama first. u3 liked f a d: Comedy 2, Horror 1 (below the floor of 2).
  assert p["u1"] == "User identity: age 25-34, female, artist; User interests: Drama, Comedy"
  assert p["u2"] == "User identity: age 18-24, male, student; User interests: Comedy"
  assert p["u3"] == "User identity: age 56+, male, retired; User interests: Comedy"


def test_silver_item_profiles_use_training_interactions_only(data):
  d, _ = data
  items = reclm.silver_item_profiles(d)
  assert items[_item(d, "a")] == ("Item identity: Comedy; Item audience: male, age 18-24, age 25-34, age 56+, "
                                  "artist")
  # d is u1's validation item: u1 (female, artist) is not its audience
  assert items[_item(d, "d")] == "Item identity: Horror; Item audience: male, age 18-24, age 56+, retired, student"


def test_profile_task_text_and_user_split(data, tmp_path):
  d, path = data
  names = rt.register_profile_task(path, collab=False, items=False)
  assert names == ["hand_profile", "hand_reclm"]
  split = reclm.user_split(3, 0)
  assert sorted(sum((list(v) for v in split.values()), [])) == [0, 1, 2]
  (train,) = rt.get("hand_profile").get_dataset({"inputs": 256, "targets": 64}, split="train", shuffle=False) \
      .as_numpy_iterator()
  u = d.users[int(split["train"][0])]
  hist = "; ".join(TITLES[i] for i, _ in USERS[u][:-2]) + ";"
  assert train["inputs_pretokenized"].decode() == (
      f"A user has purchased the following Amazon products (arranged in chronological order, from earliest to "
      f"most recent): {hist} Summarize the user's identity and interests as a profile.")
  assert train["targets_pretokenized"].decode() == dict(zip(d.users, reclm.silver_user_profiles(d)))[u]
  # teacher profiles a user supplies replace the silver ones; unknown users are an error naming the line
  teacher = tmp_path / "teacher.jsonl"
  teacher.write_text('{"user": "u1", "profile": "User identity: x; User interests: y"}\n'
                     '{"user": "zz", "profile": "p"}\n')
  with pytest.raises(Exception, match=r"teacher.jsonl:2 \[user\]"):
    rt.register_profile_task(path, profiles=teacher, collab=False, items=False)


def test_zero_shot_profiles_never_read_new_items(data):
  d, _ = data
  new = [_item(d, "c"), _item(d, "e")]     # the Drama items
  p = dict(zip(d.users, reclm.silver_user_profiles(d, exclude_items=new)))
  assert p["u1"] == "User identity: age 25-34, female, artist; User interests: Comedy"
  items = reclm.silver_item_profiles(d, exclude_items=new)
  assert items[_item(d, "c")] == "Item identity: Drama; Item audience: unknown"


def test_generate_profiles_resumes_without_repeating_users(data, tmp_path):
  import jax
  from recalign.data.vocab import load_vocabulary
  from recalign.models.model import EncoderDecoderModel
  from recalign.models.network import named_config, padded_vocab_size
  d, path = data
  vocab = load_vocabulary(path / "vocab")
  model = EncoderDecoderModel(named_config("tiny").replace(vocab_size=padded_vocab_size(vocab.vocab_size)))
  params = model.init(jax.random.PRNGKey(0))
  prompts = reclm.profile_prompts(d, vocab)
  assert set(prompts) == {"u1", "u2", "u3"}
  out = tmp_path / "profiles.jsonl"
  first = reclm.generate_profiles(model, params, vocab, {"u2": prompts["u2"]}, out, batch_size=2, max_length=8,
                                  progress=False)
  assert list(first) == ["u2"]
  every = reclm.generate_profiles(model, params, vocab, prompts, out, batch_size=2, max_length=8, progress=False)
  lines = out.read_text().splitlines()
  assert len(lines) == 3 and sorted(every) == ["u1", "u2", "u3"] and every["u2"] == first["u2"]
  # the same prompt decodes to the same text in any batch (greedy, padded to one shape)
  again = reclm.generate_profiles(model, params, vocab, {"u2": prompts["u2"]}, tmp_path / "x.jsonl", batch_size=2,
                                  max_length=8, progress=False)
  assert again["u2"] == every["u2"]


# ---------------------------------------------------------------------------------------------
# Collaborative and item-profile tasks

# three users with disjoint-ish tastes; each user's last two items are validation / test
COLLAB_USERS = {"u1": "abcdef", "u2": "cdghia", "u3": "ghijbe"}
COLLAB_TITLES = dict(zip("abcdefghij", ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel",
                                        "India", "Juliet"]))


@pytest.fixture
def collab_data(tmp_path):
  from recalign.data import AMAZON, prepare
  from recalign.data.ingest import Interaction, ItemMeta, RawData
  from recalign.data.report import IngestReport
  from recalign.data.vocab import train_vocabulary
  seqs = {u: [Interaction(i, float(t), 5.0) for t, i in enumerate(s)] for u, s in COLLAB_USERS.items()}
  meta = {i: ItemMeta(title=t, categories=("Beauty > Skin",), brand="Acme" if i == "a" else "")
          for i, t in COLLAB_TITLES.items()}
  d = prepare(RawData(seqs, meta, AMAZON, "collab", [], IngestReport(), True, ATTRS), name="collab", kcore=0)
  d.save(tmp_path / "collab")
  train_vocabulary(d, tmp_path / "collab" / "vocab", vocab_size=120)
  return d, tmp_path / "collab"


def _items(d, letters, ordered=False):
  out = [_item(d, c) for c in letters]
  return out if ordered else sorted(out)


def test_collab_records_never_use_held_out_interactions(collab_data):
  d, _ = collab_data
  near = np.array([[1], [2], [0]])     # u1 -> u2 -> u3 -> u1
  rec, skipped = reclm.collab_records(d, [0, 1, 2], near, max_items=3)
  rows = {(int(u), int(y)): (list(h), list(p), list(n)) for u, y, h, p, n in zip(
      *(rec.columns[k] for k in ("user", "label", "history", "pool", "neighbour_0")))}
  # u1: shown b c d, neighbour u2 shows d g h -> positive d; negatives g h (not e / f: u1's validation / test)
  assert rows[(0, 1)] == (_items(d, "bcd", True), _items(d, "d"), _items(d, "dgh", True))
  assert rows[(0, 0)][1] == _items(d, "gh")
  # u2: neighbour u3 shows h i j; i is u2's validation item, so the only negative is j
  assert rows[(1, 1)][1] == _items(d, "h") and rows[(1, 0)][1] == _items(d, "j")
  # u3 shares nothing with u1's shown b c d -> no positive (counted); negatives c d (b is u3's validation item)
  assert (2, 1) not in rows and rows[(2, 0)][1] == _items(d, "cd") and skipped == {"no_positive": 1, "no_negative": 0}
  for (u, y), (hist, pool, nb) in rows.items():
    train = set(d.sequences[u][:-2].tolist())
    assert set(hist) <= train and set(nb) <= set(d.sequences[near[u][0]][:-2].tolist())
    assert set(pool) <= train if y else not set(pool) & set(d.sequences[u].tolist())


def test_collab_task_text_and_epoch_draws(collab_data):
  d, path = collab_data
  emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])     # u1 ~ u2, u3 nearest u2
  near_of = reclm.similar_users(emb, 1).ravel().tolist()
  assert near_of == [1, 0, 1]
  rt.register_profile_task(path, name="cl", user_embeddings=emb, neighbours=1, collab_max_items=3, items=False)
  task = rt.get("cl_collab_profile")
  profiles = dict(zip(d.users, reclm.silver_user_profiles(d)))
  n = task.source.num_input_examples("train")
  assert n == 2     # one training user (3 users: one each for train / validation / test), a positive and a negative

  def stream():
    ds = task.get_dataset({"inputs": 512, "targets": 128}, split="train", shuffle=False, seed=3)
    return list(itertools.islice(ds.as_numpy_iterator(), 8 * n))

  drawn = {}
  for ex in stream():
    user, label = int(ex["user"]), int(ex["label"])
    cand = d.source_item_ids[int(ex["candidate"])]
    drawn.setdefault(label, []).append(cand)
    hist = [COLLAB_TITLES[c] for c in COLLAB_USERS[d.users[user]][:4][-3:]]
    if label == 1:   # a positive leaves the shown history (it may be an older training item, not shown)
      hist = [t for t in hist if t != COLLAB_TITLES[cand]]
    near = [COLLAB_TITLES[c] for c in COLLAB_USERS[d.users[near_of[user]]][:4][-3:]]
    assert ex["inputs_pretokenized"].decode() == reclm.collab_text(d.domain, hist, [near], COLLAB_TITLES[cand])
    assert ex["targets_pretokenized"].decode() == f"{profiles[d.users[user]]} ; answer: {'yes' if label else 'no'}"
    assert cand in COLLAB_USERS[d.users[user]][:4] if label else cand not in COLLAB_USERS[d.users[user]]
  # the exact wording once, literally: u1's positive (d, removed from u1's history; u2's shows it)
  assert reclm.collab_text(d.domain, ["Bravo", "Charlie"], [["Delta", "Golf", "Hotel"]], "Delta") == (
      "A user has purchased the following Amazon products (arranged in chronological order, from earliest to most "
      "recent): Bravo; Charlie; Users with similar tastes have purchased: similar user 1: Delta; Golf; Hotel; "
      "Summarize the user's identity and interests as a profile, then answer: would the user buy \"Delta\"? "
      "(yes or no)")
  # every training user here has a two-item pool: candidates are re-drawn across epochs, the same for a seed
  assert max(len(set(c)) for c in drawn.values()) == 2
  first = [int(x["candidate"]) for x in stream()]
  assert first == [int(x["candidate"]) for x in stream()]


def test_item_profile_task_text(data):
  d, path = data
  rt.register_profile_task(path, name="it", collab=False)
  task = rt.get("it_item_profile")
  users = dict(zip(d.users, reclm.silver_user_profiles(d)))
  items = reclm.silver_item_profiles(d)
  seen = []
  for split in ("train", "validation", "test"):
    n = task.source.num_input_examples(split)
    for ex in task.get_dataset({"inputs": 512, "targets": 128}, split=split, shuffle=False).take(n).as_numpy_iterator():
      i = int(ex["item"])
      text = ex["inputs_pretokenized"].decode()
      head = f"An item: {TITLES[d.source_item_ids[i]]} (categories: {GENRES[d.source_item_ids[i]]}; brand: unknown). "
      assert text.startswith(head + "Users who purchased it: ")
      shown = text[len(head + "Users who purchased it: "):-len(" Summarize the item's identity and audience as a "
                                                               "profile.") - 1].split(" | ")
      # only users whose training items include the item (d is u1's validation item: u1 never shown)
      trainers = {users[u] for u in d.users if i in d.sequences[d.users.index(u)][:-2]}
      assert set(shown) == trainers
      assert ex["targets_pretokenized"].decode() == items[i]
      seen.append(i)
  assert sorted(seen) == list(range(6))     # every item in exactly one split


def test_collab_metrics_and_identity_scores(data):
  d, _ = data
  m = reclm.collab_metrics(["P q ; answer: yes", "Q r ; answer: no"], ["P q ; answer: yes", "Q r ; answer: maybe"])
  assert m["answer_accuracy"] == 0.5 and m["answer_unparsable"] == 0.5 and m["majority_accuracy"] == 0.5
  assert m["profile_rougeL"] == pytest.approx(1.0)
  gen = {"u1": "User identity: age 25-34, female, artist; User interests: Drama",
         "u2": "User identity: age 18-24, female, student; User interests: Comedy",
         "u3": "User identity: male, retired; User interests: Comedy"}
  s = reclm.identity_scores(d, gen, [0, 1, 2], [0, 1, 2])
  assert s["users"] == 3
  assert s["age_accuracy"] == pytest.approx(2 / 3) and s["gender_accuracy"] == pytest.approx(2 / 3)
  assert s["occupation_accuracy"] == 1.0
  # majority among the reference users: male (2 of 3); age and occupation all differ (the first one counted)
  assert s["gender_majority"] == pytest.approx(2 / 3) and s["occupation_majority"] == pytest.approx(1 / 3)


def test_register_dataset_with_reclm(collab_data):
  _, path = collab_data
  names = rt.register_dataset(path, config=rt.TaskConfig(reclm=True))
  assert [n for n in names if "profile" in n or "reclm" in n] == [
      "collab_profile", "collab_collab_profile", "collab_item_profile", "collab_reclm"]
  assert rt.registry.task_info("collab_collab_profile").config.reclm     # what run.json records
  with pytest.raises(ValueError, match="reclm=True and itdr=True"):
    rt.register_dataset(path, config=rt.TaskConfig(reclm=True, itdr=True))


def test_profile_tasks_are_evaluated_as_generated_text(collab_data):
  import jax
  from recalign.evaluator import RecEvaluator, validation_metrics
  from recalign.models.model import EncoderDecoderModel
  from recalign.models.network import named_config, padded_vocab_size
  d, path = collab_data
  rt.register_profile_task(path, name="ev", user_embeddings=np.eye(3), neighbours=1, collab_max_items=3)
  vocab = rt.registry.task_info("ev_profile").vocab
  model = EncoderDecoderModel(named_config("tiny").replace(vocab_size=padded_vocab_size(vocab.vocab_size)))
  ev = RecEvaluator(model, d, vocab, progress=False)
  params = model.init(jax.random.PRNGKey(0))
  for task, kind in (("ev_profile", "profile"), ("ev_collab_profile", "collab_profile"),
                     ("ev_item_profile", "item_profile")):
    res = ev.evaluate(params, task, "test", {"inputs": 512, "targets": 128})
    assert set(validation_metrics(kind)) <= set(res.metrics)
    # the constant-profile baseline scores the commonest target against every target: this tiny test split
    # has one target text per task, so the constant scores 1.0
    targets = [p["target"] for p in res.predictions]
    assert len(set(targets)) == 1
    assert res.metrics["constant/" + ("profile_rougeL" if kind == "collab_profile" else "rougeL")] == 1.0
    who = {k for p in res.predictions for k in p if k in ("user", "item", "example")}
    assert who == ({"item"} if kind == "item_profile" else {"user"} if kind == "collab_profile" else {"example"})
  with pytest.raises(ValueError, match="ev_profile has no test examples that fit"):
    ev.evaluate(params, "ev_profile", "test", {"inputs": 512, "targets": 16})
