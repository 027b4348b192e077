"""A training run described by a recipe: a TOML file, flags on top of it, and a seed.

    seed = 0                       # every random choice of the run: initial weights, data order
    [data]       corpus, val_fraction, min_chars, seq_len
    [tokenizer]  path (an existing tokenizer.model, or none: train one of vocab_size on the corpus), vocab_size
    [model]      preset and/or the fields of ModelArgs; num_experts > 0 makes it a mixture of experts
    [train]      steps, batch_rows, accum, lr, min_lr, warmup, weight_decay, beta1, beta2, clip,
                 aux_loss_coef, autocast, eval_every, eval_rows, save_every

Every field has a default (below, with what it means); a recipe names only what it changes. An unknown field,
a value of the wrong type or out of range fails with a ``RecipeError`` naming ``[section] field``. The recipes
of the bundled models ship in ``recipes/`` and can be named instead of a path (``--recipe sirocco-tiny``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelArgs, MoeArgs, preset
from ..errors import ConfigError
from .tokenizer import MIN_VOCAB_SIZE

try:
    import tomllib
except ModuleNotFoundError:        # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef,unused-ignore]

RECIPES = Path(__file__).parent / "recipes"
# The seed's magnitude is at most this: the data order is shuffled by a torch.Generator seeded with
# seed * 1_000_003 + epoch, which must stay within its 64 bits.
SEED_LIMIT = 2**42


class RecipeError(ConfigError):
    """A recipe field is unknown, of the wrong type, or out of range. The message names ``[section] field``."""


@dataclass
class DataRecipe:
    corpus: str = "default"          # "default" (the Python documentation), a folder of text files, or a .jsonl
    val_fraction: float = 0.05       # share of documents held out for validation (by a hash of their text)
    min_chars: int = 40              # shorter documents are dropped
    seq_len: int = 256               # tokens per training row (T)


@dataclass
class TokenizerRecipe:
    path: str | None = None       # a tokenizer.model (or a folder with one); none: train one on the corpus
    vocab_size: int = 4096           # pieces of the tokenizer trained when no path is given


@dataclass
class ModelRecipe:
    preset: str | None = None     # a named preset of sirocco.config; the fields below override it
    dim: int | None = None
    n_layers: int | None = None
    head_dim: int | None = None   # default dim // n_heads
    hidden_dim: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    norm_eps: float | None = None       # default 1e-5
    rope_theta: float | None = None     # default 10000
    sliding_window: int | None = None   # default none (full causal attention)
    max_seq_len: int | None = None      # default 4 * seq_len
    num_experts: int | None = None      # > 0: a Mixtral-style mixture of experts
    num_experts_per_tok: int | None = None   # default 2


@dataclass
class TrainRecipe:
    steps: int = 1000                # optimizer steps
    batch_rows: int = 8              # rows of seq_len tokens per micro-batch
    accum: int = 1                   # micro-batches per optimizer step (gradient accumulation)
    lr: float = 3e-3                 # peak learning rate, after warm-up
    min_lr: float = 3e-4             # learning rate at the end of the cosine decay
    warmup: int = 100                # steps of linear warm-up
    weight_decay: float = 0.1        # AdamW decoupled weight decay, on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0                # gradient norm clipping; 0 turns it off
    aux_loss_coef: float = 0.02      # weight of the MoE load-balancing loss (Mixtral's published value)
    autocast: str = "auto"           # "bf16": bfloat16 autocast; "off": fp32; "auto": bf16 on CUDA only
    eval_every: int = 100            # steps between validation losses (and at the end)
    eval_rows: int = 64              # validation rows evaluated each time (0: all)
    save_every: int = 500            # steps between checkpoints (and at the end); 0: only at the end


@dataclass
class Recipe:
    seed: int = 0
    data: DataRecipe = field(default_factory=DataRecipe)
    tokenizer: TokenizerRecipe = field(default_factory=TokenizerRecipe)
    model: ModelRecipe = field(default_factory=ModelRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)

    # -- reading -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "recipe") -> Recipe:
        recipe = cls()
        sections = {f.name for f in dataclasses.fields(cls) if f.name != "seed"}
        for key, value in raw.items():
            if key == "seed":
                recipe.seed = _coerce(value, int, f"{source}: seed")
            elif key in sections:
                if not isinstance(value, dict):
                    raise RecipeError(f"{source}: [{key}] must be a table, got {value!r}")
                for name, v in value.items():
                    recipe.set(key, name, v, source)
            else:
                raise RecipeError(f"{source}: unknown section or field '{key}'; known: seed, "
                                  f"{', '.join(f'[{s}]' for s in sorted(sections))}")
        recipe.validate(source)
        return recipe

    @classmethod
    def load(cls, name_or_path: str) -> Recipe:
        """A recipe file, or the name of a bundled one (``sirocco-tiny``)."""
        path = Path(name_or_path).expanduser()
        if not path.exists() and (RECIPES / f"{name_or_path}.toml").exists():
            path = RECIPES / f"{name_or_path}.toml"
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.toml")))
            raise RecipeError(f"recipe {name_or_path}: no such file, and not a bundled recipe ({known})") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise RecipeError(f"recipe {path}: {e}") from None
        return cls.from_dict(raw, source=str(path))

    def set(self, section: str, name: str, value: Any, source: str = "recipe") -> None:
        """Set ``[section] name`` to ``value``, checking its type."""
        where = f"{source}: [{section}] {name}"
        target = getattr(self, section, None)
        if not dataclasses.is_dataclass(target):
            raise RecipeError(f"{source}: unknown section [{section}]")
        hints = typing.get_type_hints(type(target))
        if name not in hints:
            raise RecipeError(f"{source}: [{section}] unknown field '{name}'; known: {', '.join(hints)}")
        setattr(target, name, _coerce(value, hints[name], where))

    def override(self, assignment: str) -> None:
        """Apply a ``section.field=value`` flag; the value is read as TOML (bare words as strings)."""
        key, sep, text = assignment.partition("=")
        if key.strip() == "seed" and sep:
            self.seed = _coerce(_toml_value(text), int, "--set seed")
            return
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise RecipeError(f"--set {assignment!r}: expected SECTION.FIELD=VALUE, e.g. train.lr=1e-3")
        self.set(section, name, _toml_value(text), "--set")

    def validate(self, source: str = "recipe") -> None:
        def need(ok: bool, where: str, what: str) -> None:
            if not ok:
                raise RecipeError(f"{source}: {where} {what}")
        d, t = self.data, self.train
        need(0 <= d.val_fraction < 1, "[data] val_fraction", f"must be in [0, 1), got {d.val_fraction}")
        need(d.seq_len >= 2, "[data] seq_len", f"must be at least 2, got {d.seq_len}")
        need(d.min_chars >= 0, "[data] min_chars", f"must not be negative, got {d.min_chars}")
        need(-SEED_LIMIT <= self.seed <= SEED_LIMIT, "seed",
             f"must be in [-2**42, 2**42], got {self.seed}")
        need(self.tokenizer.vocab_size >= MIN_VOCAB_SIZE, "[tokenizer] vocab_size",
             f"must be at least {MIN_VOCAB_SIZE} (3 special tokens, 256 bytes, a merge), "
             f"got {self.tokenizer.vocab_size}")
        for name in ("steps", "batch_rows", "accum"):
            need(getattr(t, name) >= 1, f"[train] {name}", f"must be at least 1, got {getattr(t, name)}")
        for name in ("warmup", "eval_rows", "save_every", "weight_decay", "clip", "aux_loss_coef", "min_lr"):
            need(getattr(t, name) >= 0, f"[train] {name}", f"must not be negative, got {getattr(t, name)}")
        need(t.lr > 0, "[train] lr", f"must be positive, got {t.lr}")
        need(t.eval_every >= 1, "[train] eval_every", f"must be at least 1, got {t.eval_every}")
        for name in ("beta1", "beta2"):
            need(0 <= getattr(t, name) < 1, f"[train] {name}", f"must be in [0, 1), got {getattr(t, name)}")
        need(t.autocast in ("auto", "bf16", "off"), "[train] autocast",
             f"must be 'auto', 'bf16' or 'off', got {t.autocast!r}")

    # -- the model -----------------------------------------------------------------------------------------
    def model_args(self, vocab_size: int) -> ModelArgs:
        """ModelArgs of the [model] section, with the tokenizer's vocabulary size."""
        m = self.model
        given = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)
                 if f.name not in ("preset", "num_experts", "num_experts_per_tok") and getattr(m, f.name) is not None}
        given["vocab_size"] = vocab_size
        if m.num_experts:
            given["moe"] = MoeArgs(m.num_experts, m.num_experts_per_tok or 2)
        elif m.num_experts == 0:
            given["moe"] = None
        try:
            if m.preset is not None:
                return preset(m.preset, **given)
            for name in ("dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads"):
                if name not in given:
                    raise RecipeError(f"[model] {name}: missing (give it, or a preset)")
            given.setdefault("head_dim", given["dim"] // given["n_heads"])
            given.setdefault("norm_eps", 1e-5)
            given.setdefault("max_seq_len", 4 * self.data.seq_len)
            return ModelArgs(**given)
        except RecipeError:
            raise
        except ConfigError as e:
            raise RecipeError(f"[model] {e}") from None

    # -- writing -------------------------------------------------------------------------------------------
    def to_toml(self) -> str:
        """The recipe with every field, as TOML (read back by ``from_dict``)."""
        lines = [f"seed = {self.seed}"]
        for f in dataclasses.fields(self):
            if f.name == "seed":
                continue
            lines += ["", f"[{f.name}]"]
            for name, value in dataclasses.asdict(getattr(self, f.name)).items():
                if value is not None:
                    lines.append(f"{name} = {_toml_literal(value)}")
        return "\n".join(lines) + "\n"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the annotated type (int, float, str, or Optional of one), or a RecipeError naming it."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):     # Optional[int], or int | None
        inner = next(a for a in typing.get_args(hint) if a is not type(None))
        return None if value is None else _coerce(value, inner, where)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    expected = "a number" if hint is float else "an integer" if hint is int else "a string"
    raise RecipeError(f"{where}: expected {expected}"
                      f", got {value!r}")


def _toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()            # a bare word or path: a string


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
