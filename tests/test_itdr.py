"""ITDR's instruction tasks: exact text, splits without held-out items, dynamic sampling, parsing, metrics."""

from pathlib import Path

import numpy as np
import pytest

import recalign.tasks as rt
from recalign.tasks import itdr

LENGTHS = {"inputs": 1024, "targets": 256}
RP_DESC = itdr.DESCRIPTIONS["rp"]


def _raw(users=12, items=30, length=14, seed=0, prefix="u", item_prefix="i"):
  from recalign.data import AMAZON
  from recalign.data.ingest import Interaction, ItemMeta, RawData
  from recalign.data.report import IngestReport
  rng = np.random.default_rng(seed)
  seqs = {f"{prefix}{u:02d}": [Interaction(f"{item_prefix}{int(x):02d}", float(t), float(1 + (u + t) % 5))
                               for t, x in enumerate(rng.choice(items, length, replace=False))] for u in range(users)}
  meta = {f"{item_prefix}{k:02d}": ItemMeta(title=f"Title {item_prefix}{k:02d}", categories=(f"Beauty > Cat{k % 3}",))
          for k in range(items)}
  attrs = {f"{prefix}{u:02d}": {"age": str(16 + 4 * u), "gender": "MF"[u % 2],
                                "occupation": ["student", "engineer", "artist"][u % 3], "zip_code": "00000"}
           for u in range(users)}
  return RawData(seqs, meta, AMAZON, "synthetic", [], IngestReport(), True, attrs)


def _prepare(root: Path, name: str, **kw) -> Path:
  from recalign.data import prepare
  from recalign.data.vocab import train_vocabulary
  data = prepare(_raw(**kw), name=name, kcore=0)
  data.save(root / name)
  train_vocabulary(data, root / name / "vocab", vocab_size=300)
  return root / name


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
  from recalign.data import PreparedData
  path = _prepare(tmp_path_factory.mktemp("itdr"), "shop")
  names = rt.register_dataset(path, config=rt.TaskConfig(itdr=True, itdr_eval_users=2))
  return PreparedData.load(path), names


def _examples(task, split, epoch_limit=None, **kw):
  ds = rt.get(task).get_dataset(LENGTHS, split=split, shuffle=False, num_epochs=1, **kw)
  return list(ds.as_numpy_iterator())


def _title(data, k):
  return data.items[int(k)].title


def test_registers_tasks_and_mixtures(shop):
  _, names = shop
  assert {"shop_itdr_rp", "shop_itdr_tkr", "shop_itdr_nir", "shop_itdr_uap", "shop_itdr",
          "shop_ut_at_itdr"} <= set(names)
  assert sorted(t.name for t in rt.get("shop_itdr").tasks) == ["shop_itdr_nir", "shop_itdr_rp", "shop_itdr_tkr",
                                                               "shop_itdr_uap"]
  assert {"shop_retrieval", "shop_mim", "shop_itdr_tkr"} <= {t.name for t in rt.get("shop_ut_at_itdr").tasks}


def test_rp_text_is_itdr_word_for_word(shop):
  data, _ = shop
  ex = _examples("shop_itdr_rp", "test")[0]
  u = int(ex["user"])
  seq, r = data.sequences[u], data.ratings[u]
  rated = ", ".join(f"Title {data.source_item_ids[seq[k]]} ({int(r[k])})" for k in range(len(seq) - 11, len(seq) - 1))
  assert ex["inputs_pretokenized"].decode() == (
      f"{RP_DESC} A user has purchased and rated the following products with ratings: {rated}. "
      f"Predict his rating for Title {data.source_item_ids[seq[-1]]}.")
  assert ex["targets_pretokenized"].decode() == str(int(r[-1]))
  assert list(ex["targets"]) == data_vocab(data).encode(str(int(r[-1]))) + [1]


def data_vocab(data):
  return rt.registry.task_info(f"{data.name}_itdr_rp").vocab


def test_tkr_text_candidates_and_target(shop):
  data, _ = shop
  for ex in _examples("shop_itdr_tkr", "test"):
    u = int(ex["user"])
    seq = data.sequences[u]
    hist, pos = seq[-10:-5], seq[-5:]
    text = ex["inputs_pretokenized"].decode()
    numbered_hist = " ".join(f"{i}. {_title(data, k)}" for i, k in enumerate(hist, 1))
    assert text.startswith(itdr.DESCRIPTIONS["tkr"] + " Given a user's product purchase records in chronological "
                           f"order as follows: {numbered_hist} Based on the purchase history, please rank the products "
                           "in the candidate list by the likelihood of the user purchasing them next from highest to "
                           "lowest. Candidate list: 1. ")
    cands = ex["candidates"]
    assert text.endswith(" ".join(f"{i}. {_title(data, k)}" for i, k in enumerate(cands, 1)))
    assert sorted(set(cands) & set(pos)) == sorted(pos) and len(set(cands)) == 10
    negatives = [c for c in cands if c not in set(pos)]
    assert not set(negatives) & set(seq)           # negatives: never the user's items
    target = itdr.parse_numbered(ex["targets_pretokenized"].decode())
    assert target[:5] == [_title(data, k) for k in pos]   # positives first, in time order
    assert sorted(target[5:]) == sorted(_title(data, k) for k in negatives)


def test_nir_and_uap_text(shop):
  data, _ = shop
  ex = _examples("shop_itdr_nir", "validation")[0]
  u = int(ex["user"])
  seq = data.sequences[u]
  hist = ", ".join(f"'{i}.{_title(data, k)}:{data.items[k].categories[0].split(' > ')[-1]}'"
                   for i, k in enumerate(seq[-7:-2], 1))
  text = ex["inputs_pretokenized"].decode()
  assert text.startswith(f"{itdr.DESCRIPTIONS['nir']} Given that a shopping user has purchased the following products "
                         f"in chronological order: [{hist}], please select the next product the user is most likely "
                         "to purchase from the candidate list: ['")
  assert ex["targets_pretokenized"].decode() == _title(data, seq[-2]) and seq[-2] in ex["candidates"]
  assert len(ex["candidates"]) == 5

  uap = _examples("shop_itdr_uap", "test")
  held = itdr.eval_users(itdr.sequence_lengths(data), 2, 0)
  assert sorted(int(e["user"]) for e in uap) == sorted(held["test"].tolist())
  e = uap[0]
  u = int(e["user"])
  a = data.user_attributes[u]
  train = data.sequences[u][:-5]
  liked = [k for k, r in zip(train, data.ratings[u][:-5]) if r > 3][-10:]
  liked_text = ", ".join(f"{_title(data, k)}: {data.items[k].categories[0].split(' > ')[-1]}" for k in liked)
  assert e["inputs_pretokenized"].decode() == (
      f"{itdr.DESCRIPTIONS['uap']} The user's product preferences are as follows: "
      f"He/She likes purchasing {liked_text}. "
      "Based on the user's product preferences, predict his/her age group, gender, and occupation.")
  assert e["targets_pretokenized"].decode() == (
      f"age group:{itdr.age_group(a['age'])},gender:{a['gender']},occupation:{a['occupation']}.")


def test_title_and_negative_tables_are_captured_not_copied_into_map_graphs(tmp_path):
  from conftest import large_graph_constants
  from recalign.data import PreparedData
  path = _prepare(tmp_path, "wide", users=40, items=400)   # over 128 items: TF copies smaller captures by value
  rt.register_dataset(path, config=rt.TaskConfig(itdr=True, itdr_eval_users=2))
  data = PreparedData.load(path)
  assert data.num_items > 128
  for kind in ("rp", "tkr", "nir", "uap"):
    ds = rt.get(f"wide_itdr_{kind}").get_dataset(LENGTHS, split="train", shuffle=False)
    assert large_graph_constants(ds, data.num_items) == [], kind
    assert len(list(ds.take(2).as_numpy_iterator())) == 2


def test_age_groups():
  assert [itdr.age_group(a) for a in (7, 17, 18, 24, 25, 34, 44, 49, 50, 55, 56, 73)] == [
      "Under 18", "Under 18", "18-24", "18-24", "25-34", "25-34", "35-44", "45-49", "50-55", "50-55", "56+", "56+"]


def test_no_held_out_item_in_any_training_sample(shop):
  data, _ = shop
  held = itdr.eval_users(itdr.sequence_lengths(data), 2, 0)
  held_users = set(np.concatenate(list(held.values())).tolist())
  assert held["test"].size == 2 and not set(held["test"]) & set(held["validation"])
  # Items training may not use: every user's validation and test items; the held-out users' last 5.
  banned = {(u, int(k)) for u, s in enumerate(data.sequences) for k in s[-(5 if u in held_users else 2):]}
  for task in ("shop_itdr_rp", "shop_itdr_tkr", "shop_itdr_nir", "shop_retrieval", "shop_mim", "shop_bpr"):
    src = rt.get(task).source.get_dataset("train", shuffle=False).take(rt.get(task).num_input_examples("train"))
    for ex in src.as_numpy_iterator():
      u = int(ex["user"])
      shown = list(ex["history"]) + [int(ex[k]) for k in ("target",) if k in ex] + list(ex.get("positives", []))
      assert not {(u, int(k)) for k in shown} & banned, (task, u, shown)
  uap_train = {int(u) for u in rt.get("shop_itdr_uap").source.get_dataset("train", shuffle=False)
               .take(100).map(lambda x: x["user"]).as_numpy_iterator()}
  assert uap_train and not uap_train & held_users


def test_negatives_and_order_redrawn_every_epoch_reproducibly(shop):
  task = rt.get("shop_itdr_tkr")
  n = task.num_input_examples("train")

  def epochs(seed):
    ds = task.get_dataset(LENGTHS, split="train", shuffle=False, seed=seed).take(2 * n)
    out = {}
    for ex in ds.as_numpy_iterator():
      out[(int(ex["epoch"]), int(ex["example_id"]))] = tuple(ex["candidates"])
    return out

  a, b = epochs(1), epochs(1)
  assert a == b
  changed = sum(a[(0, i)] != a[(1, i)] for i in range(n))
  assert changed >= n // 2
  assert epochs(2) != a


def test_parsing_generated_lists():
  cands = ["Rose Oil", "Lip Balm", "Nail Polish 2. Gel", "Soap"]
  assert itdr.parse_numbered("1. Soap 2. Rose Oil 3. Lip Balm") == ["Soap", "Rose Oil", "Lip Balm"]
  # reordered, fuzzy ("Rose Oill"), duplicated (ignored), unknown (counted)
  named, unknown = itdr.match_titles(["soap", "Rose Oill", "Soap", "Hair Gel"], cands)
  assert named == [3, 0] and unknown == 1
  assert itdr.complete_ranking(named, 4, [0, 1, 2, 3]) == [3, 0, 1, 2]
  assert itdr.parse_numbered("no list here") == []
  assert itdr.parse_rating("4") == 4.0 and itdr.parse_rating("3.5.") == 3.5 and itdr.parse_rating("4 stars") is None
  assert itdr.parse_attributes("age group:25-34,gender:M,occupation:doctor/health care.") == {
      "age group": "25-34", "gender": "M", "occupation": "doctor/health care"}


def test_list_metrics_hand_computed():
  # 4 candidates, relevant {0, 2}; ranking [1, 0, 3, 2]: DCG = 1/log2(3) + 1/log2(5) = .63093 + .43068;
  # IDCG = 1 + .63093 -> NDCG .65092; HR@1 0; P@5 = 2/5.
  m = itdr.list_metrics([[1, 0, 3, 2]], [{0, 2}])
  assert m["ndcg@10"] == pytest.approx(0.65092, abs=1e-4) and m["hr@1"] == 0 and m["p@5"] == pytest.approx(0.4)
  # random order of 10 with 5 relevant: ITDR's .77 / .50 / .50
  r = itdr.random_list_baseline(10, 5)
  assert r["ndcg@10"] == pytest.approx(0.7705, abs=1e-4) and r["hr@1"] == 0.5 and r["p@5"] == 0.5
  target = "1. A 2. B 3. C 4. D 5. E 6. F 7. G 8. H 9. I 10. J"
  assert itdr.seqio_list_metrics([target], [target])["ndcg@10"] == pytest.approx(1.0)
  worst = "1. F 2. G 3. H 4. I 5. J 6. A 7. B 8. C 9. D 10. E"
  m = itdr.seqio_list_metrics([target], [worst])
  assert m["hr@1"] == 0 and m["p@5"] == 0 and m["unparsable"] == 0


def test_rating_and_attribute_metrics_hand_computed():
  m = itdr.seqio_rating_prediction_metrics(["4", "2", "5"], ["5", "2", "oops"])
  # unparsable -> the middle of the targets' range (3.5): errors 1, 0, 1.5
  assert m["rmse"] == pytest.approx(np.sqrt((1 + 0 + 2.25) / 3)) and m["mae"] == pytest.approx(2.5 / 3)
  assert m["unparsable"] == pytest.approx(1 / 3)
  # a number off the rating scale is no rating: "222222" counts as the scale's middle (3)
  m = itdr.seqio_rating_prediction_metrics(["4", "2"], ["222222", "2"], scale=(1, 5))
  assert m["rmse"] == pytest.approx(np.sqrt(1 / 2)) and m["unparsable"] == 0.5
  t = ["age group:25-34,gender:M,occupation:doctor.", "age group:56+,gender:F,occupation:writer."]
  p = ["age group:25-34,gender:F,occupation:doctor.", "gender:F"]
  m = itdr.attribute_metrics(t, p)
  assert m["age_group_accuracy"] == 0.5 and m["gender_accuracy"] == 0.5 and m["occupation_accuracy"] == 0.5
  # age: 29.5 vs 29.5, and 60 vs the mean midpoint (37.857...)
  mean_mid = np.mean([15, 21, 29.5, 39.5, 47, 52.5, 60])
  assert m["age_rmse"] == pytest.approx(np.sqrt((60 - mean_mid) ** 2 / 2))


def test_cross_domain_task(tmp_path):
  from recalign.data import PreparedData
  src = _prepare(tmp_path, "beautysrc", seed=1)
  tgt = _prepare(tmp_path, "fashion", seed=2, item_prefix="f")
  task, = rt.register_cross_domain(src, tgt, config=rt.TaskConfig(itdr_eval_users=2))
  assert task == "beautysrc_to_fashion_itdr_cdr"
  s, t = PreparedData.load(src), PreparedData.load(tgt)
  ex = _examples(task, "test")[0]
  u = int(ex["user"])
  su = s.users.index(t.users[u])
  source = " ".join(f"{i}. {_title(s, k)}" for i, k in enumerate(s.sequences[su][:-2][-5:], 1))
  hist = " ".join(f"{i}. {_title(t, k)}" for i, k in enumerate(t.sequences[u][-10:-5], 1))
  assert ex["inputs_pretokenized"].decode().startswith(
      f"{itdr.DESCRIPTIONS['cdr']} A user's purchase history in the beautysrc domain is as follows: {source} and in "
      f"the fashion domain is as follows: {hist} Based on this information, please rank the following list of "
      "products in the fashion domain in order of the likelihood that the user will purchase them next, from "
      "highest to lowest. Product list: 1. ")
  held = itdr.eval_users(itdr.sequence_lengths(t), 2, 0)
  held_users = set(np.concatenate(list(held.values())).tolist())
  for e in rt.get(task).source.get_dataset("train", shuffle=False).take(rt.get(task).num_input_examples("train")) \
      .as_numpy_iterator():
    if int(e["user"]) in held_users:
      assert not set(e["positives"]) & set(t.sequences[int(e["user"])][-5:])


def test_evaluator_reports_itdr_metrics_beside_baselines(shop):
  import jax
  from recalign.evaluator import RecEvaluator
  from recalign.models.model import EncoderDecoderModel
  from recalign.models.network import named_config, padded_vocab_size
  data, _ = shop
  info = rt.registry.task_info("shop_itdr_tkr")
  model = EncoderDecoderModel(named_config("tiny").replace(vocab_size=padded_vocab_size(info.vocab.vocab_size)))
  params = model.init(jax.random.PRNGKey(0))
  ev = RecEvaluator(model, data, info.vocab, ids=info.ids, batch_size=4, progress=False)
  lengths = {"inputs": 1024, "targets": 48}
  tkr = ev.evaluate(params, "shop_itdr_tkr", "test", {"inputs": 1024, "targets": 160}).metrics
  assert tkr["examples"] == 2 and tkr["random/ndcg@10"] == pytest.approx(0.7705, abs=1e-4)
  assert 0 <= tkr["score/ndcg@10"] <= 1 and 0 <= tkr["unparsable"] <= 1
  rp = ev.evaluate(params, "shop_itdr_rp", "test", lengths, max_examples=4).metrics
  assert {"score/rmse", "generated/rmse", "global_mean/rmse", "user_mean/rmse", "item_mean/rmse"} <= set(rp)
  assert 1 <= rp["score/mae"] + 1 and rp["score/rmse"] <= 4    # expected rating within 1..5
  nir = ev.evaluate(params, "shop_itdr_nir", "test", lengths, max_examples=4).metrics
  assert nir["random/hr@1"] == pytest.approx(0.2) and nir["score/hr@1"] in (0, .25, .5, .75, 1)
  uap = ev.evaluate(params, "shop_itdr_uap", "test", lengths).metrics
  assert {"majority/gender_accuracy", "mean_accuracy", "age_rmse"} <= set(uap)


def test_keep_best_lower_is_better_for_errors(tmp_path):
  from recalign.trainer import KeepBest
  kb = KeepBest(tmp_path, "score/rmse", True)
  params = {"w": np.zeros(2, np.float32)}
  assert kb(1, {"score/rmse": 1.2}, params)
  assert not kb(2, {"score/rmse": 1.3}, params)
  assert kb(3, {"score/rmse": 1.0}, params)


def test_text_metrics_hand_computed():
  # ref "the cat sat on the mat" (6), hyp "the cat on the mat" (5): unigram matches 5/5, bigrams
  # (the cat, on the, the mat) 3/4; brevity penalty exp(1 - 6/5); ROUGE-1 F1 2*5/11, ROUGE-2 2*3/9, LCS 5.
  m = itdr.text_metrics(["the cat sat on the mat"], ["The cat on the mat"])
  bp = np.exp(1 - 6 / 5)
  assert m["bleu1"] == pytest.approx(bp * 1.0) and m["bleu2"] == pytest.approx(bp * np.sqrt(1.0 * 3 / 4))
  assert m["rouge1"] == pytest.approx(10 / 11) and m["rouge2"] == pytest.approx(6 / 9)
  assert m["rougeL"] == pytest.approx(10 / 11)


def test_reference_tasks_from_user_records(shop, tmp_path):
  import json
  data, _ = shop
  rows = [{"split": "train", "liked": [["Dune", "loved the world"]], "disliked": [["Emma", "slow"]],
           "reference": "Epic science fiction."},
          {"split": "test", "liked": [["Ubik", "mind-bending"]], "disliked": [], "reference": "Philip K. Dick."}]
  path = tmp_path / "ir.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  task = rt.register_reference_task(path, "ir", data_dir=Path(rt.registry.task_info("shop_itdr_tkr").data_dir),
                                    noun="book", focus="reading interests")
  ex = _examples(task, "test")[0]
  assert ex["inputs_pretokenized"].decode() == (
      f"{itdr.DESCRIPTIONS['ir']} A user has given the following book reviews:\nLiked books:\nUbik: mind-bending\n"
      "Disliked books:\nBased on these reviews, briefly summarize the user's reading interests.")
  assert ex["targets_pretokenized"].decode() == "Philip K. Dick."
  path.write_text(json.dumps({"split": "train", "liked": []}) + "\n")
  with pytest.raises(Exception, match=r"ir.jsonl:1 \[reference\]"):
    rt.register_reference_task(path, "ir", data_dir=Path(rt.registry.task_info("shop_itdr_tkr").data_dir), noun="book")
