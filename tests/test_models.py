import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import linen as nn  # noqa: E402

from recalign.models import checkpoints as ck  # noqa: E402
from recalign.models import network as nw  # noqa: E402
from recalign.models.model import EncoderDecoderModel, compute_loss, shift_right  # noqa: E402


def hf_model(tmp_path, proj: str, tie: bool, **kw):
  cfg = transformers.T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                              num_decoder_layers=3, num_heads=4, feed_forward_proj=proj,
                              tie_word_embeddings=tie, dropout_rate=0.0, decoder_start_token_id=0)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # non-trivial norms and biases, so that a mis-mapped tensor shows
    for name, p in model.named_parameters():
      if "layer_norm" in name or "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "layer_norm" in name else 0.0))
  model.save_pretrained(tmp_path, **kw)
  return model


def batch(seed=0, b=3, le=21, ld=12, vocab=120):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, (b, le))
  enc[0, 15:] = 0
  enc[2, 5:] = 0
  tgt = rng.integers(2, vocab, (b, ld))
  tgt[1, 8:] = 0
  return enc, tgt, np.asarray(shift_right(jnp.asarray(tgt)))


@pytest.mark.parametrize("proj,tie", [("gated-gelu", False), ("relu", True)], ids=["t5.1.1", "t5.1.0"])
def test_logits_equal_pytorch_reference_with_padding(tmp_path, proj, tie):
  ref_model = hf_model(tmp_path, proj, tie)
  cfg, params = ck.load_hf(tmp_path)
  assert cfg.logits_via_embedding == tie and cfg.mlp_activations[0] == ("gelu" if tie is False else "relu")
  enc, tgt, dec = batch()
  with torch.no_grad():
    ref = ref_model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                    decoder_input_ids=torch.tensor(dec), decoder_attention_mask=torch.tensor(tgt > 0)).logits
  ours = nw.Transformer(cfg).apply({"params": params}, enc, dec, tgt)
  real = tgt > 0
  np.testing.assert_allclose(np.asarray(ours)[real], ref.numpy()[real], atol=1e-4, rtol=0)
  # The scoring hook: teacher-forced log-likelihoods equal the reference's.
  model = EncoderDecoderModel(cfg)
  scores = model.score_batch(params, {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
                                      "decoder_target_tokens": tgt})
  logp = torch.log_softmax(ref, -1).gather(-1, torch.tensor(tgt)[..., None])[..., 0] * torch.tensor(real)
  np.testing.assert_allclose(np.asarray(scores), logp.sum(-1).numpy(), atol=1e-4)


def test_incremental_decoding_with_cache_equals_full_forward(tmp_path):
  hf_model(tmp_path, "gated-gelu", False)
  cfg, params = ck.load_hf(tmp_path)
  model = EncoderDecoderModel(cfg)
  enc, tgt, dec = batch(1)
  tgt[:] = np.where(tgt > 0, tgt, 5)  # no padding inside the generated prefix
  dec = np.asarray(shift_right(jnp.asarray(tgt)))
  full = np.asarray(nw.Transformer(cfg).apply({"params": params}, enc, dec))
  T = dec.shape[1]
  encoded = model.encode(params, jnp.asarray(enc))
  cache = model.init_cache(enc.shape[0], T, enc.shape[1])
  step = jax.jit(model.decode_step, static_argnums=5)
  steps = []
  for t in range(T):
    logits, cache = step(params, cache, encoded, jnp.asarray(enc), jnp.asarray(dec[:, t]), T)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.stack(steps, 1), full, atol=1e-4)


def test_parameter_counts_match_published_flan_t5():
  # Computed from shapes only (jax.eval_shape): nothing of 2.85B parameters is allocated.
  assert nw.count_params(nw.CONFIGS["small"]) == 76_961_152
  assert nw.count_params(nw.CONFIGS["base"]) == 247_577_856
  assert nw.count_params(nw.CONFIGS["xl"]) == 2_849_757_184


def test_params_carry_t5x_names_and_logical_axes():
  model = EncoderDecoderModel(nw.CONFIGS["tiny"])
  boxed = model.init(jax.random.PRNGKey(0))
  specs = ck.flatten(nn.get_partition_spec(boxed))
  assert tuple(specs["encoder/layers_0/attention/query/kernel"]) == ("embed", "joined_kv")
  assert tuple(specs["decoder/layers_1/mlp/wi_0/kernel"]) == ("embed", "mlp")
  assert tuple(specs["token_embedder/embedding"]) == ("vocab", "embed")
  assert tuple(specs["decoder/relpos_bias/rel_embedding"]) == ("heads", "relpos_buckets")
  assert tuple(specs["decoder/logits_dense/kernel"]) == ("embed", "vocab")


def test_export_round_trip_and_sharded_import(tmp_path):
  cfg = nw.CONFIGS["tiny"]
  params = jax.tree_util.tree_map(np.asarray, nn.unbox(EncoderDecoderModel(cfg).init(jax.random.PRNGKey(3))))
  ck.save_hf(cfg, params, tmp_path / "export")
  ref_model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
  enc, tgt, dec = batch(2, vocab=cfg.vocab_size)
  with torch.no_grad():
    ref = ref_model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                    decoder_input_ids=torch.tensor(dec), decoder_attention_mask=torch.tensor(tgt > 0)).logits
  ours = np.asarray(nw.Transformer(cfg).apply({"params": params}, enc, dec, tgt))
  np.testing.assert_allclose(ours[tgt > 0], ref.numpy()[tgt > 0], atol=1e-4)
  # Re-saved by transformers in shards, imported back to the same parameters.
  ref_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  cfg2, params2 = ck.load_hf(tmp_path / "sharded")
  assert cfg2.replace(dropout_rate=0.0) == cfg.replace(dropout_rate=0.0)
  for k, v in ck.flatten(params).items():
    np.testing.assert_array_equal(ck.flatten(params2)[k], v, err_msg=k)


def test_vocabulary_resize_keeps_first_rows(tmp_path):
  hf_model(tmp_path, "gated-gelu", False)
  cfg, params = ck.load_hf(tmp_path)
  small_cfg, small = ck.load_hf(tmp_path, vocab_size=100)
  assert small_cfg.vocab_size == 100 and small["token_embedder"]["embedding"].shape == (100, 32)
  enc, tgt, dec = batch(4, vocab=100)
  full = np.asarray(nw.Transformer(cfg).apply({"params": params}, enc, dec))
  cut = np.asarray(nw.Transformer(small_cfg).apply({"params": small}, enc, dec))
  np.testing.assert_allclose(cut, full[..., :100], atol=1e-5)
  grown = ck.resize_vocab(params, 130)
  assert grown["decoder"]["logits_dense"]["kernel"].shape == (32, 130)
  np.testing.assert_array_equal(grown["token_embedder"]["embedding"][:120], params["token_embedder"]["embedding"])


def test_t5x_import_orbax_and_legacy_tensorstore(tmp_path):
  import orbax.checkpoint as ocp
  import tensorstore as ts
  from flax import serialization
  cfg = nw.CONFIGS["tiny"]
  params = jax.tree_util.tree_map(np.asarray, nn.unbox(EncoderDecoderModel(cfg).init(jax.random.PRNGKey(5))))
  ocp.PyTreeCheckpointer().save(str(tmp_path / "orbax" / "checkpoint_100"),
                                {"target": params, "state": {"step": np.int32(100)}})
  loaded = ck.load_t5x(tmp_path / "orbax" / "checkpoint_100")
  for k, v in ck.flatten(params).items():
    np.testing.assert_array_equal(ck.flatten(loaded)[k], v, err_msg=k)

  # Legacy T5X: msgpack with big arrays replaced by tensorstore specs of zarr folders.
  legacy = tmp_path / "legacy" / "checkpoint_100"
  legacy.mkdir(parents=True)
  def write(tree, name):
    if isinstance(tree, dict):
      return {k: write(v, f"{name}.{k}") for k, v in tree.items()}
    if tree.size < 100:
      return tree
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": name},
            "metadata": {"shape": list(tree.shape), "dtype": "<f4"}}
    full = {**spec, "kvstore": {"driver": "file", "path": str(legacy / name)}}
    ts.open(full, create=True).result().write(tree).result()
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": name}}
  state = {"target": write(params, "target"), "state": {"step": 100}}
  (legacy / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
  loaded = ck.load_t5x(legacy)
  for k, v in ck.flatten(params).items():
    np.testing.assert_array_equal(ck.flatten(loaded)[k], v, err_msg=k)


def test_loss_on_hand_computed_case():
  logits = jnp.array([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])   # one sequence, two target tokens
  targets = jnp.array([[0 + 2, 1]])                             # token 2, then token 1
  lse0, lse1 = np.log(np.exp(2) + 2), np.log(np.exp(1) + 2)
  ce = np.array([lse0 - 0.0, lse1 - 1.0])
  loss, m = compute_loss(logits, targets, z_loss=0.0)
  np.testing.assert_allclose(loss, ce.mean(), rtol=1e-6)
  loss, m = compute_loss(logits, targets, z_loss=1e-2, normalize=None)
  np.testing.assert_allclose(loss, ce.sum() + 1e-2 * (lse0 ** 2 + lse1 ** 2), rtol=1e-6)
  assert m["accuracy"] == 0.5 and m["target_tokens"] == 2
  # A padded token (0) is ignored; per-sequence normalisation averages per-sequence means.
  loss, _ = compute_loss(jnp.concatenate([logits, logits]), jnp.array([[2, 1], [2, 0]]), z_loss=0.0,
                         normalize="sequence")
  np.testing.assert_allclose(loss, (ce.mean() + ce[0]) / 2, rtol=1e-6)
  # Label smoothing: the best achievable loss is 0 after subtracting the normalising constant.
  ls = 0.1
  best = jnp.log(jnp.array([[[ls / 2, ls / 2, 1 - ls]]]))
  loss, _ = compute_loss(best, jnp.array([[2]]), z_loss=0.0, label_smoothing=ls)
  np.testing.assert_allclose(loss, 0.0, atol=1e-5)


def test_per_sequence_normalisation_splits_packed_rows_by_segment():
  """AVERAGE_PER_SEQUENCE on a packed row equals the mean over its sequences of their mean token loss
  (the value of the same sequences unpacked); per token, a long target weighs more."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32)
  targets = jnp.array([[3, 4, 1, 2, 1, 0], [4, 4, 4, 2, 1, 0]])
  segments = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 0]])   # row 0 packs two sequences
  tok = -jax.nn.log_softmax(logits)[np.arange(2)[:, None], np.arange(6)[None], targets]
  seqs = [tok[0, :3], tok[0, 3:5], tok[1, :5]]
  loss, _ = compute_loss(logits, targets, z_loss=0.0, normalize="AVERAGE_PER_SEQUENCE", segment_ids=segments)
  np.testing.assert_allclose(loss, np.mean([np.mean(x) for x in seqs]), rtol=1e-5)
  per_token, _ = compute_loss(logits, targets, z_loss=0.0, normalize="NUM_REAL_TARGET_TOKENS", segment_ids=segments)
  np.testing.assert_allclose(per_token, np.mean(np.concatenate(seqs)), rtol=1e-5)
  with pytest.raises(ValueError, match="loss normalisation"):
    compute_loss(logits, targets, normalize="PER_TASK")


def test_bfloat16_compute_is_close_to_float32():
  cfg = nw.CONFIGS["tiny"]
  params = nn.unbox(EncoderDecoderModel(cfg).init(jax.random.PRNGKey(1)))
  enc, tgt, dec = batch(5, vocab=cfg.vocab_size)
  f32 = nw.Transformer(cfg).apply({"params": params}, enc, dec, tgt)
  b16 = nw.Transformer(cfg.replace(dtype="bfloat16")).apply({"params": params}, enc, dec, tgt)
  assert b16.dtype == jnp.float32 and not np.array_equal(f32, b16)
  np.testing.assert_allclose(b16, f32, atol=0.15 * float(jnp.abs(f32).max()))


def test_gin_model_files_bind_the_published_sizes():
  """Every size file is the base file + MODEL_SIZE: the dimensions are network.CONFIGS's."""
  import gin
  from pathlib import Path
  root = Path(__file__).resolve().parent.parent / "recalign" / "gin" / "models"

  @gin.configurable
  def holder(value=gin.REQUIRED):
    return value

  for size in ("tiny", "mini", "small", "base", "large", "xl", "xxl"):
    assert "network.T5Config" not in (root / f"{size}.gin").read_text()
    gin.clear_config()
    gin.parse_config_file(str(root / f"{size}.gin"))   # dropout and dtype come from the run file
    gin.parse_config(["DROPOUT_RATE = 0.3", "ACTIVATION_DTYPE = 'bfloat16'", "holder.value = %NETWORK_CONFIG"])
    assert holder() == nw.CONFIGS[size].replace(dropout_rate=0.3, dtype="bfloat16"), size
  gin.clear_config()
