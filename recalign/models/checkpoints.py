"""Checkpoint import/export: Hugging Face T5 / FLAN-T5 (safetensors) and T5X, plus vocabulary resizing.

Parameters are nested dicts of numpy arrays in recalign's (= T5X's) naming; see `network.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from recalign import paths
from recalign.models.network import T5Config
from recalign.run_record import FILE as RUN_FILE, RunRecord, find_model_dir

# --------------------------------------------------------------------------------------------
# Hugging Face


def config_from_hf(hf: dict, **overrides) -> T5Config:
  proj = hf.get("feed_forward_proj", "relu")
  gated = proj.startswith("gated-")
  act = proj.removeprefix("gated-")
  act = {"gelu_new": "gelu", "gelu": "gelu", "relu": "relu", "silu": "silu"}.get(act)
  if act is None:
    raise ValueError(f"config.json: unsupported feed_forward_proj {proj!r}")
  cfg = T5Config(
      vocab_size=hf["vocab_size"], emb_dim=hf["d_model"], num_heads=hf["num_heads"],
      num_encoder_layers=hf["num_layers"], num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
      head_dim=hf["d_kv"], mlp_dim=hf["d_ff"], mlp_activations=(act, "linear") if gated else (act,),
      dropout_rate=hf.get("dropout_rate", 0.1), logits_via_embedding=_scaled_tied(hf),
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6))
  return cfg.replace(**overrides)


def _scaled_tied(hf: dict) -> bool:
  """T5 1.0 (tied, logits scaled by d_model**-0.5) vs T5.1.1 (untied, unscaled).

  transformers 4 wrote `tie_word_embeddings: false` for T5.1.1; transformers 5 always ties, writes
  `tie_word_embeddings: true` and says `scale_decoder_outputs: false` instead (and may then omit
  `lm_head.weight`: the output projection is the shared embedding, unscaled).
  """
  if "scale_decoder_outputs" in hf:
    return bool(hf["scale_decoder_outputs"])
  return bool(hf.get("tie_word_embeddings", True))


def config_to_hf(cfg: T5Config) -> dict:
  gated = len(cfg.mlp_activations) == 2
  act = {"gelu": "gelu_new"}.get(cfg.mlp_activations[0], cfg.mlp_activations[0])
  return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
          "vocab_size": cfg.vocab_size, "d_model": cfg.emb_dim, "d_kv": cfg.head_dim, "d_ff": cfg.mlp_dim,
          "num_layers": cfg.num_encoder_layers, "num_decoder_layers": cfg.num_decoder_layers,
          "num_heads": cfg.num_heads, "feed_forward_proj": ("gated-" if gated else "") + act,
          "is_gated_act": gated, "dense_act_fn": act,
          "tie_word_embeddings": cfg.logits_via_embedding, "scale_decoder_outputs": cfg.logits_via_embedding,
          "dropout_rate": cfg.dropout_rate,
          "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
          "relative_attention_max_distance": cfg.relative_attention_max_distance,
          "layer_norm_epsilon": cfg.layer_norm_epsilon, "pad_token_id": 0, "eos_token_id": 1,
          "decoder_start_token_id": 0, "is_encoder_decoder": True}


def _hf_names(cfg: T5Config) -> dict[str, tuple[tuple[str, ...], bool]]:
  """HF tensor name -> (our parameter path, transpose?)."""
  names: dict[str, tuple[tuple[str, ...], bool]] = {"shared.weight": (("token_embedder", "embedding"), False)}
  mlp = (["wi_0", "wi_1"] if len(cfg.mlp_activations) == 2 else ["wi"]) + ["wo"]

  def attn(hf: str, ours: tuple[str, ...]):
    for a, b in zip("qkvo", ("query", "key", "value", "out")):
      names[f"{hf}.{a}.weight"] = (ours + (b, "kernel"), True)

  for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
    names[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        (stack, "relpos_bias", "rel_embedding"), True)
    names[f"{stack}.final_layer_norm.weight"] = ((stack, f"{stack}_norm", "scale"), False)
    for i in range(n):
      hb, ob = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
      if stack == "encoder":
        attn(f"{hb}.0.SelfAttention", ob + ("attention",))
        names[f"{hb}.0.layer_norm.weight"] = (ob + ("pre_attention_layer_norm", "scale"), False)
        ff = 1
      else:
        attn(f"{hb}.0.SelfAttention", ob + ("self_attention",))
        names[f"{hb}.0.layer_norm.weight"] = (ob + ("pre_self_attention_layer_norm", "scale"), False)
        attn(f"{hb}.1.EncDecAttention", ob + ("encoder_decoder_attention",))
        names[f"{hb}.1.layer_norm.weight"] = (ob + ("pre_cross_attention_layer_norm", "scale"), False)
        ff = 2
      for m in mlp:
        names[f"{hb}.{ff}.DenseReluDense.{m}.weight"] = (ob + ("mlp", m, "kernel"), True)
      names[f"{hb}.{ff}.layer_norm.weight"] = (ob + ("pre_mlp_layer_norm", "scale"), False)
  if not cfg.logits_via_embedding:
    names["lm_head.weight"] = (("decoder", "logits_dense", "kernel"), True)
  return names


def _set(tree: dict, path: tuple[str, ...], value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def _read_safetensors(directory) -> dict[str, np.ndarray]:
  from safetensors.numpy import load, load_file

  def read(path) -> dict[str, np.ndarray]:   # remote files are read whole (safetensors maps local ones)
    return load(path.read_bytes()) if paths.is_remote(path) else load_file(str(path))

  single = directory / "model.safetensors"
  index = directory / "model.safetensors.index.json"
  if single.exists():
    return read(single)
  if index.exists():  # sharded: weight_map names the file of each tensor
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out = {}
    for f in files:
      out.update(read(directory / f))
    return out
  raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                          "(save the model with safe_serialization=True)")


def load_hf(directory: str | Path, *, vocab_size: Optional[int] = None,
            dtype=np.float32) -> tuple[T5Config, dict]:
  """Imports a HF T5 / FLAN-T5 directory (config.json + safetensors) -> (config, params)."""
  directory = paths.as_path(directory)
  cfg_path = directory / "config.json"
  if not cfg_path.exists():
    raise FileNotFoundError(f"{cfg_path} not found: not a Hugging Face model directory")
  cfg = config_from_hf(json.loads(cfg_path.read_text()))
  tensors = _read_safetensors(directory)
  params: dict = {}
  for hf_name, (path, transpose) in _hf_names(cfg).items():
    if hf_name not in tensors:
      if hf_name == "shared.weight" and "encoder.embed_tokens.weight" in tensors:
        hf_name = "encoder.embed_tokens.weight"
      elif hf_name == "lm_head.weight" and "shared.weight" in tensors:  # transformers 5, unscaled tied
        hf_name = "shared.weight"
      else:
        raise KeyError(f"{directory}: tensor {hf_name!r} missing from the checkpoint")
    x = np.asarray(tensors[hf_name], dtype=dtype)
    _set(params, path, x.T if transpose else x)
  if vocab_size is not None and vocab_size != cfg.vocab_size:
    params = resize_vocab(params, vocab_size)
    cfg = cfg.replace(vocab_size=vocab_size)
  return cfg, params


def save_hf(cfg: T5Config, params: dict, directory: str | Path) -> Path:
  """Exports to a directory `transformers.T5ForConditionalGeneration.from_pretrained` reads."""
  from safetensors.numpy import save_file
  directory = paths.as_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  out = {}
  for hf_name, (path, transpose) in _hf_names(cfg).items():
    x = np.asarray(_get(params, path), np.float32)
    out[hf_name] = np.ascontiguousarray(x.T if transpose else x)
  out["encoder.embed_tokens.weight"] = out["decoder.embed_tokens.weight"] = out["shared.weight"].copy()
  if cfg.logits_via_embedding:
    out["lm_head.weight"] = out["shared.weight"].copy()
  save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
  (directory / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
  return directory


def resize_vocab(params: dict, vocab_size: int, seed: int = 0) -> dict:
  """Keeps the first `vocab_size` rows (T5's 32,128 -> the project's vocabulary); new rows, if the
  vocabulary grows, are drawn like the existing ones."""
  rng = np.random.default_rng(seed)

  def fit(x: np.ndarray, axis: int) -> np.ndarray:
    n = x.shape[axis]
    if vocab_size <= n:
      return np.take(x, np.arange(vocab_size), axis=axis)
    shape = list(x.shape)
    shape[axis] = vocab_size - n
    return np.concatenate([x, rng.normal(0, x.std(), shape).astype(x.dtype)], axis=axis)

  out = _copy(params)
  out["token_embedder"]["embedding"] = fit(params["token_embedder"]["embedding"], 0)
  if "logits_dense" in params.get("decoder", {}):
    out["decoder"]["logits_dense"]["kernel"] = fit(params["decoder"]["logits_dense"]["kernel"], 1)
  return out


def _copy(tree):
  return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


# --------------------------------------------------------------------------------------------
# T5X


def load_t5x(path: str | Path) -> dict:
  """Imports the `target` parameters of a T5X checkpoint directory (`checkpoint_<step>`).

  Handles both layouts T5X writes: Orbax (`_METADATA` / `_CHECKPOINT_METADATA`), and the legacy
  msgpack `checkpoint` file whose large arrays live in tensorstore (zarr) folders named by the
  parameter path with dots (`target.encoder.layers_0.attention.query.kernel`). T5X's parameter
  names are recalign's, so nothing is renamed.
  """
  path = paths.as_path(path)
  if (path / "checkpoint").is_file():
    return _load_t5x_msgpack(path)
  restored = _restore_numpy(path)
  if "target" not in restored:
    raise KeyError(f"{path}: no 'target' in the checkpoint (top-level keys: {sorted(restored)})")
  return _to_numpy(restored["target"])


def _restore_numpy(path: Path) -> dict:
  """An Orbax PyTree as host numpy arrays, whatever devices wrote it: restoring onto the writer's
  shardings fails on another topology (another process count, a host without its devices)."""
  import jax
  import orbax.checkpoint as ocp
  from recalign.faults import CheckpointDamaged
  ckptr = ocp.PyTreeCheckpointer()
  try:
    meta = ckptr.metadata(str(paths.resolve(path)))
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(str(paths.resolve(path)), args=ocp.args.PyTreeRestore(restore_args=args))
  except FileNotFoundError:
    raise
  except Exception as e:   # tensorstore reports a truncated or missing array file as a bare Exception
    raise CheckpointDamaged(f"checkpoint {path} cannot be read, it may be damaged (a crash while saving, a "
                            f"truncated file): {first_line(e)}") from e


def first_line(e: BaseException, limit: int = 300) -> str:
  """An exception as one short line (tensorstore's messages run to pages of spec)."""
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  if len(text) > limit:   # the cause (e.g. "File too large [os_error_code='27']") is at the end
    text = f"{text[:limit - 120]} ... {text[-120:]}"
  return f"{type(e).__name__}: {text}"


def _to_numpy(tree):
  return {k: _to_numpy(v) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree)


def _load_t5x_msgpack(path: Path) -> dict:
  from flax import serialization
  import tensorstore as ts
  state = serialization.msgpack_restore((path / "checkpoint").read_bytes())
  if "target" not in state:
    raise KeyError(f"{path / 'checkpoint'}: no 'target' entry")

  def read(leaf, name: str):
    if isinstance(leaf, dict) and "driver" in leaf:    # a tensorstore spec
      spec = dict(leaf)
      kv = dict(spec["kvstore"])
      kv["path"] = str(path / kv["path"])
      spec["kvstore"] = kv
      return np.asarray(ts.open(spec).result().read().result())
    if isinstance(leaf, dict):
      return {k: read(v, f"{name}.{k}") for k, v in leaf.items()}
    if isinstance(leaf, (str, bytes)):                 # a relative zarr folder
      rel = leaf.decode() if isinstance(leaf, bytes) else leaf
      spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path / rel)}}
      return np.asarray(ts.open(spec).result().read().result())
    return np.asarray(leaf)

  return read(state["target"], "target")


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else k
    out.update(flatten(v, name) if isinstance(v, dict) else {name: v})
  return out


def check_compatible(params: dict, expected_shapes: dict, source: str) -> None:
  """Raises with every missing / unexpected / mis-shaped parameter named."""
  got = {k: tuple(v.shape) for k, v in flatten(params).items()}
  want = {k: tuple(v.shape) for k, v in flatten(expected_shapes).items()}
  problems = [f"missing {k} {s}" for k, s in want.items() if k not in got]
  problems += [f"unexpected {k}" for k in got if k not in want]
  problems += [f"{k}: shape {got[k]} != {s}" for k, s in want.items() if k in got and got[k] != s]
  if problems:
    raise ValueError(f"{source}: parameters do not match the model config:\n  " + "\n  ".join(problems[:20]))


# --------------------------------------------------------------------------------------------
# One entry point for every checkpoint recalign reads, and the vocabulary that goes with it


def find_run_json(path: paths.PathLike) -> Optional[paths.epath.Path]:
  """MODEL_DIR/run.json of a recalign checkpoint (MODEL_DIR/checkpoints/<step>, MODEL_DIR/best)."""
  model_dir = find_model_dir(path)
  return model_dir / RUN_FILE if model_dir is not None else None


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """What `load_checkpoint` reads: parameters (numpy, T5X names) and what the checkpoint says about itself."""
  params: dict
  format: str                     # "huggingface" | "recalign" | "t5x"
  config: Optional[T5Config]      # None for T5X (its model config lives in gin: give the matching model file)
  step: Optional[int] = None      # the training step, where the checkpoint records it
  model_dir: Optional[Path] = None   # a recalign run's MODEL_DIR


def checkpoint_format(path: paths.PathLike) -> str:
  """huggingface (config.json + safetensors), recalign (below a MODEL_DIR with run.json: checkpoints/<step>
  or best) or t5x (`checkpoint_<step>`, Orbax or legacy msgpack)."""
  path = paths.as_path(path)
  if (path / "config.json").exists():
    return "huggingface"
  if (path / "default").is_dir() and find_run_json(path) is not None:
    return "recalign"
  if (path / "checkpoint").is_file() or (path / "_METADATA").exists() or (path / "_CHECKPOINT_METADATA").exists():
    return "t5x"
  raise FileNotFoundError(f"{path}: not a checkpoint recalign can read (a Hugging Face directory with config.json, "
                          "a recalign MODEL_DIR/checkpoints/<step> or MODEL_DIR/best, or a T5X checkpoint_<step>)")


def load_checkpoint(path: paths.PathLike) -> Checkpoint:
  """The one reader of model checkpoints: dispatches on `checkpoint_format`. recalign keeps parameters
  under 'params' (train state: step, params, opt_state; + ema_params, the parameters' moving average, which
  is what is read when present); only T5X checkpoints use T5X's 'target'."""
  path = paths.as_path(path)
  fmt = checkpoint_format(path)
  if fmt == "huggingface":
    config, params = load_hf(path)
    return Checkpoint(params, fmt, config)
  if fmt == "t5x":
    step = path.name.removeprefix("checkpoint_")
    return Checkpoint(load_t5x(path), fmt, None, int(step) if step.isdigit() else None)
  restored = _restore_numpy(path / "default")
  # a run with EMA_DECAY: its moving average, what its validation scored; before 2026-11-30 T5X's key
  key = next((k for k in ("ema_params", "params") if k in restored), "target")
  if key not in restored:
    raise KeyError(f"{path}: no 'params' in the checkpoint (top-level keys: {sorted(restored)})")
  model_dir = find_model_dir(path)
  config = T5Config.from_dict(RunRecord.read(model_dir).network_config)
  return Checkpoint(_to_numpy(restored[key]), fmt, config, checkpoint_step(path), model_dir)


def saved_steps(model_dir: paths.PathLike) -> list[int]:
  """Steps of MODEL_DIR/checkpoints that are complete: orbax writes under a temporary name and renames
  (local disks) or marks a finished step with commit_success.txt (object stores); a step still being
  written is neither, so an eval job polling MODEL_DIR never reads it."""
  from orbax.checkpoint import step as ocp_step
  root = paths.as_path(model_dir) / "checkpoints"
  if not root.exists():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and ocp_step.is_checkpoint_finalized(p))


def checkpoint_step(path: paths.PathLike) -> Optional[int]:
  """The step of a recalign checkpoint: MODEL_DIR/checkpoints/<step>, or MODEL_DIR/best (from best.json)."""
  path = paths.as_path(path)
  if path.name.isdigit():
    return int(path.name)
  best = path.parent / "best.json"
  if path.name == "best" and best.exists():
    return int(json.loads(best.read_text())["step"])
  return None


def load_params(path: str | Path) -> dict:
  """Parameters only (numpy, T5X names) of any checkpoint `load_checkpoint` reads."""
  return load_checkpoint(path).params


def checkpoint_vocabulary(path: paths.PathLike) -> Optional[paths.epath.Path]:
  """The SentencePiece model a checkpoint was trained with, where it says: a Hugging Face directory's
  spiece.model, or the vocabulary recorded in a recalign run's run.json. None for T5X checkpoints
  (they do not record it: T5 / FLAN-T5 use cc_all.32000.100extra/sentencepiece.model)."""
  from recalign.data.vocab import CHECKPOINT_VOCAB_FILES
  path = paths.as_path(path)
  for name in CHECKPOINT_VOCAB_FILES:
    if (path / name).exists():
      return path / name
  run = RunRecord.find(path)
  return paths.as_path(run.vocabulary["path"]) if run is not None and run.vocabulary else None


class VocabularyMismatch(ValueError):
  """An initial checkpoint whose token ids mean something else than the tasks' vocabulary's."""


def fit_vocabulary(params: dict, source: str | Path, task_vocab, rows: int, mismatch: str = "error") -> dict:
  """Checks that a checkpoint's embedding rows belong to the tasks' vocabulary before training on them.

  The vocabulary is part of a run: a pretrained T5's 32,128 rows are only meaningful with its own
  SentencePiece model (gin/runs/finetune.gin: VOCABULARY = 'checkpoint'). Item ID pieces appended to
  that model (`ExtendedVocabulary`) grow the rows: existing ones keep their ids. `mismatch`:
    "error"   a different vocabulary, or a different number of rows, is a `VocabularyMismatch`;
    "resize"  keep the first rows and cut or grow the rest (explicit; only sensible between
              recalign runs whose vocabularies share their first tokens).
  """
  from recalign.data.vocab import describe, load_vocabulary, same_vocabulary
  if mismatch not in ("error", "resize"):
    raise ValueError(f"vocabulary_mismatch must be 'error' or 'resize', not {mismatch!r}")
  have = params["token_embedder"]["embedding"].shape[0]
  vocab_path = checkpoint_vocabulary(source)
  theirs = None if vocab_path is None else load_vocabulary(vocab_path)
  base = getattr(task_vocab, "base", None)
  if theirs is not None and base is not None and same_vocabulary(theirs, base) and have <= rows:
    # Item ID pieces appended to the checkpoint's own vocabulary: its rows keep their ids, new rows follow.
    if have < rows:
      logging.info("%s: %d embedding rows grown to %d for %d new pieces", source, have, rows, len(task_vocab.pieces))
    return resize_vocab(params, rows)
  same = None if theirs is None else same_vocabulary(theirs, task_vocab)
  if same is not False and have == rows:
    if same is None:
      logging.warning("%s records no vocabulary; its %d rows are used as the ids of %s: make sure VOCABULARY is "
                      "its SentencePiece model", source, have, describe(task_vocab))
    return params
  if mismatch == "resize":
    logging.warning("%s: vocabulary resized from %d to %d rows (first rows kept)", source, have, rows)
    return resize_vocab(params, rows)
  theirs = f"{vocab_path}" if vocab_path else "an unrecorded vocabulary"
  raise VocabularyMismatch(
      f"{source} was trained with {theirs} ({have} embedding rows), but the tasks use {describe(task_vocab)} "
      f"({rows} rows): its embeddings would be used for unrelated tokens. Set VOCABULARY to the "
      "checkpoint's SentencePiece model (gin/runs/finetune.gin uses VOCABULARY = 'checkpoint'), or ask for "
      "--gin.ModelConfig.vocabulary_mismatch=\"'resize'\" to cut/grow the rows (only between recalign runs).")
