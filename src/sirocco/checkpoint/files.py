"""Finding a checkpoint's files and reading its tensors one at a time, memory-mapped.

A :class:`TensorFiles` knows every tensor's name, shape and dtype from the files' headers before reading any
data, so a loader can check a whole checkpoint against its config first and then read only what it needs
(a pipeline stage reads only its own layers). Every failure of the underlying readers (a truncated file, a
corrupt header, a missing shard) becomes a :class:`CheckpointError` that names the file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelArgs
from ..errors import CheckpointError
from .config_files import read_hf_config, read_params

log = logging.getLogger(__name__)

CONSOLIDATED, HF = "consolidated", "hf"

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


@dataclass
class Layout:
    """Where a checkpoint folder keeps its config and weights."""

    folder: Path
    format: str                 # CONSOLIDATED or HF
    config: Path                # params.json or config.json
    weights: list[Path]         # one or more files of tensors

    def read_args(self, max_seq_len: int | None = None) -> ModelArgs:
        if self.format == CONSOLIDATED:
            return read_params(self.config, max_seq_len=max_seq_len)
        return read_hf_config(self.config, max_seq_len=max_seq_len)


def find_layout(folder: str | Path) -> Layout:
    """Recognise a checkpoint folder.

    Consolidated: ``params.json`` with ``consolidated.safetensors`` (or ``consolidated.00.pth``).
    Hugging Face: ``config.json`` with ``model.safetensors``, sharded ``model-*.safetensors`` listed in
    ``model.safetensors.index.json``, or ``pytorch_model.bin`` (read with ``weights_only=True``).
    A folder holding both prefers the consolidated files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    if (folder / "params.json").exists():
        if (folder / "consolidated.safetensors").exists():
            return Layout(folder, CONSOLIDATED, folder / "params.json", [folder / "consolidated.safetensors"])
        pth = sorted(folder.glob("consolidated.*.pth"))
        if len(pth) == 1:
            return Layout(folder, CONSOLIDATED, folder / "params.json", pth)
        if len(pth) > 1:
            raise CheckpointError(f"{folder}: {len(pth)} consolidated.*.pth files are tensor-parallel shards; "
                                  "sirocco reads single-file consolidated checkpoints")
    if (folder / "config.json").exists():
        config = folder / "config.json"
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = folder / index_name
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
                shards = [folder / name for name in dict.fromkeys(weight_map.values())]
                missing = [s.name for s in shards if not s.exists()]
                if missing:
                    raise CheckpointError(f"{index} lists shards that are not in the folder: {', '.join(missing)}")
                return Layout(folder, HF, config, shards)
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).exists():
                return Layout(folder, HF, config, [folder / name])
    raise CheckpointError(
        f"{folder}: no checkpoint found. Expected params.json + consolidated.safetensors (or consolidated.00.pth), "
        "or config.json + model.safetensors (or model.safetensors.index.json with its shards)")


class TensorFiles:
    """The tensors of one or more files, by name, read lazily.

    >>> files = TensorFiles([Path("model.safetensors")])      # doctest: +SKIP
    >>> files.shape("lm_head.weight"), files.get("lm_head.weight").dtype   # doctest: +SKIP
    """

    def __init__(self, paths: list[Path]):
        self._where: dict[str, tuple[Path, object]] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for path in paths:
            reader = _open(path)
            for name, (shape, dtype) in reader.header().items():
                if name in self._where:
                    raise CheckpointError(f"tensor '{name}' appears in both {self._where[name][0].name} and "
                                          f"{path.name}")
                self._where[name] = (path, reader)
                self._meta[name] = (shape, dtype)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str, mapped: bool = True) -> torch.Tensor:
        """The tensor ``name``. ``mapped=True`` returns it backed by the memory-mapped file where the format
        allows (no copy: the right choice when it is kept as it is); ``mapped=False`` reads a private copy
        with plain file reads, so that converting a tensor to another dtype or device does not leave the
        file's pages resident in this process."""
        _path, reader = self._where[name]
        return reader.get(name, mapped)  # type: ignore[attr-defined]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along the first dimension) of the tensor ``name`` as a private copy, read with
        plain file reads from a safetensors file: a loader that converts a large tensor piece by piece never
        holds the whole of it, nor leaves its pages resident."""
        _path, reader = self._where[name]
        return reader.rows(name, start, stop)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)


def _open(path: Path) -> _SafetensorsFile | _TorchFile:
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    return _TorchFile(path)


class _SafetensorsFile:
    def __init__(self, path: Path):
        from safetensors import safe_open
        self.path = path
        try:
            self.handle = safe_open(str(path), framework="pt", device="cpu")
            names = list(self.handle.keys())
        except Exception as e:       # the library raises its own types (and OSError) for bad files
            raise CheckpointError(f"{path}: cannot read safetensors file ({_short(e)}); is it truncated or "
                                  "corrupt?") from None
        self._header: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name in names:
            sl = self.handle.get_slice(name)
            dtype = _ST_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {sl.get_dtype()}")
            self._header[name] = (tuple(sl.get_shape()), dtype)
        self._offsets: dict[str, tuple[int, int]] | None = None

    def header(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return self._header

    def get(self, name: str, mapped: bool = True) -> torch.Tensor:
        return self._guarded(name, lambda: self.handle.get_tensor(name) if mapped else self._read_copy(name))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._guarded(name, lambda: self._read_copy(name, start, stop))

    def _guarded(self, name: str, read: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``read()``, with any failure of the underlying reader a CheckpointError naming the file and tensor."""
        try:
            return read()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor '{name}' ({_short(e)})") from None

    def _read_copy(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor (all of it by default), read into new memory."""
        # The safetensors layout: an 8-byte little-endian header length, a JSON header giving each tensor's
        # [begin, end) byte offsets relative to the end of the header, then the data.
        if self._offsets is None:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            self._offsets = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                             for k, v in header.items() if k != "__metadata__"}
        begin, end = self._offsets[name]
        shape, dtype = self._header[name]
        if start or stop is not None:
            row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
            stop = shape[0] if stop is None else stop
            begin, end, shape = begin + start * row_bytes, begin + stop * row_bytes, (stop - start, *shape[1:])
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(begin)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{self.path}: tensor '{name}' ends past the end of the file (truncated?)")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


class _TorchFile:
    """A PyTorch zip checkpoint, opened with ``weights_only=True`` (no code runs) and ``mmap=True``."""

    def __init__(self, path: Path):
        self.path = path
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:       # pickle, zip and runtime errors, all meaning "not a usable file"
            raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({_short(e)}); is it truncated, "
                                  "corrupt, or not a plain dict of tensors?") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
        self.state: dict[str, torch.Tensor] = state

    def header(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.state.items()}

    def get(self, name: str, mapped: bool = True) -> torch.Tensor:
        return self.state[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.state[name][start:stop].clone()


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]

