"""RecLM-style silver profiles and the profile distillation task, on a hand-made data set."""

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
  names = rt.register_profile_task(path)
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
  teacher.write_text('{"user": "u1", "profile": "User identity: x; User interests: y"}\n{"user": "zz", "profile": "p"}\n')
  with pytest.raises(Exception, match=r"teacher.jsonl:2 \[user\]"):
    rt.register_profile_task(path, profiles=teacher)


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
