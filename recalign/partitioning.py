"""Partitioning, as T5X's partitioning.py: a ('data', 'model') mesh over the devices, parameters placed
by logical-axis rules (model parallelism splits MLP, heads and the vocabulary), batches split over
'data', and multi-host start-up. Training and evaluation both place parameters through here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import gin
import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from recalign.models.model import EncoderDecoderModel

# T5X's standard logical-axis rules: model parallelism splits MLP, heads and the vocabulary.
LOGICAL_AXIS_RULES = (("batch", "data"), ("vocab", "model"), ("embed", None), ("mlp", "model"),
                      ("heads", "model"), ("kv", None), ("joined_kv", "model"), ("relpos_buckets", None))


def make_mesh(model_parallel: int = 1, num_devices: Optional[int] = None, *, local: bool = False) -> Mesh:
  """A ('data', 'model') mesh over all devices (`local`: this process's own, as evaluation uses)."""
  devices = np.array((jax.local_devices() if local else jax.devices())[:num_devices])
  if len(devices) % model_parallel:
    raise ValueError(f"{len(devices)} devices cannot be split into model-parallel groups of {model_parallel}")
  return Mesh(devices.reshape(-1, model_parallel), ("data", "model"))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PartitionConfig:
  """How a run lays out its devices (T5X's partitioner settings): `model_parallel` devices share each
  parameter (MODEL_PARALLEL, the same macro `recalign eval` reads), the rest split the batch; `num_devices`
  uses only the first N (None: all)."""
  model_parallel: int = 1
  num_devices: Optional[int] = None

  def mesh(self, *, local: bool = False) -> Mesh:
    return make_mesh(self.model_parallel, self.num_devices, local=local)


def param_shardings(model: EncoderDecoderModel, mesh: Mesh):
  """Each parameter's NamedSharding under LOGICAL_AXIS_RULES (as training places them)."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_AXIS_RULES)


def place_params(model: EncoderDecoderModel, params, mesh: Mesh):
  """Parameters (numpy or jax) onto the mesh, sharded as in training: evaluation of xl / xxl with
  model_parallel > 1 never holds a whole copy on one device."""
  return jax.device_put(params, param_shardings(model, mesh))   # numpy leaves are sliced on the host


def maybe_initialize_distributed() -> None:
  """Multi-host (TPU VM pod slice, multi-node GPU): one process per host, started identically.

  On TPU VMs, SLURM and Open MPI `jax.distributed.initialize()` finds everything itself
  (RECALIGN_MULTIHOST=1 asks for it). Elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process
  0), JAX_NUM_PROCESSES and JAX_PROCESS_ID; jax reads only the first, so the other two are passed here.
  """
  if not (os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("RECALIGN_MULTIHOST")):
    return
  kwargs = {}
  for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if os.environ.get(var):
      try:
        kwargs[arg] = int(os.environ[var])
      except ValueError:
        raise ValueError(f"{var}={os.environ[var]!r} is not an integer") from None
  jax.distributed.initialize(**kwargs)


def to_global(batch: dict, sharding: NamedSharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
