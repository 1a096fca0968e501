import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import synthetic_dataset, write_tiny_tsv
from recalign import metrics as M
from recalign.data import prepare, read_source
from recalign.data.vocab import load_vocabulary, train_vocabulary
from recalign.decoding import ItemTrie, beam_search, beam_search_items, score_items
from recalign.models.model import EncoderDecoderModel
from recalign.models.network import CONFIGS

IDS = [f"I{n}" for n in range(1, 31)] + ["I105", "I1050"]   # shared prefixes of different lengths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("dec")
  data = prepare(read_source(write_tiny_tsv(root / "src")), name="tiny", kcore=0)
  vocab = load_vocabulary(train_vocabulary(data, root / "vocab", vocab_size=300))
  model = EncoderDecoderModel(CONFIGS["tiny"].replace(vocab_size=512))
  params = nn.unbox(model.init(jax.random.PRNGKey(7)))
  # Sharpen the output layer so that item scores are well separated.
  params["decoder"]["logits_dense"]["kernel"] = params["decoder"]["logits_dense"]["kernel"] * 8
  enc = np.array(jax.random.randint(jax.random.PRNGKey(1), (3, 24), 3, 300))
  enc[1, 17:] = 0
  return vocab, model, params, enc, ItemTrie.for_items(vocab, IDS)


def test_trie_arrays(setup):
  vocab, *_, trie = setup
  assert trie.num_items == len(IDS) and trie.depth == 1 + 4 + 1      # ▁I 1 0 5 0 EOS
  assert set(trie.alphabet.tolist()) == set(vocab.encode("I1234567890")) | {1}
  # Following each item's tokens through next_node ends at its leaf.
  assert trie.leaves_under[0] == len(IDS)
  for i, iid in enumerate(IDS):
    node = 0
    for t in vocab.encode(iid) + [1]:
      node = trie.next_node[node, list(trie.alphabet).index(t)]
      assert node >= 0
    assert trie.leaf_item[node] == i


@pytest.mark.parametrize("full", [False, True], ids=["sliced", "full_softmax"])
def test_wide_beam_equals_scoring_every_item(setup, full):
  vocab, model, params, enc, trie = setup
  items, scores = beam_search_items(model, params, enc, trie, beam_size=len(IDS), full_softmax=full)
  every = np.tile(np.arange(len(IDS)), (len(enc), 1))
  forced = score_items(model, params, enc, every, trie, vocab, IDS, restrict=not full)
  np.testing.assert_array_equal(items, M.rank_by_scores(forced, every))
  np.testing.assert_allclose(scores, -np.sort(-forced, axis=1), atol=1e-4)


def test_scoring_encodes_each_prompt_once_and_equals_per_candidate_teacher_forcing(setup, monkeypatch):
  from recalign.models import network
  from recalign.models.model import shift_right
  vocab, model, params, enc, trie = setup
  cands = np.array([[0, 5, 31], [2, 2, 30], [7, 1, 0]])
  seen = []
  original = network.Transformer.encode
  monkeypatch.setattr(network.Transformer, "encode", lambda self, tokens, *a, **k: (
      seen.append(tokens.shape), original(self, tokens, *a, **k))[1])
  got = score_items(model, params, enc, cands, trie, vocab, IDS, restrict=False)
  assert seen and all(shape[0] == len(enc) for shape in seen)     # never the [b * candidates] repeat
  # A token is scored where the IDs offer a choice: "▁I" starts every ID (never scored); the EOS after
  # I6 / I8 / I1050 ends IDs no other extends (not scored), after I1 / I3 / I105 it is a choice.
  seqs = [tuple(vocab.encode(i) + [1]) for i in IDS]

  def choice(seq, d):
    return len({s[d] for s in seqs if s[:d] == seq[:d]}) > 1

  assert [choice(seqs[i], len(seqs[i]) - 1) for i in (5, 7, 31, 0, 2, 30)] == [False] * 3 + [True] * 3
  assert not any(choice(s, 0) for s in seqs)
  for r in range(len(enc)):
    for c, i in enumerate(cands[r]):
      tgt = np.array([vocab.encode(IDS[i]) + [1]])
      logits = model.logits(params, {"encoder_input_tokens": enc[r:r + 1], "decoder_target_tokens": tgt,
                                     "decoder_input_tokens": shift_right(jnp.asarray(tgt))})
      tok = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1))[0], tgt[0][:, None], 1)[:, 0]
      want = sum(t for d, t in enumerate(tok) if choice(seqs[i], d))
      np.testing.assert_allclose(got[r, c], want, atol=1e-4)


def test_evaluation_samples_users_at_random_and_the_demo_reports_users_it_did_not_select_on(tmp_path):
  import recalign.tasks as rt
  from recalign.experiments import report_ids, selection_size
  from recalign.evaluator import sample_example_ids, task_examples
  synthetic_dataset(tmp_path, "samp", users=400)
  lengths = {"inputs": 128, "targets": 16}
  first = task_examples("samp_retrieval", "test", lengths, 50)
  users = [int(e["user"]) for e in first]
  assert len(users) == 50 and users != list(range(50)) and max(users) > 300      # not the first 50
  assert users == [int(e["user"]) for e in task_examples("samp_retrieval", "test", lengths, 50)]
  assert users != [int(e["user"]) for e in task_examples("samp_retrieval", "test", lengths, 50, seed=1)]
  n = rt.get("samp_retrieval").num_input_examples("validation")
  selected = sample_example_ids(n, selection_size(n))
  reported = report_ids("samp_retrieval", "validation")
  assert len(selected) == min(500, n // 2) and not set(selected) & set(reported)
  assert sorted(set(selected) | set(reported)) == list(range(n))


def test_beams_are_valid_distinct_items_and_respect_allowed_sets(setup):
  vocab, model, params, enc, trie = setup
  items, scores = beam_search_items(model, params, enc, trie, beam_size=8)
  for row in items:
    assert len(set(row.tolist())) == 8 and all(0 <= i < len(IDS) for i in row)
  assert np.all(np.diff(scores, axis=1) <= 1e-6)                  # best first
  # Ranking: beams over 6 candidates cover them all and agree with scoring the candidates.
  rng = np.random.default_rng(0)
  cands = np.stack([rng.choice(len(IDS), 6, replace=False) for _ in enc])
  items, _ = beam_search_items(model, params, enc, trie, beam_size=6, candidates=cands)
  forced = score_items(model, params, enc, cands, trie, vocab, IDS)
  np.testing.assert_array_equal(items, M.rank_by_scores(forced, cands))
  # More beams than allowed items: the extra beams are empty (-1), never an invalid item.
  items, scores = beam_search_items(model, params, enc, trie, beam_size=10, candidates=cands)
  assert np.all(items[:, 6:] == -1) and np.all(np.isin(items[:, :6], cands))
  # Exclusion: the best items of the unrestricted search are gone, the rest keeps its order.
  full, _ = beam_search_items(model, params, enc, trie, beam_size=len(IDS))
  banned = [row[:3].tolist() + [30, 30] for row in full]   # item 30 = "I105": a prefix of "I1050"
  items, _ = beam_search_items(model, params, enc, trie, beam_size=len(IDS), exclude=banned)
  for row, f, b in zip(items, full, banned):
    kept = [i for i in f.tolist() if i not in b]
    assert row.tolist()[:len(kept)] == kept and set(row.tolist()[len(kept):]) == {-1}


def test_unconstrained_beam_of_one_is_greedy(setup):
  _, model, params, enc, _ = setup
  tokens, _ = beam_search(model, params, jnp.asarray(enc), beam_size=1, max_length=6)
  dec = np.zeros((len(enc), 6), np.int32)
  for t in range(6):   # greedy by repeated full forward passes
    logits = model.module.apply({"params": params}, enc, np.concatenate([np.zeros((len(enc), 1), np.int32),
                                                                          dec[:, :-1]], 1))
    dec[:, t] = np.asarray(logits[:, t].argmax(-1))
  greedy = dec.copy()
  for r in range(len(greedy)):  # after EOS the beam pads with 0
    eos = np.where(greedy[r] == 1)[0]
    if len(eos):
      greedy[r, eos[0] + 1:] = 0
  np.testing.assert_array_equal(np.asarray(tokens)[:, 0], greedy)
  tokens4, scores4 = beam_search(model, params, jnp.asarray(enc), beam_size=4, max_length=6)
  assert np.all(np.diff(np.asarray(scores4), axis=1) <= 1e-6)


def test_ranking_metrics_on_hand_computed_cases():
  ranked = np.array([[5, 3, 9, 1, 2, 7, 8, 4, 6, 0],
                     [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                     [4, 4, 4, 4, 4, 4, 4, 4, 4, 4]])
  targets = np.array([3, 7, 0])          # ranks 2, 7, absent
  m = M.ranking_metrics(ranked, targets, ks=(1, 5, 10))
  assert m["hr@1"] == 0 and m["hr@5"] == pytest.approx(1 / 3) and m["hr@10"] == pytest.approx(2 / 3)
  assert m["ndcg@5"] == pytest.approx((1 / np.log2(3)) / 3)
  assert m["ndcg@10"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(8)) / 3)
  assert M.ranking_metrics(np.array([[7]]), np.array([7]), ks=(1,))["ndcg@1"] == 1.0


def test_auc_equals_pairwise_definition():
  rng = np.random.default_rng(0)
  scores = np.round(rng.normal(size=200), 1)      # rounding creates ties
  labels = rng.random(200) < 0.4
  pos, neg = scores[labels], scores[~labels]
  pairwise = np.mean([(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)])
  assert M.auc(scores, labels) == pytest.approx(pairwise, abs=1e-12)
  assert M.auc([0.1, 0.9, 0.4], [0, 1, 0]) == 1.0 and M.auc([0.9, 0.1], [0, 1]) == 0.0
  np.testing.assert_allclose(M.p_yes(np.log(0.3), np.log(0.1)), 0.75)
  with pytest.raises(ValueError, match="positive and one negative"):
    M.auc([0.1, 0.2], [1, 1])


def test_evaluator_end_to_end_on_tiny_tasks(tmp_path):
  import recalign.tasks as rt
  from recalign.evaluator import RecEvaluator
  data = prepare(read_source(write_tiny_tsv(tmp_path / "src")), name="evtiny", kcore=0)
  data.save(tmp_path / "evtiny")
  train_vocabulary(data, tmp_path / "evtiny" / "vocab", vocab_size=300)
  rt.register_dataset(tmp_path / "evtiny", config=rt.TaskConfig(num_candidates=3))
  vocab = load_vocabulary(tmp_path / "evtiny" / "vocab")
  model = EncoderDecoderModel(CONFIGS["tiny"].replace(vocab_size=512))
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  lengths = {"inputs": 256, "targets": 16}
  # The paper's protocol by default: the whole catalogue (8 beams = every item, history included)...
  full = RecEvaluator(model, data, vocab, beam_size=8, batch_size=4, progress=False)
  res = full.evaluate(params, "evtiny_retrieval", "test", lengths)
  assert res.protocol == "full catalogue" and all(len(p["ranked"]) == 8 for p in res.predictions)
  assert json.loads(res.write(tmp_path / "full")[0].read_text())["protocol"] == "full catalogue"
  # ...and with exclude_history the user's earlier items never appear.
  ev = RecEvaluator(model, data, vocab, beam_size=4, batch_size=4, progress=False, exclude_history=True)
  res = ev.evaluate(params, "evtiny_retrieval", "test", lengths)
  assert res.metrics["examples"] == 6 and len(res.predictions) == 6 and res.protocol == "history excluded"
  for p in res.predictions:
    u = data.users.index(p["user"])
    hist = {f"I{i + 1}" for i in data.sequences[u][:-1]}
    assert p["ranked"] and not hist & set(p["ranked"])
  ranking = ev.evaluate(params, "evtiny_ranking", "test", lengths)
  assert 0 <= ranking.metrics["beam/hr@1"] <= ranking.metrics["beam/hr@5"] == 1.0  # 3 candidates
  assert ranking.metrics["score/hr@5"] == 1.0
  rating = ev.evaluate(params, "evtiny_rating", "test", lengths)
  assert 0.0 <= rating.metrics["auc"] <= 1.0
  mpath, ppath = rating.write(tmp_path / "out")
  assert mpath.exists() and len(ppath.read_text().splitlines()) == 6
  with pytest.raises(ValueError, match="auxiliary"):
    ev.evaluate(params, "evtiny_mim", "validation", lengths)


def test_streamed_validation_loads_no_users_and_scores_as_in_memory(tmp_path, monkeypatch):
  """A training run's validation of streamed retrieval / ranking tasks reads its examples alone (the data
  loaded without users): the same metrics as the in-memory tasks' validation of the same model."""
  import recalign.tasks as rt
  from recalign.data import PreparedData, tfds_data
  from recalign.evaluator import make_validate_fn
  data = prepare(read_source(write_tiny_tsv(tmp_path / "src")), name="vs", kcore=0)
  data.save(tmp_path / "vs")
  tfds_data.save(data, tmp_path / "vs")
  train_vocabulary(data, tmp_path / "vs" / "vocab", vocab_size=300)
  model = EncoderDecoderModel(CONFIGS["tiny"].replace(vocab_size=512))
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  loads = []
  real = PreparedData._load.__func__
  monkeypatch.setattr(PreparedData, "_load", classmethod(lambda cls, *a: loads.append(a[3]) or real(cls, *a)))
  metrics = {}
  for streamed in (False, True):   # (one name: task names salt the ranking candidates' draws)
    loads.clear()
    rt.register_dataset(tmp_path / "vs", config=rt.TaskConfig(num_candidates=3, streamed=streamed), replace=True)
    for kind in ("retrieval", "ranking"):
      validate = make_validate_fn(f"vs_{kind}", {"inputs": 256, "targets": 16}, beam_size=4, batch_size=4)
      metrics[streamed, kind] = validate(model, params)
    assert loads and set(loads) == {not streamed}, loads   # (users loaded?)
  for kind in ("retrieval", "ranking"):
    assert metrics[False, kind] == metrics[True, kind] and metrics[True, kind]["examples"] == 6
  rt.unregister("vs")


def test_the_eval_job_of_streamed_tasks_loads_no_users_and_names_them(tmp_path, monkeypatch):
  """`recalign eval` (evaluate_checkpoint) of streamed retrieval / ranking tasks loads the data without
  users, names the evaluated users from the TFDS copy, and writes the in-memory evaluation's metrics and
  predictions; with the history excluded (which needs every user's items) it loads them."""
  import recalign.tasks as rt
  from recalign import evaluate as E
  from recalign.data import PreparedData, tfds_data
  from recalign.models import checkpoints as ck
  from recalign.models.network import padded_vocab_size
  data = prepare(read_source(write_tiny_tsv(tmp_path / "src")), name="ej", kcore=0)
  tfds_data.save(data, tmp_path / "ej")
  train_vocabulary(data, tmp_path / "ej" / "vocab", vocab_size=300)
  rt.register_dataset(tmp_path / "ej", config=rt.TaskConfig(num_candidates=3))
  vocab = rt.registry.task_info("ej_retrieval").vocab
  model = EncoderDecoderModel(CONFIGS["tiny"].replace(vocab_size=padded_vocab_size(vocab.vocab_size)))
  ck.save_hf(model.config, nn.unbox(model.init(jax.random.PRNGKey(0))), tmp_path / "ckpt")
  loads, passes = [], []
  real = PreparedData._load.__func__
  monkeypatch.setattr(PreparedData, "_load", classmethod(lambda cls, *a: loads.append(a[3]) or real(cls, *a)))
  read_names = tfds_data.user_names
  monkeypatch.setattr(tfds_data, "user_names", lambda *a: passes.append(1) or read_names(*a))
  out = {}
  for streamed, exclude in ((False, False), (True, False), (True, True), (True, False)):
    loads.clear()
    rt.register_dataset(tmp_path / "ej", config=rt.TaskConfig(num_candidates=3, streamed=streamed), replace=True)
    res = E.evaluate_checkpoint(tmp_path / "ckpt", ["ej_retrieval", "ej_ranking"], E.EvalSettings(
        split="test", beam_size=4, batch_size=4, exclude_history=exclude),
        output_dir=tmp_path / f"out{streamed}{exclude}", progress=False)
    assert set(loads) == {not streamed or exclude}, loads     # (users loaded?)
    out[streamed, exclude] = {k: (r.metrics, r.predictions) for k, r in res.items()}
  assert out[False, False] == out[True, False]
  assert len(passes) == 1   # the names read once: both tasks, and the job's next evaluation, ask for the same users
  names = {p["user"] for p in out[True, False]["ej_retrieval"][1]}
  assert names == set(data.users) and len(names) == 6
