"""Options more than one verb shares, declared once: the model to load and where it runs, and pipeline ranks."""

from __future__ import annotations

import argparse

import torch

from ..distributed.launch import DEFAULT_TIMEOUT_S
from ..errors import SiroccoError
from ..pretrained import DEFAULT_MODEL, DEMO, Loaded, bundled_models, load

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_machine_arguments(g: argparse._ActionsContainer) -> None:
    """--device and --threads."""
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: all cores)")


QUANTIZE = ("int8", "int4")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --quantize, --device, --threads: what every verb that runs a model takes."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="PATH|NAME",
                   help="a checkpoint folder (consolidated or Hugging Face format), a .gguf file, or a bundled "
                        "model's name: "
                        f"{', '.join(bundled_models() + [DEMO])} (default: {DEFAULT_MODEL}; '{DEMO}' is random "
                        "weights, for plumbing)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights and activations dtype (default float32; bfloat16 halves memory and is faster "
                        "for large models on CPUs with AVX512-BF16)")
    g.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="quantize the linear layers at load: int8 = GGUF q8_0, int4 = q4_0 blocks of 32 (the output "
                        "head q8_0 in both; embedding, norms and MoE router stay in --dtype)")
    add_machine_arguments(g)


def add_pipeline_arguments(p: argparse.ArgumentParser, training: bool = False) -> None:
    """The pipeline options of the generate verb, or of the train verb with ``training``."""
    g = p.add_argument_group("pipeline parallelism (start with torchrun --nproc-per-node N)")
    g.add_argument("--pipeline-ranks", type=int, default=1, metavar="N",
                   help="split the model's layers into N stages, one per process started by torchrun "
                        "(default 1: no split)")
    if training:
        g.add_argument("--pipeline-schedule", choices=["gpipe", "1f1b"], default="gpipe",
                       help="order of the micro-batches' forwards and backwards (the recipe's accum "
                            "micro-batches of each step): gpipe, or 1f1b which holds fewer activations")
    else:
        g.add_argument("--micro-batches", type=int, default=None, metavar="M",
                       help="groups of sequences per step that flow through the stages at the same time "
                            "(default: N; 1 runs each step's batch whole)")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="longest wait for another rank before failing (default %(default)s)")
    g.add_argument("--dist-backend", choices=["gloo", "nccl"], default=None,
                   help="process-group backend (default: nccl with CUDA, else gloo)")


def resolve_device(name: str | None) -> torch.device:
    """``--device``: None is cuda where available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SiroccoError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SiroccoError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_from_args(args: argparse.Namespace) -> Loaded:
    """The model and tokenizer that --model, --dtype, --device and --threads name, quantized if --quantize says so."""
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args.model, dtype=DTYPES[args.dtype], device=resolve_device(args.device))
    apply_quantize(args, loaded.model)
    return loaded


def apply_quantize(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """--quantize: the quantize-at-load pass (backends/quant), logged with the bytes before and after."""
    if getattr(args, "quantize", None):
        from ..backends import quant
        quant.attach(model, args.quantize)
