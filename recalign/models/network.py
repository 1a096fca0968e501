"""T5.1.1 / FLAN-T5 (and original T5) encoder-decoder in pure flax.linen -- no training code.

Parameter names and shapes follow T5X (`token_embedder/embedding`, `encoder/layers_0/attention/query/
kernel` stored 2-D as [embed, heads*kv], `encoder/relpos_bias/rel_embedding` [heads, buckets], ...)
so T5X checkpoints map one to one, and every parameter carries logical axis names (`vocab`, `embed`,
`mlp`, `joined_kv`, `heads`, `relpos_buckets`) for partitioning rules.

Architecture (T5.1.1): pre-RMSNorm, gated-GELU MLP, no biases, relative position buckets (32
buckets, max distance 128; bidirectional in the encoder, causal in the decoder; one bias table per
stack, computed once), untied output projection. `T5Config(mlp_activations=("relu",),
logits_via_embedding=True)` is the original T5: ReLU MLP, tied embeddings, logits scaled by
emb_dim**-0.5. Attention logits are not scaled by 1/sqrt(d) (folded into the initialisation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

NEG_INF = -1e10


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  head_dim: int = 64
  mlp_dim: int = 1024
  mlp_activations: Sequence[str] = ("gelu", "linear")   # gated-GELU; ("relu",) for T5 1.0
  dropout_rate: float = 0.1
  logits_via_embedding: bool = False                     # True: tied output projection (T5 1.0)
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"                                 # compute dtype, e.g. "bfloat16"
  param_dtype: str = "float32"

  def replace(self, **kw) -> "T5Config":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_dict(cls, d: dict) -> "T5Config":
    """Inverse of `dataclasses.asdict` after a JSON round trip (lists back to tuples)."""
    return cls(**{**d, "mlp_activations": tuple(d["mlp_activations"])})


def padded_vocab_size(size: int, multiple: int = 128) -> int:
  """Embedding rows for a vocabulary, rounded up as T5 does (32,100 -> 32,128)."""
  return -(-size // multiple) * multiple


# Published FLAN-T5 (T5.1.1 LM-adapted) sizes; `tiny` is for tests.
CONFIGS = {
    "tiny": T5Config(vocab_size=512, emb_dim=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                     head_dim=8, mlp_dim=64, dropout_rate=0.0),
    # ~4M parameters with the project vocabulary: trains on a laptop CPU in minutes (the demo).
    "mini": T5Config(vocab_size=8192, emb_dim=128, num_heads=4, num_encoder_layers=3, num_decoder_layers=3,
                     head_dim=32, mlp_dim=512, dropout_rate=0.1),
    # TIGER's generative retrieval model (Rajput et al. 2023): 4+4 layers, d_model 128, 6 heads of 64.
    "tiger": T5Config(vocab_size=8192, emb_dim=128, num_heads=6, num_encoder_layers=4, num_decoder_layers=4,
                      head_dim=64, mlp_dim=1024, dropout_rate=0.1),
    # 2+2 layers of the mini's width: the fastest model that still learns item sequences on a CPU.
    "micro": T5Config(vocab_size=8192, emb_dim=128, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                      head_dim=32, mlp_dim=512, dropout_rate=0.1),
    "small": T5Config(emb_dim=512, num_heads=6, num_encoder_layers=8, num_decoder_layers=8, head_dim=64,
                      mlp_dim=1024),
    "base": T5Config(emb_dim=768, num_heads=12, num_encoder_layers=12, num_decoder_layers=12, head_dim=64,
                     mlp_dim=2048),
    "large": T5Config(emb_dim=1024, num_heads=16, num_encoder_layers=24, num_decoder_layers=24,
                      head_dim=64, mlp_dim=2816),
    "xl": T5Config(emb_dim=2048, num_heads=32, num_encoder_layers=24, num_decoder_layers=24, head_dim=64,
                   mlp_dim=5120),
    "xxl": T5Config(emb_dim=4096, num_heads=64, num_encoder_layers=24, num_decoder_layers=24,
                    head_dim=64, mlp_dim=10240),
}


def named_config(size: str, **overrides) -> T5Config:
  """`CONFIGS[size]` with fields replaced (`dropout_rate`, `dtype`, any dimension): what the gin model
  files call (gin/models/t5_1_1.gin), and `recalign demo --size`. None values are left as they are."""
  if size not in CONFIGS:
    raise ValueError(f"unknown model size {size!r}; sizes: {', '.join(CONFIGS)}")
  unknown = set(overrides) - {f.name for f in dataclasses.fields(T5Config)}
  if unknown:
    raise TypeError(f"named_config: T5Config has no field {', '.join(sorted(unknown))}")
  return CONFIGS[size].replace(**{k: v for k, v in overrides.items() if v is not None})


def _act(name: str) -> Callable:
  return {"gelu": functools.partial(jax.nn.gelu, approximate=True),  # = HF "gelu_new"
          "relu": jax.nn.relu, "linear": lambda x: x, "silu": jax.nn.silu}[name]


def _init(stddev: float):
  return nn.initializers.normal(stddev)


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(dtype))


class Dense(nn.Module):
  """y = x @ kernel, kernel stored 2-D [in, out] as in T5X, no bias."""
  features: int
  axes: tuple[str, str]
  stddev: float
  cfg: T5Config

  @nn.compact
  def __call__(self, x, columns: Optional[jnp.ndarray] = None):
    kernel = _param(self, "kernel", _init(self.stddev), (x.shape[-1], self.features), self.axes,
                    self.cfg.param_dtype)
    if columns is not None:  # only these outputs (constrained decoding's sliced projection)
      kernel = jnp.take(kernel, columns, axis=1)
    dt = jnp.dtype(self.cfg.dtype)
    return jnp.dot(x.astype(dt), kernel.astype(dt))


class RMSNorm(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x):
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",), self.cfg.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.layer_norm_epsilon)
    return (y * scale.astype(jnp.float32)).astype(jnp.dtype(self.cfg.dtype))


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int):
  """T5's bucketing of (memory position - query position)."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # float32 arithmetic as in the PyTorch reference, so bucket boundaries agree exactly
  ratio = np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)
  scaled = np.log(ratio) / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
  large = max_exact + scaled.astype(np.int32)
  large = np.minimum(large, num_buckets - 1)
  return ret + np.where(is_small, n, large)


class RelativePositionBiases(nn.Module):
  bidirectional: bool
  cfg: T5Config

  @nn.compact
  def __call__(self, qlen: int, klen: int):
    """Returns [1, heads, qlen, klen] biases (computed with numpy positions: static shapes)."""
    c = self.cfg
    ctx = np.arange(qlen)[:, None]
    mem = np.arange(klen)[None, :]
    buckets = relative_position_bucket(mem - ctx, self.bidirectional, c.relative_attention_num_buckets,
                                       c.relative_attention_max_distance)
    table = _param(self, "rel_embedding", _init(0.1), (c.num_heads, c.relative_attention_num_buckets),
                   ("heads", "relpos_buckets"), c.param_dtype)
    return jnp.take(table, jnp.asarray(buckets), axis=1)[None].astype(jnp.float32)


class Attention(nn.Module):
  cfg: T5Config
  decode_cache: bool = False   # self-attention of the decoder: keep a key/value cache

  @nn.compact
  def __call__(self, x_q, x_kv, bias, deterministic: bool, decode: bool = False,
               cross_from_cache: bool = False):
    """bias: additive [b|1, heads, q, k] (position biases + masks).

    Decoding: self-attention appends one position per call to its key/value cache; cross-attention
    stores the encoder's keys/values on the first call and, with `cross_from_cache`, reads them.
    """
    c = self.cfg
    inner = c.num_heads * c.head_dim
    dense = functools.partial(Dense, cfg=c)
    split = lambda t: t.reshape(t.shape[:-1] + (c.num_heads, c.head_dim))  # noqa: E731
    q = split(dense(inner, ("embed", "joined_kv"), (c.emb_dim * c.head_dim) ** -0.5, name="query")(x_q))
    kv_shape = x_kv.shape[:-1] + (c.num_heads, c.head_dim)
    cross_cached = decode and not self.decode_cache
    if cross_cached and cross_from_cache:
      k = self.get_variable("cache", "cross_key")
      v = self.get_variable("cache", "cross_value")
    else:
      k = split(dense(inner, ("embed", "joined_kv"), c.emb_dim ** -0.5, name="key")(x_kv))
      v = split(dense(inner, ("embed", "joined_kv"), c.emb_dim ** -0.5, name="value")(x_kv))
      if cross_cached:
        self.put_variable("cache", "cross_key", k)
        self.put_variable("cache", "cross_value", v)

    if decode and self.decode_cache:
      initialised = self.has_variable("cache", "cached_key")
      ck = self.variable("cache", "cached_key", jnp.zeros, kv_shape, k.dtype)
      cv = self.variable("cache", "cached_value", jnp.zeros, kv_shape, v.dtype)
      ci = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if initialised:  # one new position: write it into the cache and attend over the cache
        if q.shape[1] != 1:
          raise ValueError(f"incremental decoding takes one position at a time, got {q.shape[1]}")
        i = ci.value
        k = lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, i, 0, 0))
        v = lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, i, 0, 0))
        ck.value, cv.value, ci.value = k, v, i + 1
        bias = lax.dynamic_slice_in_dim(bias, i, 1, axis=2)  # the query's row of the full bias

    # Heads-major batched matmuls, and the softmax's division applied to the [q, d] output rather
    # than to the [q, k] weights: one pass less over the largest tensor (1.3-1.6x faster attention
    # on CPU than einsums over [b, q, h, d] with jax.nn.softmax; same values within 3e-6).
    qh, kh, vh = (t.swapaxes(1, 2) for t in (q, k, v))
    scores = jnp.matmul(qh, kh.swapaxes(-1, -2), preferred_element_type=jnp.float32) + bias
    e = jnp.exp(scores - lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    z = e.sum(axis=-1, keepdims=True)
    e = nn.Dropout(c.dropout_rate)(e, deterministic=deterministic)  # = dropout on the weights
    out = jnp.matmul(e.astype(v.dtype), vh, preferred_element_type=jnp.float32) / z
    out = out.astype(v.dtype).swapaxes(1, 2).reshape(q.shape[:-2] + (inner,))
    return dense(c.emb_dim, ("joined_kv", "embed"), inner ** -0.5, name="out")(out)


class MLP(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x, deterministic: bool):
    c = self.cfg
    acts = c.mlp_activations
    hs = []
    for i, a in enumerate(acts):
      name = "wi" if len(acts) == 1 else f"wi_{i}"
      hs.append(_act(a)(Dense(c.mlp_dim, ("embed", "mlp"), c.emb_dim ** -0.5, c, name=name)(x)))
    h = functools.reduce(lambda a, b: a * b, hs)
    h = nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    return Dense(c.emb_dim, ("mlp", "embed"), c.mlp_dim ** -0.5, c, name="wo")(h)


class EncoderLayer(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x, bias, deterministic: bool):
    drop = lambda y: nn.Dropout(self.cfg.dropout_rate)(y, deterministic=deterministic)  # noqa: E731
    h = RMSNorm(self.cfg, name="pre_attention_layer_norm")(x)
    x = x + drop(Attention(self.cfg, name="attention")(h, h, bias, deterministic))
    h = RMSNorm(self.cfg, name="pre_mlp_layer_norm")(x)
    return x + drop(MLP(self.cfg, name="mlp")(h, deterministic))


class DecoderLayer(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x, encoded, self_bias, cross_bias, deterministic: bool, decode: bool,
               cross_from_cache: bool = False):
    drop = lambda y: nn.Dropout(self.cfg.dropout_rate)(y, deterministic=deterministic)  # noqa: E731
    h = RMSNorm(self.cfg, name="pre_self_attention_layer_norm")(x)
    x = x + drop(Attention(self.cfg, decode_cache=True, name="self_attention")(
        h, h, self_bias, deterministic, decode))
    h = RMSNorm(self.cfg, name="pre_cross_attention_layer_norm")(x)
    # Beams (rows b*W .. b*W+W-1 of x) share example b's encoder output: they become W groups of
    # query positions of one row, so the encoder output and its keys/values are never tiled.
    b, q, e = h.shape
    h = h.reshape(encoded.shape[0], -1, e)
    y = Attention(self.cfg, name="encoder_decoder_attention")(
        h, encoded, cross_bias, deterministic, decode, cross_from_cache)
    x = x + drop(y.reshape(b, q, e))
    h = RMSNorm(self.cfg, name="pre_mlp_layer_norm")(x)
    return x + drop(MLP(self.cfg, name="mlp")(h, deterministic))


def _mask_bias(mask):
  """bool [b, q|1, k] -> additive [b, 1, q|1, k]."""
  return jnp.where(mask[:, None], 0.0, NEG_INF).astype(jnp.float32)


def _padding_mask(q_tokens, k_tokens, q_segments=None, k_segments=None):
  mask = (q_tokens > 0)[:, :, None] & (k_tokens > 0)[:, None, :]
  if q_segments is not None:  # packed examples attend only within their own segment
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
  return mask


class Embed(nn.Module):
  cfg: T5Config

  def setup(self):
    self.embedding = _param(self, "embedding", _init(1.0), (self.cfg.vocab_size, self.cfg.emb_dim),
                            ("vocab", "embed"), self.cfg.param_dtype)

  def __call__(self, tokens):
    return jnp.take(self.embedding, tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))

  def attend(self, x, rows: Optional[jnp.ndarray] = None):
    dt = jnp.dtype(self.cfg.dtype)
    table = self.embedding if rows is None else jnp.take(self.embedding, rows, axis=0)
    return jnp.dot(x.astype(dt), table.astype(dt).T)


class Encoder(nn.Module):
  cfg: T5Config
  embed: Embed

  @nn.compact
  def __call__(self, tokens, segment_ids=None, deterministic: bool = True):
    c = self.cfg
    x = nn.Dropout(c.dropout_rate)(self.embed(tokens), deterministic=deterministic)
    L = tokens.shape[1]
    bias = RelativePositionBiases(True, c, name="relpos_bias")(L, L)
    bias = bias + _mask_bias(_padding_mask(tokens, tokens, segment_ids, segment_ids))
    for i in range(c.num_encoder_layers):
      x = EncoderLayer(c, name=f"layers_{i}")(x, bias, deterministic)
    x = RMSNorm(c, name="encoder_norm")(x)
    return nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  cfg: T5Config
  embed: Embed

  @nn.compact
  def __call__(self, encoded, encoder_tokens, decoder_input_tokens, decoder_target_tokens=None,
               encoder_segment_ids=None, decoder_segment_ids=None, deterministic: bool = True,
               decode: bool = False, max_decode_length: Optional[int] = None,
               output_tokens: Optional[jnp.ndarray] = None, cross_from_cache: bool = False):
    """Logits [b, len, vocab]; with `output_tokens` [k] only those columns (a sliced projection)."""
    c = self.cfg
    x = nn.Dropout(c.dropout_rate)(self.embed(decoder_input_tokens), deterministic=deterministic)
    b, L = decoder_input_tokens.shape
    relpos = RelativePositionBiases(False, c, name="relpos_bias")
    if decode:
      # Incremental: the bias of every (query, key) pair up to the cache length; each layer takes the
      # current query's row. Keys after the current position are masked causally; padding is not
      # needed since the cache holds only generated tokens.
      T = max_decode_length or L
      causal = np.tril(np.ones((T, T), bool))
      self_bias = relpos(T, T) + jnp.where(causal, 0.0, NEG_INF)[None, None]
      cross_mask = (encoder_tokens > 0)[:, None, :]   # [b_enc, 1, k]: beams share their example's row
    else:
      target = decoder_input_tokens if decoder_target_tokens is None else decoder_target_tokens
      causal = np.tril(np.ones((L, L), bool))[None]
      valid = jnp.ones_like(decoder_input_tokens) if decoder_target_tokens is None else target
      self_mask = causal & _padding_mask(valid, valid, decoder_segment_ids, decoder_segment_ids)
      self_bias = relpos(L, L) + _mask_bias(self_mask)
      if b != encoded.shape[0]:  # several target rows per example share its encoder row (scoring)
        cross_mask = (encoder_tokens > 0)[:, None, :]
      else:
        cross_mask = _padding_mask(valid, encoder_tokens, decoder_segment_ids, encoder_segment_ids)
    cross_bias = _mask_bias(cross_mask)
    for i in range(c.num_decoder_layers):
      x = DecoderLayer(c, name=f"layers_{i}")(x, encoded, self_bias, cross_bias, deterministic, decode,
                                             cross_from_cache)
    x = RMSNorm(c, name="decoder_norm")(x)
    x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
    if c.logits_via_embedding:
      logits = self.embed.attend(x * (c.emb_dim ** -0.5), output_tokens)
    else:
      logits = Dense(c.vocab_size, ("embed", "vocab"), c.emb_dim ** -0.5, c, name="logits_dense")(
          x, output_tokens)
    return logits.astype(jnp.float32)


class Transformer(nn.Module):
  """encode / decode / __call__ as in T5X's EncoderDecoder network."""
  config: T5Config

  def setup(self):
    self.token_embedder = Embed(self.config)
    self.encoder = Encoder(self.config, self.token_embedder)
    self.decoder = Decoder(self.config, self.token_embedder)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, enable_dropout: bool = False):
    return self.encoder(encoder_input_tokens, encoder_segment_ids, deterministic=not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
             encoder_segment_ids=None, decoder_segment_ids=None, enable_dropout: bool = False,
             decode: bool = False, max_decode_length: Optional[int] = None,
             output_tokens: Optional[jnp.ndarray] = None, cross_from_cache: bool = False):
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                        encoder_segment_ids, decoder_segment_ids, deterministic=not enable_dropout,
                        decode=decode, max_decode_length=max_decode_length, output_tokens=output_tokens,
                        cross_from_cache=cross_from_cache)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
               encoder_segment_ids=None, decoder_segment_ids=None, enable_dropout: bool = False,
               decode: bool = False, max_decode_length: Optional[int] = None):
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       encoder_segment_ids, decoder_segment_ids, enable_dropout, decode, max_decode_length)


def param_shapes(config: T5Config) -> dict:
  """Parameter shapes (jax.ShapeDtypeStruct tree) without allocating anything."""
  model = Transformer(config)
  x = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, x)["params"])
  return nn.unbox(shapes)


def count_params(config: T5Config) -> int:
  return int(sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(param_shapes(config))))
