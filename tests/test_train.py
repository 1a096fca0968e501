import json
import subprocess
import sys

import pytest

from conftest import REPO, TRAIN_ENV, logged_losses as losses, run_two_processes, train_command, train_env
from tiny_run import configs


def test_data_and_model_parallel_on_8_devices_match_one_device(tiny_root):
  """Retrieval trained 6 steps on 1 device and on 8 as 4 x 2 (data x model parallel): the same losses (one
  process, one start-up; the kill / resume tests are in test_faults)."""
  task = {"mixture_or_task_name": "tiny_retrieval", "task_feature_lengths": {"inputs": 128, "targets": 16}}
  runs = {"one": {"num_devices": 1, **task}, "data4_model2": {"model_parallel": 2, **task}}
  r = subprocess.run(train_command(tiny_root, 6, *((tiny_root / f"par_{name}", extra) for name, extra in runs.items())),
                     env=train_env(8), check=True, capture_output=True, text=True)
  assert [json.loads(x)["devices"] for x in r.stdout.splitlines()[-2:]] == [8, 8]
  results = {name: losses(tiny_root / f"par_{name}") for name in runs}
  assert sorted(results["one"]) == list(range(1, 7))
  for step, loss in results["one"].items():
    assert results["data4_model2"][step] == pytest.approx(loss, rel=2e-4, abs=2e-4), step


def test_gin_files_parse_and_bind(tmp_path, monkeypatch):
  """A run is a model file + a run file + a mixture file (mixture files include no run file). The
  configs are package resources: package-qualified includes resolve from any working directory."""
  import gin
  from recalign import cli
  from recalign import trainer
  from recalign.models import network as nw
  from recalign.tasks import TaskConfig
  monkeypatch.chdir(tmp_path)
  (tmp_path / "runs").mkdir()       # folders named like the configs' folders must not confuse gin
  (tmp_path / "models").mkdir()
  gin_dir = REPO / "recalign" / "gin"
  # the repository's gin/ links to the package's configs (links, not a folder link: a gin/__init__.py
  # at the repository root would shadow the gin library)
  shipped = sorted(p.relative_to(gin_dir) for p in gin_dir.rglob("*.gin"))
  assert shipped and all((REPO / "gin" / f).resolve() == gin_dir / f for f in shipped)
  scratch = [str(gin_dir / "models" / "mini.gin"), str(gin_dir / "runs" / "from_scratch.gin")]
  for f, mixture in [("reat", "_reat"), ("raat", "_raat"), ("rpat", "_rpat"), ("ut", "_ut"), ("ut_at", "_ut_at"),
                     ("retrieval_aux", "_reat"), ("ut_at_itdr", "_ut_at_itdr"), ("reclm", "_reclm")]:
    gin.clear_config()
    cli.parse_gin(scratch + [str(gin_dir / f"{f}.gin")],
                  ["MODEL_DIR = '/tmp/x'", "BATCH_SIZE = 4", "ValidationConfig.every = 7",
                   "make_optimizer.name = 'adamw'"], [])
    assert trainer.ValidationConfig().every == 7 and gin.query_parameter("make_optimizer.name") == "adamw"
    assert gin.query_parameter("%MODEL_DIR") == "/tmp/x" and gin.query_parameter("%BATCH_SIZE") == 4
    assert gin.query_parameter("%MIXTURE_OR_TASK_NAME").endswith(mixture)
    assert gin.query_parameter("%LEARNING_RATE") == 1e-3 and gin.query_parameter("%WARMUP_STEPS") == 1000
    assert gin.query_parameter("%VOCABULARY") is None and gin.query_parameter("%DROPOUT_RATE") == 0.1
    assert TaskConfig().itdr == (f == "ut_at_itdr") and TaskConfig().reclm == (f == "reclm")
  # the CPU recipe's run file stands alone (it includes mini): compact collaborative-ID prompts, bf16,
  # no dropout -- whatever the order of the files, since model files set neither
  from recalign.tasks.registry import TaskConfig
  for files in (["runs/cpu_compact.gin"], ["runs/cpu_compact.gin", "models/mini.gin"],
                ["models/mini.gin", "runs/cpu_compact.gin"]):
    gin.clear_config()
    cli.parse_gin([str(gin_dir / f) for f in files],
                  ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'beauty_retrieval'"], [])
    cfg = TaskConfig()
    assert (cfg.item_prefix, cfg.with_titles, cfg.id_scheme) == (False, False, "collaborative")
    net = gin.query_parameter("%NETWORK_CONFIG").scoped_configurable_fn()
    assert net == nw.CONFIGS["mini"].replace(dtype="bfloat16", dropout_rate=0.0), files
  # the demo's bare recipe: compact's settings, the IDs alone, rsqrt decay
  gin.clear_config()
  cli.parse_gin([str(gin_dir / "runs" / "cpu_bare.gin")],
                ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'beauty_retrieval'"], [])
  cfg = TaskConfig()
  assert (cfg.prompt_words, cfg.item_prefix, cfg.id_scheme) == (False, False, "collaborative")
  assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == {"inputs": 96, "targets": 16}
  assert gin.query_parameter("learning_rate_schedule.decay") == "rsqrt"
  # the accelerator recipe: every training item a target, early stopping on the trained retrieval task, rsqrt decay
  gin.clear_config()
  cli.parse_gin([str(gin_dir / "runs" / "gpu_retrieval.gin")],
                ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'toys_retrieval'"], [])
  val = trainer.ValidationConfig()
  assert (val.task, val.patience, val.every, TaskConfig().train_examples) == ("toys_retrieval", 8, 1000, "prefixes")
  assert TaskConfig().id_scheme == "hybrid"   # the best converged CPU run's IDs (built with --leaf item)
  assert gin.query_parameter("learning_rate_schedule.decay") == "rsqrt"
  # a dimension overridden as in T5X; a misspelt one is an error
  gin.clear_config()
  cli.parse_gin(scratch + [str(gin_dir / "reat.gin")],
                ["MODEL_DIR = '/tmp/x'", "network.named_config.num_decoder_layers = 2"], [])
  assert gin.query_parameter("%NETWORK_CONFIG").scoped_configurable_fn().num_decoder_layers == 2
  with pytest.raises(TypeError, match="no field num_decoder_layer"):
    nw.named_config("mini", num_decoder_layer=2)
  gin.clear_config()
  with pytest.raises(ValueError, match="MODEL_DIR.*gin.REQUIRED"):
    cli.parse_gin(scratch + [str(gin_dir / "reat.gin")], [], [])
  gin.clear_config()
  with pytest.raises(ValueError, match="INITIAL_CHECKPOINT_PATH.*gin.REQUIRED"):
    cli.parse_gin([str(gin_dir / "models" / "base.gin"), str(gin_dir / "runs" / "finetune.gin"),
                   str(gin_dir / "reat.gin")], ["MODEL_DIR = '/tmp/x'"], [])
  # Fine-tuning keeps the checkpoint's vocabulary; the paper's settings, by package path from anywhere.
  for run, size, steps, batch in (("paper_base", "base", 10000, 64), ("paper_xl", "xl", 70000, 16)):
    gin.clear_config()
    cli.parse_gin([f"recalign/gin/runs/{run}.gin", "recalign/gin/reat.gin"],
                  ["MODEL_DIR = '/tmp/x'", "INITIAL_CHECKPOINT_PATH = '/ckpt'"], [])
    assert gin.query_parameter("%VOCABULARY") == "checkpoint" and gin.query_parameter("%MODEL_SIZE") == size
    assert (gin.query_parameter("%TRAIN_STEPS"), gin.query_parameter("%BATCH_SIZE")) == (steps, batch)
    assert gin.query_parameter("%LEARNING_RATE") == 1e-3 and gin.query_parameter("%WARMUP_STEPS") == 1000
  gin.clear_config()


def test_cli_splits_t5x_style_gin_flags():
  from recalign.cli import split_gin_args
  files, bindings, paths, rest = split_gin_args(
      ["train", "--gin_file=a.gin", "--gin_file", "b.gin", "--gin.MODEL_DIR='/tmp/r'",
       "--gin.TRAIN_STEPS", "5", "--gin_search_paths=x,y", "--module", "m"])
  assert files == ["a.gin", "b.gin"] and paths == ["x", "y"] and rest == ["train", "--module", "m"]
  assert bindings == ["MODEL_DIR = '/tmp/r'", "TRAIN_STEPS = 5"]


def test_initial_checkpoint_vocabulary_is_checked_and_resized_only_when_asked(tiny_root, tmp_path):
  """Step 0 of the warm-up has learning rate 0, so one step keeps the imported parameters exactly."""
  import jax
  import numpy as np
  from flax import linen as nn
  import recalign.tasks as rt
  from recalign import train as T
  from recalign.models import checkpoints as ck
  from recalign.models.model import EncoderDecoderModel
  from recalign.models.network import CONFIGS
  rt.register_dataset(tiny_root / "tiny", config=rt.TaskConfig(num_candidates=3))
  cfg = CONFIGS["tiny"].replace(vocab_size=640)          # another vocabulary than the tasks' 512 rows
  params = jax.tree_util.tree_map(np.asarray, nn.unbox(EncoderDecoderModel(cfg).init(jax.random.PRNGKey(9))))
  ck.save_hf(cfg, params, tmp_path / "hf")
  common = dict(mixture_or_task_name="tiny_reat", task_feature_lengths={"inputs": 128, "targets": 48},
                train_steps=1, batch_size=8, network_config=CONFIGS["tiny"], progress=False)
  with pytest.raises(ck.VocabularyMismatch, match=r"hf was trained with .*640 .*tiny/vocab/spm.model \(400 ids\)"):
    T.train(**configs(model_dir=str(tmp_path / "x"), initial_checkpoint_path=str(tmp_path / "hf"), **common))
  T.train(**configs(model_dir=str(tmp_path / "a"), initial_checkpoint_path=str(tmp_path / "hf"),
                    vocabulary_mismatch="resize", **common))
  got = ck.flatten(ck.load_params(tmp_path / "a" / "checkpoints" / "1"))
  want = ck.flatten(ck.resize_vocab(params, 512))
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=k)
  run = json.loads((tmp_path / "a" / "run.json").read_text())
  assert run["vocabulary"]["path"] == str((tiny_root / "tiny" / "vocab" / "spm.model").resolve())
  # A recalign checkpoint as INITIAL_CHECKPOINT_PATH: its run.json names the same vocabulary, no resize.
  T.train(**configs(model_dir=str(tmp_path / "b"), initial_checkpoint_path=str(tmp_path / "a" / "checkpoints" / "1"),
                    **common))
  again = ck.flatten(ck.load_params(tmp_path / "b" / "checkpoints" / "1"))
  np.testing.assert_allclose(again["token_embedder/embedding"], want["token_embedder/embedding"], atol=1e-6)
  with pytest.raises(ValueError, match="do not match the model config"):
    T.train(**configs(model_dir=str(tmp_path / "c"), initial_checkpoint_path=str(tmp_path / "a" / "checkpoints" / "1"),
                      **{**common, "network_config": CONFIGS["tiny"].replace(mlp_dim=32)}))


def test_finetuning_uses_the_checkpoint_vocabulary_and_matches_transformers_loss(tiny_root, tmp_path):
  """A tiny Hugging Face T5 saved with its own (T5-like) SentencePiece model: VOCABULARY='checkpoint'
  registers the tasks on that vocabulary, the embeddings are used as they are, and the loss of the
  first batch equals the loss transformers computes for the same token ids."""
  import numpy as np
  import torch
  import transformers
  import recalign.tasks as rt
  from conftest import train_t5_like_vocab
  from recalign import train as T
  from recalign import trainer
  from recalign.data import PreparedData
  from recalign.data.vocab import load_vocabulary
  from recalign.models import checkpoints as ck
  from recalign.models.network import padded_vocab_size
  hf_dir = tmp_path / "hf"
  train_t5_like_vocab(PreparedData.load(tiny_root / "tiny"), hf_dir / "spiece.model")
  t5_vocab = load_vocabulary(hf_dir)
  rows = padded_vocab_size(t5_vocab.vocab_size)
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=rows, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
  hf.save_pretrained(hf_dir)
  lengths = {"inputs": 128, "targets": 48}
  out = T.train(model_dir=str(tmp_path / "ft"), train_steps=1, progress=False,
                dataset=trainer.DatasetConfig("tiny_reat", lengths, 8, data_dirs=[str(tiny_root / "tiny")], pack=False),
                model=trainer.ModelConfig(ck.config_from_hf(json.loads((hf_dir / "config.json").read_text())),
                                          initial_checkpoint_path=str(hf_dir), vocabulary="checkpoint", z_loss=0.0))
  run = json.loads((tmp_path / "ft" / "run.json").read_text())
  assert run["vocabulary"]["path"] == str((hf_dir / "spiece.model").resolve())
  task_vocab = rt.registry.get_vocabulary(rt.get("tiny_reat"))
  assert task_vocab.sp_model == t5_vocab.sp_model and task_vocab.vocab_size == t5_vocab.vocab_size
  batch = next(trainer.InputBatches(rt.get("tiny_reat"), lengths, 8, seed=0, pack=False))
  assert batch["encoder_input_tokens"].max() >= 100          # ids from the T5-like model, not cut
  with torch.no_grad():
    enc = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
    tgt = torch.tensor(batch["decoder_target_tokens"], dtype=torch.long)
    loss = hf(input_ids=enc, attention_mask=enc > 0, labels=torch.where(tgt > 0, tgt, -100)).loss.item()
  assert out["loss"] == pytest.approx(loss, rel=1e-4)
  assert np.isfinite(loss)
  rt.unregister("tiny")   # registered on the checkpoint's vocabulary: the next tests register their own


MULTI = r'''
import json, sys
import jax
import gin
import recalign.tasks as rt
from recalign import train as T
from recalign import trainer
from recalign.models.network import CONFIGS
data, model_dir = sys.argv[1], sys.argv[2]
rt.register_dataset(data, config=rt.TaskConfig(num_candidates=3))
gin.bind_parameter("learning_rate_schedule.warmup_steps", 5)
gin.bind_parameter("learning_rate_schedule.base", 1e-2)
out = T.train(model_dir=model_dir, train_steps=12, log_every=1, progress=False,
              dataset=trainer.DatasetConfig("tiny_reat", {"inputs": 128, "targets": 48}, 8),
              model=trainer.ModelConfig(CONFIGS["tiny"].replace(dropout_rate=0.0)),
              checkpoint=trainer.CheckpointConfig(every=6))
print("RESULT", json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                            "devices": jax.device_count(), "loss": out["loss"]}))
'''


@pytest.mark.slow   # CI keeps the mesh parity above and test_eval_job's two-process evaluation
def test_two_processes_train_on_the_union_of_their_shards(tiny_root):
  """A real multi-process run (2 processes x 2 CPU devices, gloo collectives), launched the way the
  README launches multi-node GPUs: JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
  import jax
  import numpy as np

  import recalign.tasks as rt
  from flax import linen as nn
  from recalign import trainer
  from recalign.models.model import EncoderDecoderModel
  from recalign.models.network import CONFIGS, padded_vocab_size

  script, model_dir = tiny_root / "multi.py", tiny_root / "multi"
  script.write_text(MULTI)
  results = run_two_processes(script, [str(tiny_root / "tiny"), str(model_dir)], timeout=600)
  assert [r["process"] for r in results] == [0, 1] and results[0]["devices"] == 4
  assert results[0]["loss"] == results[1]["loss"]          # one global computation
  logged = losses(model_dir)                                 # written by process 0 only
  assert sorted(logged) == list(range(1, 13)) and logged[12] < logged[1]
  assert {p.name for p in (model_dir / "checkpoints").iterdir()} >= {"6", "12"}

  # Step 1's loss is the loss of the initial parameters on the global batch = process 0's local
  # batch followed by process 1's, each packed from its own seqio shard.
  rt.register_dataset(tiny_root / "tiny", config=rt.TaskConfig(num_candidates=3))
  task, lengths = rt.get("tiny_reat"), {"inputs": 128, "targets": 48}
  local = []
  for pid in range(2):
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(jax, "process_count", lambda: 2)
      mp.setattr(jax, "process_index", lambda pid=pid: pid)
      local.append(next(trainer.InputBatches(task, lengths, 8, seed=0, pack=True)))
  batch = {k: np.concatenate([local[0][k], local[1][k]]) for k in local[0]}
  vocab = rt.registry.get_vocabulary(task)
  model = EncoderDecoderModel(CONFIGS["tiny"].replace(dropout_rate=0.0, vocab_size=padded_vocab_size(vocab.vocab_size)))
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  expected = float(model.loss_fn(params, batch)[0])
  assert logged[1] == pytest.approx(expected, rel=1e-4)
  # and the two shards are different data
  assert not np.array_equal(local[0]["encoder_input_tokens"], local[1]["encoder_input_tokens"])


def test_settings_that_would_fail_after_training_are_errors_before_the_first_step(tiny_root, capsys):
  import recalign.tasks as rt
  from recalign import train as T
  from recalign import trainer
  from recalign.models.network import CONFIGS
  rt.register_dataset(tiny_root / "tiny", config=rt.TaskConfig(num_candidates=3))
  kw = configs(mixture_or_task_name="tiny_retrieval", task_feature_lengths={"inputs": 128, "targets": 16},
               batch_size=4, network_config=CONFIGS["tiny"], log_every=1, progress=False)
  with pytest.raises(ValueError, match="ValidationConfig.task is not"):
    T.train(model_dir=str(tiny_root / "no_val"), train_steps=2, validation=trainer.ValidationConfig(every=1), **kw)
  with pytest.raises(ValueError, match=r"'ndcg@10' is not reported by tiny_ranking.*score/ndcg@10"):
    T.train(model_dir=str(tiny_root / "bad_metric"), train_steps=2,
            validation=trainer.ValidationConfig(every=1, task="tiny_ranking", selection_metric="ndcg@10"), **kw)
  assert not any((tiny_root / "bad_metric" / f).exists() for f in ("train_log.jsonl", "run.json"))
  # Without a selection metric, the task's headline one: rating selects by AUC (the demo's RpAT run).
  out = T.train(model_dir=str(tiny_root / "rating_val"), train_steps=1,
                validation=trainer.ValidationConfig(every=1, task="tiny_rating"), **kw)
  assert out["best"]["selection_metric"] == "auc" and 0.0 <= out["best"]["metrics"]["auc"] <= 1.0
  # A finished run, started again: says so and reports its last step instead of returning nothing.
  first = T.train(model_dir=str(tiny_root / "done"), train_steps=2, **kw)
  again = T.train(model_dir=str(tiny_root / "done"), train_steps=2, **kw)
  assert again["step"] == first["step"] == 2 and again["loss"] == pytest.approx(first["loss"])
  assert "already at step 2" in capsys.readouterr().out


def test_recalign_train_cli_runs_in_a_fresh_process(tiny_root):
  """`recalign train` as a user runs it (a new process, gin locked after parsing), without validation."""
  model_dir = tiny_root / "cli_run"
  gin_dir = REPO / "recalign" / "gin"
  argv = ["train", f"--gin_file={gin_dir / 'models' / 'tiny.gin'}",
          f"--gin_file={gin_dir / 'runs' / 'from_scratch.gin'}",
          f"--gin.DATA_DIRS=['{tiny_root / 'tiny'}']", "--gin.MIXTURE_OR_TASK_NAME='tiny_retrieval'",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 16}", "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=4",
          f"--gin.MODEL_DIR='{model_dir}'", "--gin.TaskConfig.num_candidates=3", "--gin.CheckpointConfig.every=1"]
  code = "import sys; from recalign.cli import main; sys.exit(main(sys.argv[1:]))"
  r = subprocess.run([sys.executable, "-c", code, *argv], env=TRAIN_ENV, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads((model_dir / "run.json").read_text())["mixture_or_task_name"] == "tiny_retrieval"
  assert (model_dir / "checkpoints" / "1").exists()


def test_eval_results_survive_checkpoint_rotation(tiny_root):
  """orbax deletes old checkpoints (keep=1 here); results of evaluating them live in MODEL_DIR/eval."""
  import recalign.tasks as rt
  from recalign import cli
  from recalign import train as T
  from recalign.models.network import CONFIGS
  rt.register_dataset(tiny_root / "tiny", config=rt.TaskConfig(num_candidates=3))
  run = tiny_root / "rotate"
  kw = configs(model_dir=str(run), mixture_or_task_name="tiny_retrieval", data_dirs=[str(tiny_root / "tiny")],
               task_config=rt.TaskConfig(num_candidates=3), task_feature_lengths={"inputs": 128, "targets": 16},
               batch_size=4, network_config=CONFIGS["tiny"], progress=False, every=1, keep=1)
  T.train(train_steps=1, **kw)
  assert cli.main(["eval", "--checkpoint", str(run / "checkpoints" / "1"), "--task", "tiny_retrieval",
                   "--split", "validation", "--beam", "2", "--batch", "4"]) == 0
  T.train(train_steps=3, **kw)
  assert not (run / "checkpoints" / "1").exists()                 # rotated away ...
  metrics = json.loads((run / "eval" / "1" / "metrics_tiny_retrieval_validation.json").read_text())
  assert metrics["protocol"] == "full catalogue" and 0.0 <= metrics["ndcg@10"] <= 1.0     # ... its results kept
  (entry,) = [json.loads(x) for x in (run / "eval" / "evaluated.jsonl").read_text().splitlines()]
  assert (entry["step"], entry["task"], entry["split"], entry["output"]) == (1, "tiny_retrieval", "validation", "1")


def test_early_stopping_on_validation_patience_survives_a_resume(tiny_root):
  """patience=2: validations 0.1, 0.3, 0.2, 0.25 -> the best is step 2, two without a new best stop the run
  at step 4 (checkpoint saved, early_stop.json written) long before TRAIN_STEPS; started again, it trains
  nothing. A run interrupted after step 3 and resumed stops at the same step."""
  import recalign.tasks as rt
  from recalign import train as T
  from recalign import trainer
  from recalign.models.network import CONFIGS
  rt.register_dataset(tiny_root / "tiny", config=rt.TaskConfig(num_candidates=3))
  script = iter([0.1, 0.3, 0.2, 0.25, 0.9, 0.9])
  fake = lambda model, params: {"ndcg@10": next(script)}  # noqa: E731
  kw = configs(mixture_or_task_name="tiny_retrieval", task_feature_lengths={"inputs": 128, "targets": 16},
               batch_size=4, network_config=CONFIGS["tiny"], log_every=1, progress=False, train_steps=50,
            validation=trainer.ValidationConfig(every=1, task="tiny_retrieval", patience=2))
  model_dir = tiny_root / "early"
  out = T.train(model_dir=str(model_dir), validate_fn=fake, **kw)
  assert out["step"] == 4 and out["best"]["step"] == 2
  assert json.loads((model_dir / "early_stop.json").read_text())["step"] == 4
  assert "4" in {p.name for p in (model_dir / "checkpoints").iterdir()}
  again = T.train(model_dir=str(model_dir), validate_fn=fake, **kw)
  assert again["step"] == 4 and next(script) == 0.9           # no validation ran, nothing trained

  script = iter([0.1, 0.3, 0.2, 0.25, 0.9])
  split = tiny_root / "early_resumed"
  T.train(model_dir=str(split), validate_fn=fake, **{**kw, "train_steps": 3})
  resumed = T.train(model_dir=str(split), validate_fn=fake, **kw)
  assert resumed["step"] == 4 and json.loads((split / "early_stop.json").read_text())["step"] == 4


def test_moving_average_of_the_parameters_is_validated_kept_and_read(tiny_root):
  """EMA_DECAY: every step the state's ema_params move toward the new parameters at `ema_rate` (hand-checked
  from the saved checkpoints: (1 + s) / (10 + s) early, then the decay); validation scores the average and the
  raw parameters beside it (raw_too), MODEL_DIR/best keeps the average, and checkpoint readers get it. A
  resume with the other setting, and a decay outside (0, 1), are refused by name."""
  import jax
  import numpy as np
  import pytest
  from recalign import trainer
  from recalign.models import checkpoints as ck
  from tiny_run import train as train_tiny

  def total(tree) -> float:   # a fingerprint of a parameter tree
    return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree_util.tree_leaves(tree)))

  seen = []

  def fingerprint(model, params):
    seen.append(total(params))
    return {"ndcg@10": 1.0 + len(seen)}   # rises: every validation is a new best

  model_dir = tiny_root / "ema"
  train_tiny(tiny_root / "tiny", model_dir, 4, ema_decay=0.25, every=1, keep=None, validate_fn=fingerprint,
             validation=trainer.ValidationConfig(every=2, task="tiny_retrieval", raw_too=True))
  states = {s: ck._restore_numpy(model_dir / "checkpoints" / str(s) / "default") for s in (1, 2, 3, 4)}
  for s in (2, 3, 4):   # the update of step s (0-based: s - 1), from the saved states alone
    d = min(0.25, s / (9 + s))
    for e, e_prev, p in zip(*(jax.tree_util.tree_leaves(x) for x in (
        states[s]["ema_params"], states[s - 1]["ema_params"], states[s]["params"]))):
      np.testing.assert_allclose(e, d * e_prev + (1 - d) * p, rtol=1e-5, atol=1e-7)
  assert total(states[4]["ema_params"]) != pytest.approx(total(states[4]["params"]), rel=1e-6)
  val = [json.loads(x) for x in (model_dir / "validation_log.jsonl").read_text().splitlines()]
  assert [v["step"] for v in val] == [2, 4] and [v["raw/ndcg@10"] - v["ndcg@10"] for v in val] == [1.0, 1.0]
  assert seen == pytest.approx([total(states[2]["ema_params"]), total(states[2]["params"]),
                                total(states[4]["ema_params"]), total(states[4]["params"])], rel=1e-6)
  assert total(ck.load_params(model_dir / "best")) == pytest.approx(total(states[4]["ema_params"]), rel=1e-6)
  assert total(ck.load_params(model_dir / "checkpoints" / "3")) == pytest.approx(total(states[3]["ema_params"]),
                                                                                 rel=1e-6)
  with pytest.raises(ValueError, match="EMA_DECAY = 0.25, not None"):
    train_tiny(tiny_root / "tiny", model_dir, 6, every=1, keep=None)
  with pytest.raises(ValueError, match="EMA_DECAY must be between 0 and 1"):
    train_tiny(tiny_root / "tiny", tiny_root / "ema_bad", 2, ema_decay=1.0)
  with pytest.raises(ValueError, match="raw_too validates the trained parameters beside their moving average"):
    train_tiny(tiny_root / "tiny", tiny_root / "ema_bad", 2, validate_fn=fingerprint,
               validation=trainer.ValidationConfig(every=2, task="tiny_retrieval", raw_too=True))
