"""Training checkpoints: a model folder any sirocco verb can load, plus what resuming needs.

    OUT/
      params.json, consolidated.safetensors   the model (fp32 master weights), Mistral's consolidated format
      tokenizer.model                         the tokenizer the run encoded its corpus with
      recipe.toml                             the run's recipe, every field written out
      optimizer.pt                            AdamW's moments and step counts (read with weights_only=True);
                                              not written by a pipeline (its optimizer state is per rank)
      trainer_state.json                      step, data position, loss history, elapsed time, corpus digest
      loss.png                                the loss curve

Resuming reads these back: the same weights, optimizer, step (so the same learning rate) and data position
(so the same next batch) continue the run exactly as if it had not stopped. A checkpoint is written to a
temporary folder first and its files moved in one by one, so an interrupted save leaves the previous files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_consolidated
from ..config import ModelArgs
from ..errors import CheckpointError

log = logging.getLogger(__name__)

STATE, OPTIMIZER, RECIPE = "trainer_state.json", "optimizer.pt", "recipe.toml"


def save_training(folder: str | Path, model: torch.nn.Module | dict[str, torch.Tensor], args: ModelArgs,
                  optimizer: torch.optim.Optimizer | None, state: dict[str, Any], recipe_toml: str,
                  tokenizer: Path | None) -> Path:
    """Write a checkpoint of ``model`` (a module or the whole model's state dict) into ``folder``: resumable
    with an ``optimizer``, without one the model, its recipe, tokenizer and state only."""
    folder = Path(folder)
    tmp = folder / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    save_consolidated(model, args, tmp)  # type: ignore[arg-type]   # any module with the model's names
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")
    (tmp / RECIPE).write_text(recipe_toml)
    if tokenizer is not None and tokenizer.resolve() != (folder / tokenizer.name).resolve():
        shutil.copyfile(tokenizer, tmp / tokenizer.name)
    for f in tmp.iterdir():
        os.replace(f, folder / f.name)
    tmp.rmdir()
    log.info("checkpoint at step %d written to %s", state.get("step", 0), folder)
    return folder


def is_training_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return all((folder / n).is_file() for n in (STATE, OPTIMIZER, RECIPE, "consolidated.safetensors"))


def read_state(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not is_training_folder(folder):
        missing = [n for n in (STATE, OPTIMIZER, RECIPE, "consolidated.safetensors") if not (folder / n).is_file()]
        raise CheckpointError(f"{folder} is not a training checkpoint to resume (missing {', '.join(missing)})")
    try:
        return json.loads((folder / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {folder / STATE}: {e}") from None


def load_optimizer(folder: str | Path, optimizer: torch.optim.Optimizer) -> None:
    path = Path(folder) / OPTIMIZER
    try:
        optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot restore the optimizer from {path}: {e}") from None
