"""The evaluator: a model's metrics on a task's validation / test split. What each task kind means is one
`KindSpec` in `KINDS` -- how its examples are decoded, how the decodes become metrics and predictions, which
metrics it reports, which one selects checkpoints, and its protocol: retrieval (constrained beam search over
the catalogue), ranking (beams over the candidates, and teacher-forced scoring of every candidate), rating
(AUC of P(yes)), ITDR's sub-tasks and RecLM's profiles (generated text). Adding a kind adds one entry.
Used by training (periodic validation, `make_validate_fn`) and by the eval job (`recalign.evaluate`);
it knows nothing of either.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from recalign import metrics as M
from recalign import paths
from recalign.data.prepare import PreparedData, item_id
from recalign.decoding import EOS, ItemTrie, beam_search_items, decode_texts, generate, score_items, score_targets
from recalign.models.model import EncoderDecoderModel, shift_right
from recalign.tasks import itdr

@dataclasses.dataclass
class EvalResult:
  task: str
  split: str
  metrics: dict
  predictions: list[dict]
  protocol: str = ""          # retrieval: "full catalogue" (the paper's) or "history excluded"

  def write(self, out_dir: Path | str) -> tuple[Path, Path]:
    out_dir = paths.as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The paper's protocol keeps the plain names; the other one gets its own files (not overwritten).
    tag = "_history_excluded" if self.protocol == M.protocol_name(True) else ""
    mpath = out_dir / f"metrics_{self.task}_{self.split}{tag}.json"
    ppath = out_dir / f"predictions_{self.task}_{self.split}{tag}.jsonl"
    mpath.write_text(json.dumps({"task": self.task, "split": self.split, "protocol": self.protocol,
                                 **self.metrics}, indent=2))
    ppath.write_text("".join(json.dumps(p) + "\n" for p in self.predictions))
    return mpath, ppath

def sample_example_ids(num_examples: int, max_examples: Optional[int], seed: int = 0) -> Optional[np.ndarray]:
  """A seeded random sample of `max_examples` example ids (users, for evaluation), sorted; None for all.
  A sample, not the first N: users are in file order, which is rarely random."""
  if not max_examples or max_examples >= num_examples:
    return None
  return np.sort(np.random.default_rng(seed).choice(num_examples, max_examples, replace=False))


def task_examples(task_name: str, split: str, lengths: dict, max_examples: Optional[int] = None, *,
                  example_ids: Optional[np.ndarray] = None, seed: int = 0) -> list[dict]:
  """A task's rendered examples of a split: all, `example_ids`, or a seeded sample of `max_examples`."""
  import recalign.tasks as rt
  task = rt.get(task_name)
  if example_ids is None:
    example_ids = sample_example_ids(task.num_input_examples(split), max_examples, seed)
  if example_ids is not None:   # only the sample is rendered
    task = rt.registry.example_subset(task, split, example_ids)
  ds = task.get_dataset(dict(lengths), split=split, shuffle=False, num_epochs=1)
  # by example id: streamed sources read users in their files' order
  return sorted(ds.as_numpy_iterator(), key=lambda e: int(e["example_id"]))


def pad_inputs(examples: list[dict], bucket: int = 64) -> np.ndarray:
  """Right-padded inputs; the width rounds up to a multiple of `bucket` to bound recompilations."""
  width = -(-max(len(e["inputs"]) for e in examples) // bucket) * bucket
  out = np.zeros((len(examples), width), np.int32)
  for i, e in enumerate(examples):
    out[i, :len(e["inputs"])] = e["inputs"]
  return out


def _batches(examples: list[dict], batch_size: int, desc: str, progress: bool):
  bar = tqdm(total=len(examples), desc=desc, disable=not progress, unit="user", dynamic_ncols=True)
  for s in range(0, len(examples), batch_size):
    chunk = examples[s:s + batch_size]
    if len(chunk) < batch_size:  # keep one compiled shape: pad the last batch with copies
      chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
    yield s, chunk
    bar.update(min(batch_size, len(examples) - s))
  bar.close()


class RecEvaluator:
  """Evaluates any recalign task of a prepared data set with one model: constrained beam search over
  the catalogue, teacher-forced candidate scores, P(yes) from both answers. (seqio.Evaluator runs a
  task's seqio metric_fns on a model's decodes and scores; this computes the paper's ranked metrics.)"""

  def __init__(self, model: EncoderDecoderModel, data: PreparedData, vocab, *, beam_size: int = 20,
               batch_size: int = 32, exclude_history: bool = False, progress: bool = True,
               ids: Optional[Sequence[str]] = None, mesh=None, names_from=None):
    """`exclude_history`: retrieval ranks the catalogue minus the user's history; by default the
    entire catalogue, as the paper does. `ids`: the items' IDs as the tasks write them (a task's
    `TaskInfo.ids`; default the data set's random IDs). Predictions name items by their data set ID, users
    too (`names_from`: the prepared folder whose TFDS copy names them when `data` was loaded without users)."""
    self.model, self.data, self.vocab = model, data, vocab
    self.beam_size, self.batch_size, self.exclude_history = beam_size, batch_size, exclude_history
    self.progress = progress
    self.names = [item_id(k) for k in range(data.num_items)]
    self.rendered = list(ids) if ids is not None else self.names
    self.trie = ItemTrie.for_items(vocab, self.rendered)
    # On a ('data', 'model') mesh (the trainer's): users split over 'data'; parameters placed by the
    # caller (`recalign.partitioning.place_params`); jit propagates both through decoding and its cache.
    self.mesh = mesh
    self._itdr_tables: dict[tuple, tuple] = {}   # (title tokens, eval users, seed) -> (ItemTexts, eval users)
    self._names_from, self._names = names_from, {}
    if mesh is not None and batch_size % mesh.shape["data"]:
      raise ValueError(f"batch_size={batch_size} must be divisible by the mesh's {mesh.shape['data']} data shards")

  def _put(self, x: np.ndarray):
    if self.mesh is None:
      return x
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    return jax.device_put(x, NamedSharding(self.mesh, P("data")))

  def user_name(self, user) -> str:
    """A user's data set ID in predictions (of data loaded without users: read from the TFDS copy for the
    evaluated users, `names_from`); its index when there is none (a training run's validation of streamed
    tasks, which keeps only the metrics)."""
    if "users" not in self.data.omitted:
      return self.data.users[int(user)]
    return self._names.get(int(user), str(int(user)))

  def history(self, users: np.ndarray, split: str) -> list[np.ndarray]:
    """Items not to recommend: the user's history before the held-out item (if excluded)."""
    return [self.data.held_out(int(u), split)[0] if self.exclude_history else [] for u in users]

  # The paper's kinds: decode (this process's examples -> arrays, one row per example) and finish (every
  # example's arrays -> metrics and predictions), as KINDS names them. Between them, processes gather rows.

  def decode_retrieval(self, params, examples: list[dict], split: str) -> dict[str, np.ndarray]:
    items, scores = [], []
    for s, chunk in _batches(examples, self.batch_size, f"retrieval/{split}", self.progress):
      users = np.array([e["user"] for e in chunk])
      it, sc = beam_search_items(self.model, params, self._put(pad_inputs(chunk)), self.trie,
                                 beam_size=self.beam_size, exclude=self.history(users, split))
      n = min(self.batch_size, len(examples) - s)
      items.append(it[:n])
      scores.append(sc[:n])
    return {"items": np.concatenate(items).astype(np.int32), "scores": np.concatenate(scores).astype(np.float32)}

  def finish_retrieval(self, examples: list[dict], a: dict) -> tuple[dict, list[dict]]:
    preds = [{"user": self.user_name(e["user"]), "target": self.names[int(e["target_item"])],
              "ranked": [self.names[i] for i in it if i >= 0],
              "scores": [round(float(x), 4) for x in sc if x > -1e8]}
             for e, it, sc in zip(examples, a["items"], a["scores"])]
    targets = np.array([e["target_item"] for e in examples])
    return M.ranking_metrics(a["items"], targets, ks=(5, 10)), preds

  def decode_ranking(self, params, examples: list[dict], split: str) -> dict[str, np.ndarray]:
    beams, scored = [], []
    for s, chunk in _batches(examples, self.batch_size, f"ranking/{split}", self.progress):
      cands = np.stack([e["candidates"] for e in chunk])
      enc = self._put(pad_inputs(chunk))
      items, _ = beam_search_items(self.model, params, enc, self.trie, beam_size=self.beam_size,
                                   candidates=cands)
      sc = score_items(self.model, params, enc, cands, self.trie, self.vocab, self.rendered)
      n = min(self.batch_size, len(examples) - s)
      beams.append(items[:n])
      scored.append(M.rank_by_scores(sc, cands)[:n])
    return {"beam": np.concatenate(beams).astype(np.int32), "scored": np.concatenate(scored).astype(np.int32)}

  def finish_ranking(self, examples: list[dict], a: dict) -> tuple[dict, list[dict]]:
    preds = [{"user": self.user_name(e["user"]), "target": self.names[int(e["target_item"])],
              "beam": [self.names[i] for i in it if i >= 0], "scored": [self.names[i] for i in o[:20]]}
             for e, it, o in zip(examples, a["beam"], a["scored"])]
    targets = np.array([e["target_item"] for e in examples])
    out = {f"beam/{k}": v for k, v in M.ranking_metrics(a["beam"], targets, (1, 5, 10)).items()}
    out.update({f"score/{k}": v for k, v in M.ranking_metrics(a["scored"], targets, (1, 5, 10)).items()})
    return out, preds

  def decode_rating(self, params, examples: list[dict], split: str) -> dict[str, np.ndarray]:
    answers = {a: self.vocab.encode(a) + [EOS] for a in ("yes", "no")}
    width = max(len(t) for t in answers.values())
    logp = {a: [] for a in answers}
    for s, chunk in _batches(examples, self.batch_size, f"rating/{split}", self.progress):
      enc = jnp.asarray(self._put(pad_inputs(chunk)))
      for a, toks in answers.items():
        tgt = np.zeros((len(chunk), width), np.int32)
        tgt[:, :len(toks)] = toks
        tgt = jnp.asarray(tgt)
        score = self.model.score_batch(params, {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
                                                "decoder_input_tokens": shift_right(tgt)})
        logp[a].append(np.asarray(score)[:min(self.batch_size, len(examples) - s)])
    return {a: np.concatenate(v).astype(np.float32) for a, v in logp.items()}

  def finish_rating(self, examples: list[dict], a: dict) -> tuple[dict, list[dict]]:
    p = M.p_yes(a["yes"], a["no"])
    labels = np.array([e["label"] for e in examples])
    preds = [{"user": self.user_name(e["user"]), "item": self.names[int(e["target_item"])],
              "label": int(e["label"]), "p_yes": round(float(q), 5)} for e, q in zip(examples, p)]
    return {"auc": M.auc(p, labels)}, preds

  # ITDR's tasks: greedy generation, parsed as ITDR scores it, and -- where the answer is one of a few
  # texts (TKR / CDR: each candidate as the list's first entry; NIR: each candidate; RP: each rating)
  # -- the teacher-forced score of each: the constrained, parse-free variant. Baselines beside them.

  def _choices(self, kind: str, e: dict) -> list[str]:
    if kind in ("itdr_tkr", "itdr_cdr"):
      return [f"1. {self.itdr_texts.titles[c]}" for c in e["candidates"]]
    if kind == "itdr_nir":
      return [self.itdr_texts.titles[c] for c in e["candidates"]]
    if kind == "itdr_rp":
      return [itdr.rating_text(r) for r in self.rating_values()]
    return []

  def rating_values(self) -> np.ndarray:
    return np.unique(np.concatenate([r[:-2] for r in self.data.ratings]))

  def decode_itdr(self, params, examples: list[dict], split: str, *, kind: str,
                  max_length: int) -> dict[str, np.ndarray]:
    gen, scores = [], []
    for s, chunk in _batches(examples, self.batch_size, f"{kind}/{split}", self.progress):
      enc = self._put(pad_inputs(chunk))
      n = min(self.batch_size, len(examples) - s)
      gen.append(generate(self.model, params, enc, max_length=max_length)[:n])
      choices = [[self.vocab.encode(t) for t in self._choices(kind, e)] for e in chunk]
      if choices[0]:
        scores.append(score_targets(self.model, params, enc, choices)[:n])
    out = {"generated": np.concatenate(gen).astype(np.int32)}
    if scores:
      out["scores"] = np.concatenate(scores).astype(np.float32)
    return out

  def finish_generated(self, examples: list[dict], a: dict, *, score: Callable) -> tuple[dict, list[dict]]:
    """Generated text: `score(evaluator, examples, arrays, texts, targets, predictions) -> metrics` (it may
    add to the prediction rows)."""
    texts = decode_texts(self.vocab, a["generated"])
    targets = [e["targets_pretokenized"].decode() for e in examples]
    preds = [{**self._who(e), "target": t, "generated": g} for e, t, g in zip(examples, targets, texts)]
    return score(self, examples, a, texts, targets, preds), preds

  def _who(self, e: dict) -> dict:
    """What a prediction row is about: the item (item profiles), the user, or the example."""
    if "item" in e:
      return {"item": self.data.source_item_ids[int(e["item"])]}
    return {"user": self.user_name(e["user"])} if "user" in e else {"example": int(e["example_id"])}

  def _rating_baselines(self, examples: list[dict], truth: np.ndarray) -> dict[str, float]:
    """RMSE / MAE of the global, user and item mean of the training ratings (the item's unseen: global)."""
    seqs, rates = self.data.sequences, self.data.ratings
    flat_items = np.concatenate([s[:-2] for s in seqs])
    flat_r = np.concatenate([r[:-2] for r in rates]).astype(np.float64)
    mean = flat_r.mean()
    count = np.bincount(flat_items, minlength=self.data.num_items)
    item_mean = np.where(count > 0, np.bincount(flat_items, flat_r, self.data.num_items) / np.maximum(count, 1), mean)
    guesses = {"global_mean": np.full(len(examples), mean),
               "user_mean": np.array([rates[int(e["user"])][:-2].mean() for e in examples]),
               "item_mean": np.array([item_mean[int(e["target_item"])] for e in examples])}
    return {f"{name}/{k}": v for name, g in guesses.items() for k, v in itdr.rating_errors(truth, g).items()}

  def _majority(self) -> str:
    """UAP's majority answer: the most common value of each field among the training users."""
    held = set(np.concatenate(list(self.itdr_held.values())).tolist())
    attrs = [a for u, a in enumerate(self.data.user_attributes) if u not in held and a]
    def top(values):
      v, c = np.unique(values, return_counts=True)
      return str(v[np.argmax(c)])
    return itdr.uap_target(top([itdr.age_group(a["age"]) for a in attrs]), top([a["gender"] for a in attrs]),
                           top([a["occupation"] for a in attrs]))

  def evaluate(self, params, task_name: str, split: str, lengths: dict,
               max_examples: Optional[int] = None, example_ids: Optional[np.ndarray] = None) -> EvalResult:
    """Metrics and per-user predictions on a split: all users, `example_ids`, or a seeded sample
    of `max_examples` users. With several processes and a process-local mesh, each decodes every
    n-th example (of the examples sorted by prompt length, so shares are balanced) on its own
    devices; their rows are gathered, so every process returns what one process would."""
    from recalign.tasks.registry import task_info
    info = task_info(task_name)
    if info.kind not in KINDS:
      raise ValueError(f"{task_name}: {info.kind} is an auxiliary task; evaluate retrieval, ranking, rating, an ITDR "
                       "or a profile task")
    spec = KINDS[info.kind]
    if spec.generated:
      c = info.config   # built once per setting: validation calls this every few minutes
      key = (c.itdr_max_title_tokens, c.itdr_eval_users, c.eval_seed)
      if key not in self._itdr_tables:
        self._itdr_tables[key] = (itdr.ItemTexts.of(self.data, self.vocab, c.itdr_max_title_tokens),
                                  itdr.eval_users(itdr.sequence_lengths(self.data), c.itdr_eval_users,
                                                  c.eval_seed))
      self.itdr_texts, self.itdr_held = self._itdr_tables[key]
    examples = task_examples(task_name, split, lengths, max_examples, example_ids=example_ids)
    if self._names_from is not None and "users" in self.data.omitted:
      users = np.unique(np.fromiter((e["user"] for e in examples), np.int64))
      self._names = _user_names(str(self._names_from), users.tobytes())
    if not examples:
      raise ValueError(f"{task_name} has no {split} examples that fit {dict(lengths)} (an example that does not fit "
                       "is dropped, never cut)")
    # Longest prompts first: batches of similar lengths waste little encoder work on padding.
    order = np.argsort([-len(e["inputs"]) for e in examples], kind="stable")
    import jax
    # Processes split the users only on process-local meshes (params held per process, as
    # evaluate_checkpoint places them); under the trainer's global mesh every process decodes all.
    shared = self.mesh is not None and jax.process_count() > 1 and all(
        d.process_index == jax.process_index() for d in self.mesh.devices.flat)
    mine = order[jax.process_index()::jax.process_count()] if shared else order
    arrays = gather_rows(spec.decode(self, params, [examples[i] for i in mine], split, info, lengths), mine,
                         len(examples), gather=shared)
    metrics, preds = spec.finish(self, examples, arrays)
    metrics["examples"] = len(examples)
    protocol = M.protocol_name(self.exclude_history) if info.kind == "retrieval" else spec.protocol
    return EvalResult(task_name, split, metrics, preds, protocol)


def gather_rows(local: dict[str, np.ndarray], rows: np.ndarray, total: int, *,
                gather: bool = True) -> dict[str, np.ndarray]:
  """Arrays whose row r belongs to example `rows[r]`, from every process -> arrays of all `total`
  examples in example order (one process, or `gather=False`: a reorder; several: an all-gather of
  equal-sized shares)."""
  import jax
  if gather and jax.process_count() > 1:
    from jax.experimental import multihost_utils
    width = -(-total // jax.process_count())      # shares differ by at most one row: pad to equal
    padded = {k: np.concatenate([v, np.zeros((width - len(v),) + v.shape[1:], v.dtype)]) for k, v in local.items()}
    idx = np.concatenate([rows, np.full(width - len(rows), -1)]).astype(np.int32)
    every = multihost_utils.process_allgather({"rows": idx, **padded})
    keep = every["rows"].reshape(-1) >= 0
    rows = every["rows"].reshape(-1)[keep]
    local = {k: np.asarray(every[k]).reshape((-1,) + padded[k].shape[1:])[keep] for k in padded}
  out = {}
  for k, v in local.items():
    out[k] = np.empty((total,) + v.shape[1:], v.dtype)
    out[k][rows] = v
  return out


# --------------------------------------------------------------------------------------------
# Task kinds: what evaluating each one means


@dataclasses.dataclass(frozen=True)
class KindSpec:
  """One task kind's evaluation. `decode(evaluator, params, examples, split, info, lengths)`: this process's
  examples -> arrays, one row per example (processes gather their rows between the two steps);
  `finish(evaluator, examples, arrays)` -> (metrics, prediction rows); `metrics`: what it reports (what
  ValidationConfig.selection_metric may name); `headline`: what selects the best checkpoint unless told
  otherwise; `protocol`: how its metrics files name the protocol. The seqio metric functions its tasks
  carry (`recalign.tasks.registry`) call the same metric code (`recalign.metrics`, `itdr`)."""
  decode: Callable[..., dict]
  finish: Callable[..., tuple[dict, list]]
  metrics: tuple[str, ...]
  headline: str
  protocol: str
  generated: bool = False   # greedy generation of text (ITDR, profiles): needs the item texts


def _rec(kind: str) -> dict:
  """The paper's kinds: RecEvaluator's decode_<kind> / finish_<kind>."""
  return dict(decode=lambda ev, params, examples, split, info, lengths: getattr(ev, f"decode_{kind}")(
      params, examples, split), finish=lambda ev, examples, a: getattr(ev, f"finish_{kind}")(examples, a))


def _generated(score: Callable, max_length: Optional[Callable] = None) -> dict:
  """Greedy generation scored by `score`; `max_length(task_config)`: short answers need short decodes (the
  loop runs max_length steps) -- a rating, a title, three fields."""
  def decode(ev, params, examples, split, info, lengths):
    cap = max_length(info.config) if max_length else 1 << 20
    return ev.decode_itdr(params, examples, split, kind=info.kind, max_length=min(lengths.get("targets", 64), cap))
  return dict(decode=decode, finish=lambda ev, examples, a: ev.finish_generated(examples, a, score=score),
              generated=True)


def _score_list(ev, examples, a, texts, targets, preds) -> dict:
  """TKR / CDR: the generated numbered list parsed and matched to the candidates' titles, and the
  candidates ranked by the teacher-forced score of each as the list's first entry; random beside them."""
  titles = ev.itdr_texts.titles
  gen_rank, score_rank, relevant, unknown = [], [], [], 0
  for e, g, sc in zip(examples, texts, a["scores"]):
    cands = [int(c) for c in e["candidates"]]
    named, unk = itdr.match_titles(itdr.parse_numbered(g), [titles[c] for c in cands])
    unknown += unk
    gen_rank.append(itdr.complete_ranking(named, len(cands), range(len(cands))))   # then as shown
    score_rank.append(np.argsort(-sc[:len(cands)], kind="stable").tolist())
    relevant.append({i for i, c in enumerate(cands) if c in set(e["positives"].tolist())})
  return {**{f"generated/{k}": v for k, v in itdr.list_metrics(gen_rank, relevant).items()},
          **{f"score/{k}": v for k, v in itdr.list_metrics(score_rank, relevant).items()},
          **{f"random/{k}": v for k, v in itdr.random_list_baseline(len(examples[0]["candidates"]),
                                                                   itdr.POSITIVES).items()},
          "unparsable": float(np.mean([not itdr.parse_numbered(g) for g in texts])),
          "unknown_titles_per_example": unknown / len(examples)}


def _score_nir(ev, examples, a, texts, targets, preds) -> dict:
  """NIR: the generated title matched to a candidate, and the best-scored candidate; random beside them."""
  titles = ev.itdr_texts.titles
  gen_hit, score_hit = [], []
  for e, g, sc in zip(examples, texts, a["scores"]):
    cands = [int(c) for c in e["candidates"]]
    named, _ = itdr.match_titles([g], [titles[c] for c in cands])
    gen_hit.append(bool(named) and cands[named[0]] == int(e["target_item"]))
    score_hit.append(cands[int(np.argmax(sc[:len(cands)]))] == int(e["target_item"]))
  return {"generated/hr@1": float(np.mean(gen_hit)), "score/hr@1": float(np.mean(score_hit)),
          "random/hr@1": 1.0 / len(examples[0]["candidates"])}


def _score_rp(ev, examples, a, texts, targets, preds) -> dict:
  """RP: the generated rating parsed, and the expected rating under the scores of every rating text;
  the global, user and item means beside them."""
  values = ev.rating_values()
  p = np.exp(a["scores"] - a["scores"].max(1, keepdims=True))
  expected = (p / p.sum(1, keepdims=True)) @ values
  truth = np.array([float(t) for t in targets])
  for pr, x in zip(preds, expected):
    pr["expected_rating"] = round(float(x), 4)
  return {**{f"score/{k}": v for k, v in itdr.rating_errors(truth, expected).items()},
          **{f"generated/{k}": v for k, v in itdr.seqio_rating_prediction_metrics(
              targets, texts, scale=(float(values.min()), float(values.max()))).items()},
          **ev._rating_baselines(examples, truth)}


def _score_text(ev, examples, a, texts, targets, preds) -> dict:
  return itdr.text_metrics(targets, texts)


def _score_profile(collab: bool) -> Callable:
  def score_profile(ev, examples, a, texts, targets, preds) -> dict:
    """RecLM's profiles as text (collaborative ones: the answer's accuracy too); beside them one profile for
    everyone, the commonest target (of these examples: a generous baseline)."""
    from recalign.tasks import reclm
    score = reclm.collab_metrics if collab else itdr.text_metrics
    metrics = score(targets, texts)
    common = max(set(targets), key=lambda t: (targets.count(t), t))
    metrics.update({f"constant/{k}": v for k, v in score(targets, [common] * len(targets)).items()
                    if "rouge" in k or "bleu" in k})
    return metrics
  return score_profile


def _score_uap(ev, examples, a, texts, targets, preds) -> dict:
  """UAP: each attribute's accuracy (age's RMSE), and the training users' majority answer beside it."""
  metrics = itdr.attribute_metrics(targets, texts)
  majority = itdr.attribute_metrics(targets, [ev._majority()] * len(targets))
  metrics.update({f"majority/{k}": v for k, v in majority.items() if k != "unparsable"})
  metrics["mean_accuracy"] = float(np.mean([metrics[f"{f}_accuracy"] for f in ("age_group", "gender", "occupation")]))
  return metrics


TEXT_METRICS = ("bleu1", "bleu2", "rouge1", "rouge2", "rougeL")
_RANKED = tuple(f"{m}@{k}" for k in (1, 5, 10) for m in ("hr", "ndcg"))
_LISTS = tuple(f"{how}/{m}" for how in ("generated", "score") for m in ("ndcg@10", "hr@1", "p@5"))
_ITDR = "ITDR: greedy generation parsed, and scored answers"
_PROFILE = "profile: greedy generation against the teacher's text"

KINDS: dict[str, KindSpec] = {
    "retrieval": KindSpec(**_rec("retrieval"), metrics=("hr@5", "ndcg@5", "hr@10", "ndcg@10"), headline="ndcg@10",
                          protocol=M.FULL_CATALOGUE),   # (or history excluded, as the evaluator is set)
    "ranking": KindSpec(**_rec("ranking"), metrics=tuple(f"{how}/{m}" for how in ("beam", "score") for m in _RANKED),
                        headline="score/ndcg@10", protocol="the task's candidates"),
    "rating": KindSpec(**_rec("rating"), metrics=("auc",), headline="auc", protocol="P(yes) AUC"),
    "itdr_tkr": KindSpec(**_generated(_score_list), metrics=_LISTS, headline="score/ndcg@10", protocol=_ITDR),
    "itdr_cdr": KindSpec(**_generated(_score_list), metrics=_LISTS, headline="score/ndcg@10", protocol=_ITDR),
    "itdr_nir": KindSpec(**_generated(_score_nir, lambda c: c.itdr_max_title_tokens + 8),
                         metrics=("generated/hr@1", "score/hr@1"), headline="score/hr@1", protocol=_ITDR),
    "itdr_rp": KindSpec(**_generated(_score_rp, lambda c: 8), headline="score/rmse", protocol=_ITDR,
                        metrics=tuple(f"{how}/{m}" for how in ("generated", "score") for m in ("rmse", "mae"))),
    "itdr_uap": KindSpec(**_generated(_score_uap, lambda c: 48), headline="mean_accuracy", protocol=_ITDR,
                         metrics=("mean_accuracy", "age_group_accuracy", "gender_accuracy", "occupation_accuracy",
                                  "age_rmse")),
    "itdr_ir": KindSpec(**_generated(_score_text), metrics=TEXT_METRICS, headline="rougeL", protocol=_ITDR),
    "itdr_tui": KindSpec(**_generated(_score_text), metrics=TEXT_METRICS, headline="rougeL", protocol=_ITDR),
    "profile": KindSpec(**_generated(_score_profile(False)), metrics=TEXT_METRICS, headline="rougeL",
                        protocol=_PROFILE),
    "item_profile": KindSpec(**_generated(_score_profile(False)), metrics=TEXT_METRICS, headline="rougeL",
                             protocol=_PROFILE),
    "collab_profile": KindSpec(**_generated(_score_profile(True)), headline="answer_accuracy", protocol=_PROFILE,
                               metrics=("answer_accuracy", *(f"profile_{m}" for m in TEXT_METRICS))),
}
EVALUABLE = tuple(KINDS)


def headline_metric(kind: str) -> str:
  """What selects the best checkpoint of a task kind unless told otherwise (KindSpec.headline)."""
  return KINDS[kind].headline if kind in KINDS else "ndcg@10"


def validation_metrics(kind: str) -> tuple[str, ...]:
  """The metrics the RecEvaluator reports for a task kind (what ValidationConfig.selection_metric may name)."""
  return KINDS[kind].metrics if kind in KINDS else ()


@functools.lru_cache(maxsize=8)
def _user_names(data_dir: str, users: bytes) -> dict[int, str]:
  """The names of `users` (int64 indices, as bytes) from the TFDS copy in `data_dir`, read once per process:
  an eval job asks for the same users at every checkpoint and for every task of a split (a pass over the
  copy each time: seconds per million users)."""
  from recalign.data import tfds_data
  return tfds_data.user_names(tfds_data.reader(data_dir), np.frombuffer(users, np.int64))


def needs_users(info, exclude_history: bool) -> bool:
  """Whether evaluating a task (its `TaskInfo`) loads the users: streamed retrieval / ranking tasks evaluate
  from their examples alone (the history to exclude would need them)."""
  return not (info.config.streamed and info.kind in ("retrieval", "ranking") and not exclude_history)


def make_validate_fn(task_name: str, lengths: dict, *, max_examples: Optional[int] = None,
                     beam_size: int = 20, batch_size: int = 32, exclude_history: bool = False) -> Callable:
  """For `train(validate_fn=...)`: validation-split metrics of `task_name` (retrieval: NDCG@10)."""
  from recalign.tasks.registry import task_info
  info = task_info(task_name)
  data, vocab = PreparedData.load(info.data_dir, timestamps=False, users=needs_users(info, exclude_history)), \
      info.vocab
  cache: dict = {}

  def validate(model, params) -> dict:
    if "ev" not in cache:
      cache["ev"] = RecEvaluator(model, data, vocab, beam_size=beam_size, batch_size=batch_size, progress=False,
                              ids=info.ids, exclude_history=exclude_history)
    return cache["ev"].evaluate(params, task_name, "validation", lengths, max_examples).metrics

  return validate
