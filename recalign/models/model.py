"""Model glue around the network: losses (T5X's z-loss, label smoothing, normalisation), teacher-
forced scoring of given targets, and the incremental-decoding hooks beam search builds on.

Batches are T5X-shaped dicts: `encoder_input_tokens`, `decoder_input_tokens` (targets shifted right,
starting with 0), `decoder_target_tokens`, optional `decoder_loss_weights` and segment ids.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from recalign.models.network import T5Config, Transformer

Params = dict


def cross_entropy_with_logits(logits: jnp.ndarray, targets: jnp.ndarray, z_loss: float
                              ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Per-token cross entropy with soft `targets` plus z_loss * log(Z)^2 (as T5X); returns both."""
  log_z = jax.nn.logsumexp(logits, axis=-1)
  loss = -jnp.sum(targets * (logits - log_z[..., None]), axis=-1)
  z = z_loss * jnp.square(log_z)
  return loss + z, z


# T5X's names for the loss normalisation (`loss_normalizing_factor`) and recalign's short ones.
NORMALIZATION = {"NUM_REAL_TARGET_TOKENS": "tokens", "AVERAGE_PER_SEQUENCE": "sequence",
                 "tokens": "tokens", "sequence": "sequence"}


def compute_loss(logits, target_tokens, weights=None, *, z_loss: float = 1e-4, label_smoothing: float = 0.0,
                 normalize: Union[str, float, None] = "tokens", segment_ids=None) -> tuple[jnp.ndarray, dict]:
  """Token losses, weighted and normalised.

  normalize (T5X's `loss_normalizing_factor`): "tokens" / "NUM_REAL_TARGET_TOKENS" (mean over real
  target tokens: long targets weigh more -- MIM's ~70 tokens against retrieval's ~6), "sequence" /
  "AVERAGE_PER_SEQUENCE" (mean over sequences of each sequence's mean token loss: every example
  weighs the same; packed rows are split by `segment_ids`), a float (a constant), or None (sum).
  """
  if isinstance(normalize, str):
    if normalize not in NORMALIZATION:
      raise ValueError(f"loss normalisation must be one of {sorted(NORMALIZATION)}, a number or None, "
                       f"not {normalize!r}")
    normalize = NORMALIZATION[normalize]
  vocab = logits.shape[-1]
  weights = (target_tokens > 0).astype(jnp.float32) if weights is None else weights.astype(jnp.float32)
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  # The minimum achievable loss with smoothed targets, subtracted so a perfect model scores 0.
  constant = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20)) if label_smoothing else 0.0
  soft = jax.nn.one_hot(target_tokens, vocab) * (confidence - low) + low
  tok_loss, tok_z = cross_entropy_with_logits(logits.astype(jnp.float32), soft, z_loss)
  tok_loss = (tok_loss - constant) * weights
  if normalize == "tokens":
    denom = jnp.maximum(weights.sum(), 1.0)
    loss = tok_loss.sum() / denom
  elif normalize == "sequence":
    seg = jnp.ones_like(target_tokens) if segment_ids is None else segment_ids
    same = seg[:, :, None] == seg[:, None, :]                                    # [b, len, len]
    length = jnp.einsum("bij,bj->bi", same.astype(jnp.float32), weights)          # tokens of my sequence
    starts = (seg != jnp.pad(seg, ((0, 0), (1, 0)))[:, :-1]) | (jnp.arange(seg.shape[1]) == 0)
    num_sequences = jnp.sum(starts & (weights > 0) & (seg > 0))
    loss = jnp.sum(tok_loss / jnp.maximum(length, 1.0)) / jnp.maximum(num_sequences, 1)
  elif normalize is None:
    loss = tok_loss.sum()
  else:
    loss = tok_loss.sum() / float(normalize)
  correct = (jnp.argmax(logits, -1) == target_tokens) * weights
  metrics = {"loss": loss, "z_loss": (tok_z * weights).sum() / jnp.maximum(weights.sum(), 1.0),
             "accuracy": correct.sum() / jnp.maximum(weights.sum(), 1.0),
             "target_tokens": weights.sum()}
  return loss, metrics


def shift_right(targets: jnp.ndarray, segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Decoder inputs: targets shifted right with 0 (BOS = pad) in front, per packed segment."""
  shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  if segment_ids is not None:  # the first token of every packed segment starts from 0 again
    starts = segment_ids != jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
    shifted = jnp.where(starts, 0, shifted)
  return shifted


class EncoderDecoderModel:
  """Loss, scoring and decoding hooks for a `Transformer`; no optimiser or training state here."""

  def __init__(self, config: T5Config, *, z_loss: float = 1e-4, label_smoothing: float = 0.0,
               loss_normalize: Union[str, float, None] = "tokens"):
    self.config = config
    self.module = Transformer(config)
    self.z_loss, self.label_smoothing, self.loss_normalize = z_loss, label_smoothing, loss_normalize

  def init(self, rng: jax.Array, encoder_len: int = 8, decoder_len: int = 4) -> Params:
    """Parameters with logical-axis boxes (use `nn.unbox` for plain arrays, `nn.get_partition_spec`)."""
    enc = jnp.ones((1, encoder_len), jnp.int32)
    dec = jnp.ones((1, decoder_len), jnp.int32)
    return self.module.init(rng, enc, dec, dec)["params"]

  def logits(self, params: Params, batch: dict, *, dropout_rng: Optional[jax.Array] = None) -> jnp.ndarray:
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], batch.get("encoder_segment_ids"), batch.get("decoder_segment_ids"),
        enable_dropout=dropout_rng is not None, rngs=rngs)

  def loss_fn(self, params: Params, batch: dict, dropout_rng: Optional[jax.Array] = None
              ) -> tuple[jnp.ndarray, dict]:
    logits = self.logits(params, batch, dropout_rng=dropout_rng)
    return compute_loss(logits, batch["decoder_target_tokens"], batch.get("decoder_loss_weights"),
                        z_loss=self.z_loss, label_smoothing=self.label_smoothing,
                        normalize=self.loss_normalize, segment_ids=batch.get("decoder_segment_ids"))

  def score_batch(self, params: Params, batch: dict) -> jnp.ndarray:
    """Log-likelihood of each sequence's targets under teacher forcing: [batch] (ranking, rating)."""
    logits = self.logits(params, batch)
    targets = batch["decoder_target_tokens"]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(tok * (targets > 0), axis=-1)

  def decode_logits(self, params: Params, encoded: jnp.ndarray, encoder_tokens: jnp.ndarray,
                    targets: jnp.ndarray, output_tokens: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Teacher-forced logits [rows, len, vocab | len(output_tokens)] for target rows that share
    their example's encoder output: rows k*c .. k*c+c-1 belong to example k (c = rows / examples),
    so a prompt is encoded once however many candidates are scored against it."""
    return self.module.apply({"params": params}, encoded, encoder_tokens, shift_right(targets), targets,
                             output_tokens=output_tokens, method=Transformer.decode)

  # -- incremental decoding hooks ------------------------------------------------------------
  def encode(self, params: Params, encoder_tokens: jnp.ndarray) -> jnp.ndarray:
    return self.module.apply({"params": params}, encoder_tokens, method=Transformer.encode)

  def init_cache(self, batch_size: int, max_decode_length: int, encoder_len: int, beams: int = 1) -> dict:
    """An empty cache: per-beam self-attention keys/values for `max_decode_length` positions
    ([batch*beams, ...]) and per-example cross-attention keys/values ([batch, encoder_len, ...])."""
    enc = jnp.ones((batch_size, encoder_len), jnp.int32)
    dec = jnp.zeros((batch_size * beams, max_decode_length), jnp.int32)
    shapes = jax.eval_shape(lambda: self.module.init(
        jax.random.PRNGKey(0), enc, dec, decode=True, max_decode_length=max_decode_length)["cache"])
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def decode_step(self, params: Params, cache: dict, encoded: jnp.ndarray, encoder_tokens: jnp.ndarray,
                  token: jnp.ndarray, max_decode_length: int, output_tokens: Optional[jnp.ndarray] = None,
                  cross_from_cache: bool = False) -> tuple[jnp.ndarray, dict]:
    """Logits [b*beams, vocab or len(output_tokens)] for one new token per row at the cache's
    position, and the new cache. The first step computes (and caches) the cross-attention
    keys/values; later steps pass `cross_from_cache=True` and skip that work."""
    logits, mutated = self.module.apply(
        {"params": params, "cache": cache}, encoded, encoder_tokens, token[:, None], decode=True,
        max_decode_length=max_decode_length, output_tokens=output_tokens,
        cross_from_cache=cross_from_cache, method=Transformer.decode, mutable=["cache"])
    return logits[:, 0], mutated["cache"]
