"""Scaling out: one model split into pipeline stages over several processes (torch.distributed).

* ``launch``: process groups, devices (NCCL on CUDA, gloo on CPU), agreement checks, failing together.
* ``stages``: which layers each stage holds; building or loading only a stage's tensors.
* ``executor``: sharded generation (an executor for the generate engine, activations passed rank to rank).
* ``pipeline_train``: pipeline-parallel training with ``torch.distributed.pipelining`` schedules.
* ``run``: a verb's work on every rank under torchrun (agreeing, sharing inputs, failing together).

See docs/distributed.md.
"""

from .launch import DistContext, DistributedError, init_distributed, spawn_local
from .stages import StageSpec, split_layers, stage_spec

__all__ = [
           "DistContext",
           "DistributedError",
           "StageSpec",
           "init_distributed",
           "spawn_local",
           "split_layers",
           "stage_spec",
]
