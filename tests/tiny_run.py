"""One tiny training run (the ReAT mixture of the hand-made data set, tiny T5), the same in a test's process and
as a script in a process of its own that a test kills, signals, limits or gives 8 simulated devices:

    python tests/tiny_run.py DATA STEPS [MODEL_DIR EXTRA_JSON]...    (several runs share one start-up)

EXTRA_JSON holds train() keywords and fields of its config objects (`configs`). RECALIGN_TEST_FILE_SIZE=n: a disk that
refuses files over n bytes (what a full disk does to a save). A faults.RunError prints {"error", "message"}
and exits 2; a finished run prints {"loss", "devices"}."""
import json
import os
import sys


def configs(**flat) -> dict:
  """train() keywords from flat ones, as tests write them: DatasetConfig, ModelConfig (`network_config` is its
  `network`), CheckpointConfig and PartitionConfig fields gathered into those objects; the rest passed on."""
  from recalign import partitioning, trainer
  flat = {("network" if k == "network_config" else k): v for k, v in flat.items()}
  out = {}
  for key, cls in (("dataset", trainer.DatasetConfig), ("model", trainer.ModelConfig),
                   ("checkpoint", trainer.CheckpointConfig), ("partitioning", partitioning.PartitionConfig)):
    fields = {k: flat.pop(k) for k in cls.__dataclass_fields__ if k in flat}
    if fields:
      out[key] = cls(**fields)
  return {**out, **flat}


def train(data, model_dir, steps: int, **extra) -> dict:
  import recalign.tasks as rt
  from recalign import train as T
  from recalign import trainer
  from recalign.models.network import CONFIGS
  rt.register_dataset(data, config=rt.TaskConfig(num_candidates=3))
  kw = dict(mixture_or_task_name="tiny_reat", task_feature_lengths={"inputs": 128, "targets": 48}, batch_size=8,
            network_config=CONFIGS["tiny"].replace(dropout_rate=0.1), log_every=1, progress=False,
            schedule=trainer.learning_rate_schedule(base=1e-2, warmup_steps=5))
  return T.train(model_dir=str(model_dir), train_steps=steps, **configs(**{**kw, **extra}))


def main(argv: list[str]) -> None:
  if os.environ.get("RECALIGN_TEST_FILE_SIZE"):
    import resource
    import signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ["RECALIGN_TEST_FILE_SIZE"]),) * 2)
  import jax
  from recalign import faults
  data, steps, runs = argv[0], int(argv[1]), argv[2:]
  for model_dir, extra in zip(runs[::2], runs[1::2]):
    try:
      out = train(data, model_dir, steps, **json.loads(extra))
    except faults.RunError as e:
      print(json.dumps({"error": type(e).__name__, "message": str(e)}))
      sys.exit(2)
    print(json.dumps({"loss": out["loss"], "devices": jax.device_count()}))


if __name__ == "__main__":
  main(sys.argv[1:])
