"""Registers a prepared data set's seqio tasks and the paper's mixtures.

    import recalign.tasks as rt
    rt.register_dataset("data/beauty")              # beauty_retrieval, beauty_mim, ..., beauty_reat
    ds = rt.get("beauty_reat").get_dataset({"inputs": 512, "targets": 64}, split="train")

Tasks: `<name>_{retrieval,ranking,mim,mlm,bpr,item_qa}` (+ `_rating` with ratings).
Mixtures: `<name>_reat` (retrieval+MIM+MLM), `_raat` (ranking+MIM+MLM+BPR), `_rpat`
(rating+MIM+MLM), `_ut` (retrieval+ranking[+rating]), `_ut_at` (UT+MIM+MLM); rates default to
the number of examples per task (seqio.mixing_rate_num_examples).
With `TaskConfig(itdr=True)` also ITDR's instruction tasks (`recalign.tasks.itdr`):
`<name>_itdr_{rp,tkr,nir,uap}` (those the data supports), mixtures `<name>_itdr` and `<name>_ut_at_itdr`;
`register_cross_domain(SOURCE, TARGET)` adds `<source>_to_<target>_itdr_cdr`.
"""

from __future__ import annotations

import array
import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from recalign import metrics as M
from recalign.data import tfds_data
from recalign.data.prepare import PreparedData, Ragged, item_id
from recalign.data.report import DataError
from recalign.data.ids import id_pieces, load_ids
from recalign.data.vocab import describe, extend, load_vocabulary, same_vocabulary
from recalign.tasks import itdr
from recalign.tasks import preprocessors as pp
from recalign.tasks import sources
from recalign.tasks import templates as tpl

REC_TASKS = ("retrieval", "ranking", "rating")
AUX_TASKS = ("mim", "mlm", "bpr", "item_qa")
MIXTURES = {
    "reat": ("retrieval", "mim", "mlm"),
    "raat": ("ranking", "mim", "mlm", "bpr"),
    "rpat": ("rating", "mim", "mlm"),
    "ut": ("retrieval", "ranking", "rating"),
    "ut_at": ("retrieval", "ranking", "rating", "mim", "mlm"),
    "re_mlm": ("retrieval", "mlm"),      # the paper's ablation step between retrieval and ReAT
}

_REGISTERED: dict[str, list[str]] = {}  # data set name -> its registered tasks and mixtures
_SOURCES: dict[str, dict] = {}          # data set name -> what it was registered from (register_dataset)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """How `register_dataset` builds a prepared data set's tasks (windows, candidates, masks, IDs, prompt
  form, seeds). Not T5X's DatasetConfig (mixture, lengths, split, batch): that is the trainer's."""
  window: int = 20                      # w: items per window (history w-1 + target)
  train_examples: str = "windows"       # windows (the paper's sliding windows) or prefixes (every
                                        # training item a target, as TIGER / P5)
  next_items: int = 1                   # retrieval training targets per example: > 1 trains on
                                        # continuations -- after a split point re-drawn every epoch, the
                                        # next `next_items` items in order (several targets for one
                                        # encoding); evaluation still asks for one item
  num_candidates: int = 100             # ranking: target + 99 popularity-sampled negatives
  mask_rate: float = 0.2                # MIM
  noise_density: float = 0.2            # MLM span corruption
  mean_noise_span_length: float = 3.0
  with_titles: Optional[bool] = None    # None: titles when the data set has them
  item_prefix: bool = True              # "Item ID: I12, Title: ..." (the paper's); False: "I12, Title: ..."
  prompt_words: bool = True             # False: retrieval prompts are the history alone ("I12; I7;"),
                                        # without the template's words (shorter inputs; not the paper's)
  seed: int = 0                         # training draws when get_dataset is given no seed (the
                                        # trainer passes RANDOM_SEED): masks, negatives, spans, order
  eval_seed: int = 0                    # validation/test draws (ranking candidates): fixed, so that
                                        # every run is evaluated on the same candidates
  id_scheme: str = "random"             # item IDs: random (the paper's), collaborative, semantic
                                        # (`recalign ids DATA --scheme ...` builds them)
  itdr: bool = False                    # also ITDR's instruction tasks (and hold out their evaluation
                                        # users' last 5 items from every task's training samples)
  itdr_eval_users: int = 200            # TKR / UAP validation and test users, each (ITDR's test sets: ~200)
  itdr_negatives: str = "popularity"    # TKR / NIR / CDR negatives: popularity-sampled or uniform
  itdr_max_title_tokens: int = 24       # titles are cut to this many tokens in ITDR prompts
  itdr_liked_items: int = 10            # UAP: the most recent liked items shown
  reclm: bool = False                   # also RecLM's profile tasks (<name>_profile, _collab_profile,
                                        # _item_profile; mixture <name>_reclm) with silver teacher profiles
  streamed: bool = False                # the recommendation and auxiliary tasks' examples made as users are
                                        # read from the prepared TFDS copy, not held in memory: the same
                                        # examples and draws, trained in a buffered-shuffle order


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What recalign keeps about a task it registered (evaluation rebuilds prompts and tries from it)."""
  kind: str                 # retrieval, ranking, rating, mim, mlm, bpr, item_qa, itdr_{rp,tkr,nir,uap,cdr}
  data_dir: str
  vocab: object             # the seqio vocabulary of inputs and targets
  ids: tuple[str, ...]      # item k's ID as written in prompts and targets
  config: TaskConfig


_TASKS: dict[str, TaskInfo] = {}


class _InMemorySource(seqio.DataSource):
  """A seqio source over in-memory examples; any number of hosts can shard it."""

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def _check_split(self, split: str):
    if split not in self.splits:
      raise ValueError(f"split {split!r} not available; this task has {sorted(self.splits)}")

  @staticmethod
  def _shard(ds: tf.data.Dataset, shard_info: Optional[seqio.ShardInfo]) -> tf.data.Dataset:
    if shard_info and shard_info.num_shards > 1:  # multi-host: every process its own slice
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    return ds


class RecDataSource(_InMemorySource):
  """`sources.Examples` (in memory) or `sources.StreamedExamples` (made as the users are read from the
  prepared data set's TFDS copy) per split; train is an endless, epoch-tagged stream.

  Every element carries a `sample_seed` for the preprocessors' stateless draws: for `train` the
  seed `get_dataset` is given (the run's RANDOM_SEED; `seed` if none), for validation and test the
  fixed `eval_seed`; the split is folded in, so no evaluation draw repeats a training draw. `salt`
  (the task's) makes the tasks of a mixture shuffle independently. Hosts shard in-memory examples
  one in n, streamed ones by users (a slice of the TFDS split each, `tfds.even_splits`).
  """

  def __init__(self, examples: Mapping[str, sources.Examples | sources.StreamedExamples], *, seed: int,
               eval_seed: int, salt: int, users=None):
    self._examples, self._seed, self._eval_seed, self._salt = dict(examples), seed, eval_seed, salt
    self._users = users   # the TFDS builder streamed examples read (tfds_data.reader)
    super().__init__(splits=list(examples),
                     num_input_examples={k: len(v) for k, v in examples.items()})

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, **_) -> tf.data.Dataset:
    self._check_split(split)
    run_seed = self._seed if seed is None else seed
    draw_seed = sources.mix_seed(run_seed if split == "train" else self._eval_seed, pp.salt(split))
    ex = self._examples[split]
    if isinstance(ex, sources.StreamedExamples):
      part = tfds_data.SPLIT
      if shard_info and shard_info.num_shards > 1:
        part = tfds.even_splits(part, shard_info.num_shards)[shard_info.index]
      users = tfds_data.user_records(self._users, part)
      return sources.stream_to_dataset(users, ex.make, split=split, shuffle=shuffle, seed=draw_seed, salt=self._salt)
    ds = sources.to_dataset(ex, split=split, shuffle=shuffle, seed=draw_seed, salt=self._salt)
    return self._shard(ds, shard_info)


class _ExampleSubset(_InMemorySource):
  """One split of a source, only the examples whose `example_id` is kept (before any preprocessing);
  not sharded (an evaluation's sample)."""

  def __init__(self, source: seqio.DataSource, split: str, keep: np.ndarray):
    self._source, self._keep = source, keep
    super().__init__(splits=[split], num_input_examples={split: int(keep.sum())}, caching_permitted=False)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def get_dataset(self, split: str, shuffle: bool = True, seed: Optional[int] = None, shard_info=None,
                  **_) -> tf.data.Dataset:
    with tf.init_scope():   # captured by the filter, not copied into its graph
      keep = tf.constant(self._keep)
    ds = self._source.get_dataset(split=split, shuffle=False, seed=seed)
    return ds.filter(lambda x: tf.gather(keep, x["example_id"]))


def example_subset(task: seqio.Task, split: str, example_ids: np.ndarray) -> seqio.Task:
  """`task` (unregistered view) whose `split` holds only the examples `example_ids`: the others are dropped
  at the source, so an evaluation on a sample renders the sample, not the whole split (at 10M interactions:
  50 s and +0.6 GiB to validate 64 of 66k users that way, rendering them all before filtering)."""
  keep = np.zeros(task.num_input_examples(split), bool)
  keep[np.asarray(example_ids, np.int64)] = True
  return seqio.Task(f"{task.name}_subset", _ExampleSubset(task.source, split, keep), task.output_features,
                    task.preprocessors, metric_fns=task.metric_fns, shuffle_buffer_size=None)


class ItemQASource(_InMemorySource):
  """Static item QA pairs ("What's the title of I12?" -> title, title -> ID), tokenised with the
  IDs' own tokens (flat token tables: a few bytes a token, not a Python list per question); train only."""

  def __init__(self, inputs: pp.TokenTable, targets: pp.TokenTable, salt: int):
    self._inputs, self._targets, self._salt = inputs, targets, salt
    super().__init__(splits=["train"], num_input_examples={"train": len(inputs.lengths)})

  def lengths(self) -> tuple[np.ndarray, np.ndarray]:
    return self._inputs.lengths, self._targets.lengths

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, **_) -> tf.data.Dataset:
    self._check_split(split)
    (inputs, inputs_text), (targets, targets_text) = self._inputs.tf(), self._targets.tf()
    ds = tf.data.Dataset.from_tensor_slices({"inputs": inputs, "inputs_pretokenized": inputs_text,
                                             "targets": targets, "targets_pretokenized": targets_text})
    ds = self._shard(ds, shard_info)
    if shuffle:
      n = len(self._inputs.lengths)
      ds = ds.shuffle(n, seed=sources.mix_seed(seed or 0, self._salt) % (1 << 40))
    return ds


def item_qa_pairs(data: PreparedData, tables: pp.ItemTables) -> tuple[pp.TokenTable, pp.TokenTable]:
  """(inputs, targets) of every question, as token tables; IDs keep their own tokens."""
  enc, cont = tables.vocab.encode, tables.continuation
  q_text, a_text = [], []
  q_tok, q_len, a_tok, a_len = array.array("i"), array.array("q"), array.array("i"), array.array("q")

  def add(question: str, question_tokens: list[int], answer: str, answer_tokens: list[int]) -> None:
    q_text.append(question)
    q_tok.extend(question_tokens)
    q_len.append(len(question_tokens))
    a_text.append(answer)
    a_tok.extend(answer_tokens)
    a_len.append(len(answer_tokens))

  for k, m in enumerate(data.items):
    iid, id_tok = tables.ids[k], tables.id_tokens[k]
    values = {"title": m.title, "brand": m.brand, "price": m.price, "categories": " | ".join(m.categories)}
    for attr, question in tpl.Templates.QA.items():
      if values[attr]:
        before, after = question.split("{id}")
        add(question.format(id=iid), enc(before.rstrip()) + id_tok + cont(after), values[attr], enc(values[attr]))
    if m.title:
      q = tpl.Templates.QA_ID.format(title=m.title)
      add(q, enc(q), iid, list(id_tok))
  return (pp.TokenTable(q_text, flat=(np.array(q_tok, np.int32), np.array(q_len, np.int64))),
          pp.TokenTable(a_text, flat=(np.array(a_tok, np.int32), np.array(a_len, np.int64))))


def _output_features(vocab) -> dict[str, seqio.Feature]:
  return {"inputs": seqio.Feature(vocab, add_eos=True), "targets": seqio.Feature(vocab, add_eos=True)}


def _register_task(name: str, source, preprocessors, vocab, metric_fns=()):
  _remove(name)
  seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                         output_features=_output_features(vocab), metric_fns=list(metric_fns))


def _remove(name: str) -> None:
  for registry in (seqio.MixtureRegistry, seqio.TaskRegistry):
    if name in registry.names():
      registry.remove(name)
  _TASKS.pop(name, None)


def _register_mixture(name: str, members: Sequence[str]) -> None:
  _remove(name)
  seqio.MixtureRegistry.add(name, list(members), default_rate=seqio.mixing_rate_num_examples)


# seqio metric functions (recalign's evaluator computes the same numbers with constrained decoding).
_METRICS = {"retrieval": [M.seqio_retrieval_metrics], "ranking": [M.seqio_retrieval_metrics],
            "rating": [M.seqio_rating_metrics]}


def task_info(name: str) -> TaskInfo:
  if name not in _TASKS:
    get(name)  # raises the helpful error
    raise ValueError(f"{name!r} is a mixture, not a task")
  return _TASKS[name]


def register_dataset(data_dir: str | Path, *, name: Optional[str] = None, vocab=None,
                     config: TaskConfig = TaskConfig(), replace: bool = False) -> list[str]:
  """Registers every task and mixture of a prepared data set; returns their names.

  `vocab`: a seqio vocabulary, or None for the data set's own `vocab/spm.model`.
  As seqio's registries: registering a name again from the same folder (unchanged on disk), vocabulary
  and `config` returns the names already registered; anything else is an error unless `replace=True`,
  which replaces everything the name had.
  """
  if config.reclm and config.itdr:   # the profile tasks read every item before the validation item
    raise ValueError("TaskConfig: reclm=True and itdr=True cannot be combined (the profile tasks would show "
                     "ITDR's held-out items); register them in separate runs")
  manifest = Path(data_dir) / "manifest.json"   # (a folder without one: PreparedData.load below says so)
  listed = json.loads(manifest.read_text()) if manifest.exists() else {}
  name = name or listed.get("name")
  # decided before the data are loaded: registering the same again costs nothing
  origin = _origin(data_dir, vocab, config) if name in _SOURCES else None
  if origin is not None and _registered_alike(name, origin, replace):
    return list(_REGISTERED[name])
  unregister(name)   # replacing removes everything the name had
  data, lean, users, index, held, train_lengths = _users(data_dir, listed, config)
  origin = origin or _origin(data_dir, vocab, config)
  vocab = origin["vocab"]
  ids = load_ids(data_dir, config.id_scheme, data.num_items)
  # Code IDs need their pieces: the project's vocabulary has them (`recalign vocab`), another one
  # (a pretrained T5's) gets them appended as new ids after its own.
  vocab = extend(vocab, id_pieces(ids))
  with_titles = data.has_titles if config.with_titles is None else config.with_titles
  tables = pp.ItemTables(data, vocab, with_titles=with_titles, ids=ids, item_prefix=config.item_prefix)
  info = functools.partial(TaskInfo, data_dir=str(Path(data_dir).resolve()), vocab=vocab, ids=tuple(ids),
                           config=config)
  templates = tpl.Templates(data.domain)

  examples, retrieval_train = _examples(data, index, config, train_lengths)
  log_pop, user_items, longest = _sampling_tables(data, train_lengths, index if lean else None)
  num_candidates = _num_candidates(name, data.num_items, config, longest)
  kinds = ["retrieval", "ranking", "mim", "mlm", "bpr"] + (["rating"] if data.has_ratings else [])
  names = []
  for kind in kinds:
    task = f"{name}_{kind}"
    splits = examples if kind in REC_TASKS else {"train": examples["train"],
                                                 "validation": examples["validation"]}
    if kind == "retrieval":
      splits = {**splits, "train": retrieval_train}
    if user_items is None and kind in ("ranking", "bpr"):
      splits = {s: e.with_user_items() for s, e in splits.items()}
    options = _task_options(kind, config, log_pop=log_pop, user_items=user_items, num_candidates=num_candidates)
    pre = pp.make_preprocessor(kind, tables, templates, task_name=task, **options)
    source = RecDataSource(splits, seed=config.seed, eval_seed=config.eval_seed, salt=pp.salt(task), users=users)
    _register_task(task, source, [pre, seqio.preprocessors.append_eos_after_trim], vocab, _METRICS.get(kind, ()))
    _TASKS[task] = info(kind)
    names.append(task)

  qa = item_qa_pairs(data, tables)
  if len(qa[0].lengths):
    task = f"{name}_item_qa"
    source = ItemQASource(*qa, pp.salt(task))
    pre = pp.make_preprocessor("item_qa", tables, templates, task_name=task, qa_lengths=source.lengths())
    _register_task(task, source, [pre, seqio.preprocessors.append_eos_after_trim], vocab)
    _TASKS[task] = info("item_qa")
    names.append(task)

  names += _register_mixtures(name, names, kinds)
  if config.itdr:
    itdr_tasks = _register_itdr(data, name, vocab, config, held, train_lengths, info,
                                _itdr_sampling(log_pop, user_items, config), (users, index) if lean else None)
    names += itdr_tasks
    for mix, members in (("itdr", itdr_tasks), ("ut_at_itdr", [f"{name}_{m}" for m in MIXTURES["ut_at"]
                                                              if f"{name}_{m}" in names] + itdr_tasks)):
      _register_mixture(f"{name}_{mix}", members)
      names.append(f"{name}_{mix}")
  if config.reclm:
    names += register_profile_task(data_dir, name=name, vocab=vocab, seed=config.seed, config=config, data=data)
  _REGISTERED[name], _SOURCES[name] = list(names), origin
  return names


def _users(data_dir, listed: dict, config: TaskConfig) -> tuple:
  """(the data set, lean, the TFDS copy streamed tasks read, its `index`: lengths, validation flags and,
  when lean, the training popularity -- None in memory --, ITDR's held-out users, every user's training
  length). Lean: every task streams, no user is loaded -- in memory only the catalogue and O(users) arrays
  (RecLM's profile tasks and ITDR's UAP -- user attributes, MovieLens 100k / 1M sizes -- are built in
  memory: with them, the users are loaded)."""
  lean = config.streamed and not (config.reclm or (config.itdr and itdr.attributes_listed(listed)))
  data = PreparedData.load(data_dir, timestamps=False, users=not lean)   # (no task reads the timestamps)
  users = tfds_data.reader(data_dir) if config.streamed else None
  index = tfds_data.index(users, num_items=data.num_items if lean and not config.itdr else None) \
      if config.streamed else None
  lengths = itdr.sequence_lengths(data) if index is None else index[0]
  # ITDR's list tasks hold out their evaluation users' last 5 items: from every task's training samples
  held = itdr.eval_users(lengths, config.itdr_eval_users, config.eval_seed) if config.itdr else {}
  train_lengths = itdr.train_lengths(lengths, held)
  if lean and config.itdr:   # (so the training popularity needs a pass of its own)
    index = (*index, tfds_data.popularity(users, data.num_items, train_lengths))
  return data, lean, users, index, held, train_lengths


def _registered_alike(name: str, origin: dict, replace: bool) -> bool:
  """Whether data set `name` is registered from `origin` already (folder, preparation, vocabulary, config); a
  ValueError naming what differs if it is registered otherwise, unless `replace` (then False, with a warning)."""
  differ = _differences(_SOURCES[name], origin)
  if differ and not replace:
    raise ValueError(f"data set {name!r} is already registered, with another {'; '.join(differ)}: register it "
                     f"under another name (register_dataset(..., name=...)), or pass replace=True to replace "
                     f"its tasks and mixtures on purpose")
  if differ:
    logging.warning("%s: replacing its registration (another %s)", name, "; ".join(differ))
  return not differ


def _examples(data: PreparedData, index, config: TaskConfig, train_lengths) -> tuple[dict, Any]:
  """Every split's examples (windows or prefixes, TaskConfig.train_examples) and retrieval's training ones
  (with next_items > 1: continuations of several items): held in memory, or, given the TFDS copy's
  `index` (lengths, validation flags), streamed from it."""
  build = functools.partial(sources.build_examples, data)
  if index is not None:
    build = functools.partial(sources.streamed_examples, *index[:2], with_ratings=data.has_ratings)
  examples = {s: build(s, config.window, config.train_examples, train_lengths) for s in sources.SPLITS}
  if config.next_items <= 1:
    return examples, examples["train"]
  if config.id_scheme == "random":   # `I1` is a prefix of `I12`: the item after an ID would compete with its EOS
    raise ValueError("TaskConfig.next_items > 1 needs IDs no ID is a prefix of (id_scheme collaborative, "
                     "semantic, atomic or hybrid), not random ones")
  return examples, build("train", config.window, "continuations", train_lengths, next_items=config.next_items)


def _num_candidates(name: str, num_items: int, config: TaskConfig, longest: int) -> int:
  """Ranking's candidates: as configured, or as many negatives as every user (the longest, `longest`
  items) can have (a small catalogue)."""
  free = num_items - longest
  if config.num_candidates - 1 <= free:
    return config.num_candidates
  logging.warning("%s: ranking uses %d candidates instead of %d: the heaviest user leaves only %d "
                  "items to sample negatives from", name, free + 1, config.num_candidates, free)
  return free + 1


def _task_options(kind: str, config: TaskConfig, **tables) -> dict:
  """The preprocessor settings of one kind of task (`make_preprocessor`'s keywords) from the TaskConfig."""
  if kind in ("ranking", "bpr"):
    return {"log_popularity": tables["log_pop"], "user_items": tables["user_items"],
            **({"num_candidates": tables["num_candidates"]} if kind == "ranking" else {})}
  if kind == "retrieval":
    return {**({"window": config.window, "next_items": config.next_items} if config.next_items > 1 else {}),
            **({} if config.prompt_words else {"words": False})}
  if kind == "mim":
    return {"mask_rate": config.mask_rate}
  if kind == "mlm":
    return {"window_size": config.window, "noise_density": config.noise_density,
            "mean_noise_span_length": config.mean_noise_span_length}
  return {}


def _register_mixtures(name: str, names: Sequence[str], kinds: Sequence[str]) -> list[str]:
  """The paper's mixtures (MIXTURES) of the tasks registered; RpAT only with ratings."""
  added = []
  for mix, members in MIXTURES.items():
    present = [f"{name}_{m}" for m in members if f"{name}_{m}" in names]
    if members[0] not in kinds:
      continue  # RpAT needs ratings
    if len(present) < len(members):
      logging.info("%s_%s without the rating task: %s has no ratings", name, mix, name)
    _register_mixture(f"{name}_{mix}", present)
    added.append(f"{name}_{mix}")
  return added


def unregister(name: Optional[str] = None) -> None:
  """Removes the tasks and mixtures register_dataset registered for data set `name` (all, if None)."""
  for n in ([name] if name else list(_REGISTERED)):
    for old in _REGISTERED.pop(n, []):
      _remove(old)
    _SOURCES.pop(n, None)


def _origin(data_dir: str | Path, vocab, config: TaskConfig) -> dict:
  """What a data set is registered from: folder, its preparation stamp, vocabulary, TaskConfig."""
  return {"data_dir": str(Path(data_dir).resolve()), "prepared": _prepared_stamp(data_dir, config.id_scheme),
          "vocab": vocab or load_vocabulary(Path(data_dir) / "vocab"), "config": config}


def _prepared_stamp(data_dir: str | Path, id_scheme: str) -> tuple:
  """Changes when `recalign prepare`, `recalign vocab` or `recalign ids` (for the scheme in use) rewrites
  what the tasks are built from (another scheme's IDs added to the folder change nothing)."""
  files = [Path(data_dir) / f for f in ("manifest.json", "items.jsonl", f"ids/{id_scheme}.json")]
  files.append(tfds_data.directory(data_dir) / "dataset_info.json")
  files += sorted(Path(data_dir).glob("vocab/*"))
  return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists())


def _differences(old: dict, new: dict) -> list[str]:
  out = []
  if old["data_dir"] != new["data_dir"]:
    out.append(f"folder ({old['data_dir']}, now {new['data_dir']})")
  elif old["prepared"] != new["prepared"]:
    out.append(f"preparation ({new['data_dir']} was rewritten since)")
  if not same_vocabulary(old["vocab"], new["vocab"]):
    out.append(f"vocabulary ({describe(old['vocab'])}, now {describe(new['vocab'])})")
  if old["config"] != new["config"]:
    changed = [f"{f.name}={getattr(old['config'], f.name)!r} -> {getattr(new['config'], f.name)!r}"
               for f in dataclasses.fields(new["config"])
               if getattr(old["config"], f.name) != getattr(new["config"], f.name)]
    out.append(f"TaskConfig ({', '.join(changed)})")
  return out


def _sampling_tables(data: PreparedData, train_lengths: np.ndarray, index=None) -> tuple:
  """(log popularity over the training items -- -1e9 for unseen items --, every user's items as (values,
  row lengths), the longest user's item count): what negative sampling draws from and excludes. Given the
  streamed copy's `index` with popularity (lengths, validation flags, popularity: `tfds_data.index`'s
  `num_items`), from it, with no per-user table (None): each example carries the items its negatives exclude."""
  if index is not None:
    lengths, _, popularity = index
    return _log_popularity(popularity), None, int(lengths.max())
  pop = np.bincount(np.concatenate([s[:n] for s, n in zip(data.sequences, train_lengths)]),
                    minlength=data.num_items)
  rows = Ragged.of(data.sequences, np.int32)   # (PreparedData's own flat array: no copy)
  return _log_popularity(pop), (rows.values, rows.lengths()), int(rows.lengths().max())


def _log_popularity(pop: np.ndarray) -> np.ndarray:
  return np.where(pop > 0, np.log(np.maximum(pop, 1)), -1e9).astype(np.float32)


def _itdr_sampling(log_pop: np.ndarray, user_items, config: TaskConfig) -> dict:
  """The ITDR tasks' negative-sampling options: popularity as the paper's tasks, or uniform (every logit 0)."""
  if config.itdr_negatives not in ("popularity", "uniform"):
    raise ValueError(f"itdr_negatives must be 'popularity' or 'uniform', not {config.itdr_negatives!r}")
  uniform = config.itdr_negatives == "uniform"
  return {"log_popularity": np.zeros_like(log_pop) if uniform else log_pop, "user_items": user_items}


def _register_itdr(data: PreparedData, name: str, vocab, config: TaskConfig, held, train_lengths, info,
                   sampling: dict, stream=None) -> list[str]:
  """ITDR's tasks the data set supports: RP (ratings), TKR, NIR, UAP (age, gender, occupation). `stream`:
  (the TFDS copy's builder, its `index`: lengths and validation flags) to stream TKR, NIR and RP from."""
  texts = itdr.ItemTexts.of(data, vocab, config.itdr_max_title_tokens)
  w = itdr.words(data.domain)
  records = {
      "rp": lambda s: itdr.next_item_records(data, s, train_lengths, itdr.RP_CONTEXT),
      "tkr": lambda s: itdr.list_records(data, s, held, train_lengths),
      "nir": lambda s: itdr.next_item_records(data, s, train_lengths, itdr.HISTORY),
      "uap": lambda s: itdr.attribute_records(data, s, held, train_lengths, config.itdr_liked_items),
  }
  if stream is not None:   # (no per-user table: each row carries its user's items for the negatives)
    for kind in ("rp", "tkr", "nir"):
      records[kind] = functools.partial(_streamed_itdr, kind, *stream[1][:2], train_lengths, held, data.has_ratings)
  kinds = ["tkr", "nir"] + (["rp"] if data.has_ratings else []) + (["uap"] if itdr.has_attributes(data) else [])
  if not itdr.has_attributes(data):
    logging.info("%s: no ITDR UAP task: its users have no age, gender and occupation (MovieLens' .user file, "
                 "read by recalign prepare)", name)
  names = []
  for kind in sorted(kinds, key=itdr.KINDS.index):
    task = f"{name}_itdr_{kind}"
    options = {"texts": texts, "w": w, **(sampling if kind in ("tkr", "nir") else {})}
    _register_itdr_task(task, kind, {s: records[kind](s) for s in sources.SPLITS}, options, vocab, config,
                        users=stream and stream[0])
    _TASKS[task] = info(f"itdr_{kind}")
    names.append(task)
  return names


def _streamed_itdr(kind, lengths, validation, train_lengths, held, with_ratings: bool, split: str):
  rows = itdr.streamed_records(kind, split, lengths, validation, train_lengths, held, with_ratings=with_ratings)
  return rows if kind == "rp" else rows.with_user_items()   # (TKR's, NIR's negatives exclude them)


def _register_itdr_task(task: str, kind: str, splits: Mapping[str, sources.Records], options: dict, vocab,
                        config: TaskConfig, fn=None, metric_fns=None, users=None) -> None:
  empty = [s for s, r in splits.items() if not len(r)]
  if empty:
    logging.warning("%s has no %s examples (too few users with enough interactions)", task, "/".join(empty))
  source = RecDataSource({s: r for s, r in splits.items() if len(r)}, seed=config.seed, eval_seed=config.eval_seed,
                         salt=pp.salt(task), users=users)
  _register_task(task, source, itdr.preprocessors(kind, task, fn, **options), vocab,
                 metric_fns or itdr.METRIC_FNS[kind])


class TextSource(_InMemorySource):
  """Fixed (inputs, targets) texts per split, e.g. ITDR's IR / TUI records with the user's references."""

  def __init__(self, pairs: Mapping[str, list[tuple[str, str]]], salt: int):
    self._pairs, self._salt = dict(pairs), salt
    super().__init__(splits=list(pairs), num_input_examples={k: len(v) for k, v in pairs.items()})

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, **_) -> tf.data.Dataset:
    self._check_split(split)
    rows = self._pairs[split]
    ds = tf.data.Dataset.from_tensor_slices({"inputs": [r[0] for r in rows], "targets": [r[1] for r in rows],
                                             "example_id": np.arange(len(rows), dtype=np.int64)})
    ds = self._shard(ds, shard_info)
    if shuffle:
      ds = ds.shuffle(len(rows), seed=sources.mix_seed(seed or 0, self._salt) % (1 << 40))
    return ds


def _text_task_info(kind: str, data_dir, data: PreparedData, vocab, config: TaskConfig) -> TaskInfo:
  """TaskInfo of a task that writes items by title: its IDs are the data set's random ones (never shown)."""
  return TaskInfo(kind, str(Path(data_dir).resolve()), vocab, tuple(item_id(k) for k in range(data.num_items)), config)


def register_reference_task(records: str | Path, kind: str, *, data_dir: str | Path, noun: str, focus: str = "",
                            name: Optional[str] = None, vocab=None) -> str:
  """ITDR's IR or TUI task from records a user supplies (JSONL, one per line, each with a "split" of
  train / validation / test and the fields `itdr.reference_example` names, "reference" included: none of
  our data sets has the review text or the LLM-written references these tasks need). Registers
  `<data set>_itdr_<kind>` (or `name`) with the data set's vocabulary; metrics BLEU-1/2, ROUGE-1/2/L."""
  data = PreparedData.load(data_dir)
  pairs: dict[str, list] = {}
  with open(records, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      row = json.loads(line)
      missing = {"split", "reference"} - set(row)
      if missing or row["split"] not in sources.SPLITS:
        raise DataError(str(records), n, ",".join(sorted(missing)) or "split",
                        f"needs a split in {sources.SPLITS} and a reference")
      try:
        pairs.setdefault(row["split"], []).append(itdr.reference_example(kind, row, noun=noun, focus=focus))
      except KeyError as e:
        raise DataError(str(records), n, str(e.args[0]), f"missing field of an ITDR {kind} record") from None
  task = name or f"{data.name}_itdr_{kind}"
  vocab = vocab or load_vocabulary(Path(data_dir) / "vocab")
  _register_task(task, TextSource(pairs, pp.salt(task)), itdr.text_preprocessors(task), vocab, itdr.METRIC_FNS[kind])
  _TASKS[task] = _text_task_info(f"itdr_{kind}", data_dir, data, vocab, TaskConfig())
  _REGISTERED.setdefault(data.name, []).append(task)
  return task


def register_profile_task(data_dir: str | Path, *, profiles: Optional[str | Path] = None, name: Optional[str] = None,
                          vocab=None, seed: int = 0, max_title_tokens: int = 24, collab: bool = True,
                          items: bool = True, neighbours: int = 3, collab_max_items: int = 10,
                          user_embeddings: Optional[np.ndarray] = None, cf_epochs: int = 30,
                          config: Optional[TaskConfig] = None, data: Optional[PreparedData] = None) -> list[str]:
  """RecLM's profile tasks on a prepared data set, with the silver profiles of `recalign.tasks.reclm` as
  teacher unless `profiles` (JSONL of teacher user profiles) is given:
    `<name>_profile`         a user's training history (titles) -> the user's profile (distillation);
    `<name>_collab_profile`  the user's history + the histories of `neighbours` similar users (nearest by
                             the user representations of a LightGCN trained `cf_epochs` epochs on the
                             training interactions, or `user_embeddings`) + a candidate ->
                             "<profile> ; answer: yes|no" (RecLM's two-turn collaborative tuning);
    `<name>_item_profile`    an item's text + up to 5 of its training users' profiles -> its (silver) profile;
  and the mixture `<name>_reclm` of them. Users (and items) are split train / validation / test (seeded),
  so evaluation profiles belong to unseen users; candidates and the users an item shows are re-drawn
  every epoch. Only training interactions are read. `config`: what run.json records (TaskConfig(reclm=True)
  when `register_dataset` calls this; `data`: the loaded `data_dir`, if the caller has it)."""
  from recalign.tasks import reclm
  data = data or PreparedData.load(data_dir)
  name = name or data.name
  vocab = vocab or load_vocabulary(Path(data_dir) / "vocab")
  teacher = reclm.load_profiles(profiles, data) if profiles else reclm.silver_user_profiles(data)
  titles = itdr.item_titles(data, vocab, max_title_tokens)
  split = reclm.user_split(data.num_users, seed)
  config = config or TaskConfig(seed=seed)
  info = _text_task_info("profile", data_dir, data, vocab, config)
  pairs = {s: reclm.profile_pairs(data, titles, teacher, split[s]) for s in sources.SPLITS}
  tasks = [f"{name}_profile"]
  _register_task(tasks[0], TextSource(pairs, pp.salt(tasks[0])), itdr.text_preprocessors(tasks[0]), vocab,
                 [itdr.text_metrics])
  _TASKS[tasks[0]] = info
  if collab:
    if user_embeddings is None:
      user_embeddings = reclm.user_embeddings(data, epochs=cf_epochs, seed=seed)
    near = reclm.similar_users(user_embeddings, neighbours)
    has_teacher = np.array([p is not None for p in teacher])
    records = {}
    for s in sources.SPLITS:
      records[s], skipped = reclm.collab_records(data, split[s][has_teacher[split[s]]], near,
                                                 max_items=collab_max_items)
      if any(skipped.values()):
        logging.info("%s_collab_profile %s: skipped %s (no shown neighbour item qualifies)", name, s, skipped)
    task = f"{name}_collab_profile"
    options = {"titles": titles, "profiles": [p or "" for p in teacher], "domain": data.domain, "k": neighbours}
    _register_itdr_task(task, "collab", records, options, vocab, config, fn=reclm.render_collab,
                        metric_fns=[reclm.collab_metrics])
    _TASKS[task] = dataclasses.replace(info, kind="collab_profile")
    tasks.append(task)
  if items:
    users_of = reclm.item_users(data)
    item_split = reclm.user_split(data.num_items, seed + 1)
    task = f"{name}_item_profile"
    options = {"descriptions": reclm.item_descriptions(data, titles), "user_profiles": [p or "" for p in teacher],
               "item_profiles": reclm.silver_item_profiles(data), "domain": data.domain}
    _register_itdr_task(task, "item_profile", {s: reclm.item_records(data, item_split[s], users_of)
                                               for s in sources.SPLITS}, options, vocab, config,
                        fn=reclm.render_item_profile, metric_fns=[itdr.text_metrics])
    _TASKS[task] = dataclasses.replace(info, kind="item_profile")
    tasks.append(task)
  _register_mixture(f"{name}_reclm", tasks)
  _REGISTERED.setdefault(name, []).extend([*tasks, f"{name}_reclm"])
  return [*tasks, f"{name}_reclm"]


def register_cross_domain(source_dir: str | Path, target_dir: str | Path, *, name: Optional[str] = None, vocab=None,
                          config: TaskConfig = TaskConfig()) -> list[str]:
  """ITDR's CDR task between two prepared data sets that share user IDs (e.g. two Amazon categories):
  5 source-domain training items + 5 target-domain items -> 10 target candidates ranked.
  Evaluation users are the target's ITDR evaluation users (`itdr.eval_users`, the same draw as
  `register_dataset(TARGET, config=TaskConfig(itdr=True))`) that the source shares; their last 5
  target items are the positives and never in a training sample. Registers `<name>_itdr_cdr`
  (default name `<source>_to_<target>`) with the target's vocabulary unless `vocab` is given."""
  src, tgt = PreparedData.load(source_dir), PreparedData.load(target_dir)
  name = name or f"{src.name}_to_{tgt.name}"
  vocab = vocab or load_vocabulary(Path(target_dir) / "vocab")
  src_user = {u: k for k, u in enumerate(src.users)}
  shared = np.array([k for k, u in enumerate(tgt.users) if u in src_user], np.int64)
  if not len(shared):
    raise ValueError(f"{source_dir} and {target_dir} share no user IDs: CDR needs the same users in both")
  lengths = itdr.sequence_lengths(tgt)
  held = itdr.eval_users(lengths, config.itdr_eval_users, config.eval_seed)
  train_lengths = itdr.train_lengths(lengths, held)
  held_shared = {s: np.intersect1d(u, shared) for s, u in held.items()}

  def records(split):
    base = itdr.list_records(tgt, split, held_shared, train_lengths)
    keep = np.isin(base.columns["user"], shared)
    source = [src.sequences[src_user[tgt.users[u]]][:-2][-itdr.HISTORY:] for u in base.columns["user"]]
    keep &= np.array([len(x) > 0 for x in source], bool)
    cols = {k: v[keep] for k, v in base.columns.items()}
    cols["source_history"] = [x for x, k in zip(source, keep) if k]
    return sources.Records(cols)

  task = f"{name}_itdr_cdr"
  options = {"texts": itdr.ItemTexts.of(tgt, vocab, config.itdr_max_title_tokens),
             "source_texts": itdr.ItemTexts.of(src, vocab, config.itdr_max_title_tokens),
             "w": itdr.words(tgt.domain), "domains": (src.name, tgt.name),
             **_itdr_sampling(*_sampling_tables(tgt, train_lengths)[:2], config)}
  _register_itdr_task(task, "cdr", {s: records(s) for s in sources.SPLITS}, options, vocab, config)
  _TASKS[task] = _text_task_info("itdr_cdr", target_dir, tgt, vocab, config)
  _REGISTERED.setdefault(name, []).append(task)
  return [task]


def get_vocabulary(task_or_mixture):
  """The targets vocabulary of a seqio task or mixture (all members must share it)."""
  tasks = getattr(task_or_mixture, "tasks", None) or [task_or_mixture]
  vocabs = {id(t.output_features["targets"].vocabulary): t.output_features["targets"].vocabulary for t in tasks}
  sizes = {v.vocab_size for v in vocabs.values()}
  if len(sizes) > 1:
    raise ValueError(f"{task_or_mixture.name}: members use vocabularies of different sizes {sorted(sizes)}")
  return next(iter(vocabs.values()))


def get(name: str):
  """`seqio.get_mixture_or_task` with an error that says what is registered and why not."""
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    pass
  known = sorted(n for n in (*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names())
                 if any(n.startswith(d + "_") for d in _REGISTERED))
  base, _, kind = name.rpartition("_")
  if kind in ("rating", "rpat") and base in _REGISTERED:
    raise ValueError(f"{name!r}: data set {base!r} has no ratings, so it has no rating task "
                     "(rating needs explicit ratings, e.g. ml-100k)")
  hint = (f"registered recalign tasks/mixtures: {', '.join(known)}" if known else
          "no recalign data set is registered: call recalign.tasks.register_dataset(DIR), or list it in "
          "gin's DATA_DIRS (recalign train) / --data (recalign eval)")
  raise ValueError(f"unknown task or mixture {name!r}; {hint}")


_LENGTHS_CHECKED: set = set()


def check_feature_lengths(task_or_mixture, lengths: Mapping[str, int], *, examples: int = 32) -> None:
  """TASK_FEATURE_LENGTHS too short for a task's examples are an error before training: each member's first
  `examples` training examples are built (untrimmed) at these lengths. None left (a task that drops
  examples it cannot fit, e.g. MIM with no room for a masked item; training would wait forever for one),
  or most of them with targets / inputs that seqio would cut: an error naming the task, the feature and
  what it needs; a few cut: a warning."""
  for task in getattr(task_or_mixture, "tasks", None) or [task_or_mixture]:
    key = (task.name, tuple(sorted(lengths.items())))
    if key in _LENGTHS_CHECKED:
      continue
    ds = task.source.get_dataset("train", shuffle=False).take(examples)
    with seqio.utils.map_seed_manager(0):   # the task's preprocessors without seqio's final trim
      for fn in task.preprocessors:
        if fn is not seqio.preprocessors.append_eos_after_trim:
          ds = seqio.utils.add_kwargs_to_transform(fn, sequence_length=dict(lengths),
                                                   output_features=task.output_features)(ds)
    try:
      built = list(ds.as_numpy_iterator())
    except tf.errors.InvalidArgumentError as e:   # a task's own assertion (ranking's candidates)
      said = e.message.split("[")[1].rstrip("] ") if "[" in e.message else e.message
      raise ValueError(f"{task.name}: {said}") from None
    if not built:
      raise ValueError(f"TASK_FEATURE_LENGTHS['inputs']={lengths['inputs']} (or 'targets'={lengths['targets']}) is too "
                       f"short for {task.name}: none of its first {examples} training examples fits; raise it")
    for feature in ("targets", "inputs"):
      eos = int(task.output_features[feature].add_eos)
      need = max(len(e[feature]) for e in built) + eos
      cut = sum(len(e[feature]) + eos > lengths[feature] for e in built)
      message = (f"TASK_FEATURE_LENGTHS['{feature}']={lengths[feature]} is too short for {task.name}: {cut} of its "
                 f"first {len(built)} training examples need up to {need} tokens and would be cut")
      if cut > len(built) // 2:      # most cut: a mistake; a few long texts cut: as seqio / T5X always did
        raise ValueError(message)
      if cut:
        logging.warning("%s", message)
        print(f"warning: {message}", flush=True)
    _LENGTHS_CHECKED.add(key)
