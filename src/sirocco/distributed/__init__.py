"""Scaling out: one model split into pipeline stages over several processes (torch.distributed).

* ``launch``: process groups, devices (NCCL on CUDA, gloo on CPU), agreement checks, failing together.
* ``stages``: which layers each stage holds; building or loading only a stage's tensors.
* ``pipeline_engine``: sharded generation (the generate engine with activations passed rank to rank).
* ``pipeline_train``: pipeline-parallel training with ``torch.distributed.pipelining`` schedules.
* ``cli``: ``sirocco generate --pipeline-ranks N`` under torchrun.

See docs/distributed.md.
"""

from .launch import DistContext, DistributedError, init_distributed, spawn_local
from .stages import StageSpec, split_layers, stage_spec

__all__ = ["DistContext", "DistributedError", "init_distributed", "spawn_local", "StageSpec", "split_layers",
           "stage_spec"]
