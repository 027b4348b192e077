"""The GGUF container read from an untrusted file: header, metadata and tensor infos, each count, length, type,
offset and size checked against the bytes of the file before anything is allocated from it.

GGUF files come from anywhere, so a crafted one must end in a ``ModelFileError`` naming the file and the
problem: never an exception from deep inside a parser, a hang, or an allocation sized by a number the file
claims rather than by the bytes it has. Layout (little-endian, versions 2 and 3)::

    "GGUF" | version u32 | tensor count u64 | metadata count u64                        24 bytes
    metadata, each:     key (string) | value type u32 | value
    tensor infos, each: name (string) | n_dims u32 | dims u64 x n_dims, innermost first | type u32 | offset u64
    padding to general.alignment (default 32), then the tensor data: each tensor at data start + its offset

    string = length u64 + that many bytes of UTF-8; array = item type u32 + count u64 + the items

Worked example: a file whose last tensor info ends at byte 1000 with alignment 32 has its data at 1024; a Q8_0
tensor of dims [64, 3] (3 rows of 64) holds 3 * 64 / 32 = 6 blocks of 34 bytes, 204 bytes, so its offset must
be a multiple of 32 and offset + 204 must fit in the file after byte 1024.

What is kept: scalar values as Python values, numeric arrays as numpy views of the mapped file (no copy), string
arrays as ``StringArray`` (each string decoded when read); tensors as ``TensorInfo`` with their logical shape
outermost first (torch's order). Only the tensor types sirocco reads have known sizes here (the float types, and
every block type of backends/quant/layouts.py: q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, q2_K to q6_K, iq4_xs); a file
with another type (IQ1_*, IQ2_*, IQ3_*, TQ1_0, TQ2_0, Q8_1, Q8_K, ...) is refused naming each tensor and its
type, before any tensor data is read.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from ..backends.quant.layouts import LAYOUTS
from ..errors import ModelFileError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
HEADER_BYTES = 24
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                    # ggml's tensors have at most 4 dimensions

# ggml tensor types sirocco reads: number -> (name, elements per block, bytes per block); the block types' sizes
# are layouts.py's (the layouts the kernels run), their names GGUF's (Q4_K for layouts' q4_K)
TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    **{lay.ggml_type: (lay.name.upper(), lay.values, lay.bytes) for lay in LAYOUTS.values()}}
READ_TYPES = tuple(name for name, _, _ in TYPES.values())

# metadata value types: number -> (name, struct format of one item or None)
STRING, ARRAY = 8, 9
VALUE_TYPES: dict[int, tuple[str, Optional[str]]] = {
    0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"), 4: ("uint32", "I"),
    5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"), STRING: ("string", None), ARRAY: ("array", None),
    10: ("uint64", "Q"), 11: ("int64", "q"), 12: ("float64", "d")}
MIN_KV_BYTES = 8 + 4 + 1        # an empty key, the value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8   # an empty name, n_dims, type, offset (one dimension is 8 more)


class StringArray:
    """A metadata array of strings, read lazily: ``offsets[i]`` is where string i's bytes start and
    ``lengths[i]`` how many there are (both checked to lie inside the file when the header was read)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, path: Path, key: str):
        self._data, self.offsets, self.lengths, self._path, self._key = data, offsets, lengths, path, key

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> str:
        start, n = int(self.offsets[i]), int(self.lengths[i])
        return _decode(self._data[start:start + n], self._path, f"{self._key}[{i}]")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"StringArray({len(self)} strings)"


Value = Union[int, float, bool, str, np.ndarray, StringArray]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: ``shape`` outermost first (a linear weight's (out, in)), ``type`` one of
    ``READ_TYPES``, ``offset`` the absolute position of its first byte in the file."""

    name: str
    shape: tuple[int, ...]
    type: str
    offset: int
    nbytes: int

    @property
    def quantized(self) -> bool:
        return TYPES_BY_NAME[self.type][1] > 1


TYPES_BY_NAME = {name: (number, per_block, block_bytes) for number, (name, per_block, block_bytes) in TYPES.items()}


@dataclass
class GGUFHeader:
    """What ``read_header`` found: metadata by key and tensors by name, in file order, over ``data``, the whole
    file mapped copy-on-write (so that tensors can be handed to torch without a copy)."""

    path: Path
    version: int
    metadata: dict[str, Value]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_start: int
    data: np.ndarray


class _Cursor:
    """Reads little-endian values from the mapped file at ``pos``; every read is checked against the end."""

    def __init__(self, data: np.ndarray, path: Path):
        self.data, self.path, self.pos, self.size = data, path, 0, len(data)
        self.buffer = memoryview(data.data)

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos}, the file ends after "
                            f"{self.size - self.pos} (truncated?)")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        value = struct.unpack_from("<" + fmt, self.buffer, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("Q", f"the length of {what}")
        self.need(n, what)
        text = _decode(self.data[self.pos:self.pos + n], self.path, what)
        self.pos += n
        return text

    def left(self) -> int:
        return self.size - self.pos


def _decode(raw: np.ndarray, path: Path, what: str) -> str:
    try:
        return raw.tobytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_header(path: str | Path) -> GGUFHeader:
    """Map ``path`` and read its header, metadata and tensor infos, checking (before any tensor data is read):
    magic and version; the counts of metadata keys and tensors, and every string and array length, against the
    bytes left; each value type; each tensor's dimensions (1 to 4, each > 0), type, offset (aligned), and byte
    size inside the file; no two tensors overlapping; no key or tensor name twice. Raises ModelFileError naming
    the file and the first problem (all the tensors of unsupported types at once)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read GGUF file: {e.strerror or e}") from None
    if size < HEADER_BYTES:
        raise ModelFileError(f"{path}: {size} bytes, shorter than a GGUF header ({HEADER_BYTES}); truncated or "
                             "not a GGUF file")
    try:
        data = np.memmap(path, dtype=np.uint8, mode="c")
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: cannot map GGUF file: {e}") from None
    cur = _Cursor(data, path)
    magic = bytes(data[:4])
    if magic != MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (it starts with {magic!r}, not {MAGIC!r})")
    cur.pos = 4
    version = cur.scalar("I", "the version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (a big-endian file?)" if swapped in VERSIONS else ""
        raise ModelFileError(f"{path}: GGUF version {version}{hint} is not supported; sirocco reads little-endian "
                             f"versions {' and '.join(map(str, VERSIONS))}")
    n_tensors = cur.scalar("Q", "the tensor count")
    n_kv = cur.scalar("Q", "the metadata count")
    if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > cur.left():
        raise ModelFileError(f"{path}: the header claims {n_kv} metadata keys and {n_tensors} tensors, more than "
                             f"the {cur.left()} bytes after it can hold (truncated or corrupt)")
    metadata: dict[str, Value] = {}
    for k in range(n_kv):
        key = cur.string(f"metadata key #{k}")
        if key in metadata:
            raise cur.fail(f"metadata key '{key}' appears twice")
        kind = cur.scalar("I", f"the value type of '{key}'")
        metadata[key] = _value(cur, kind, key)
    alignment = _alignment(metadata.get("general.alignment", DEFAULT_ALIGNMENT), path)
    infos = [_tensor_info(cur, i) for i in range(n_tensors)]
    data_start = -(-cur.pos // alignment) * alignment
    tensors = _check_tensors(infos, data_start, alignment, size, path)
    return GGUFHeader(path, version, metadata, tensors, alignment, data_start, data)


def _value(cur: _Cursor, kind: int, key: str) -> Value:
    if kind not in VALUE_TYPES:
        raise cur.fail(f"metadata key '{key}' has unknown value type {kind}")
    name, fmt = VALUE_TYPES[kind]
    if kind == STRING:
        return cur.string(f"the value of '{key}'")
    if kind != ARRAY:
        assert fmt is not None
        return cur.scalar(fmt, f"the value of '{key}'")
    item = cur.scalar("I", f"the item type of array '{key}'")
    count = cur.scalar("Q", f"the length of array '{key}'")
    if item not in VALUE_TYPES or item == ARRAY:
        what = "arrays of arrays" if item == ARRAY else f"unknown item type {item}"
        raise cur.fail(f"metadata array '{key}' has {what}, which sirocco does not read")
    item_name, item_fmt = VALUE_TYPES[item]
    item_bytes = 8 if item_fmt is None else struct.calcsize("<" + item_fmt)     # a string is at least its length
    if count * item_bytes > cur.left():
        raise cur.fail(f"metadata array '{key}' claims {count} {item_name} items, more than the {cur.left()} "
                       "bytes left in the file can hold (truncated or corrupt)")
    if item_fmt is not None:
        dtype = np.dtype("<" + ("?" if item_fmt == "?" else np.dtype(item_fmt).char))
        values = cur.data[cur.pos:cur.pos + count * item_bytes].view(dtype)
        cur.pos += count * item_bytes
        return values
    offsets = np.empty(count, dtype=np.int64)
    lengths = np.empty(count, dtype=np.int64)
    for i in range(count):
        n = cur.scalar("Q", f"the length of '{key}'[{i}]")
        cur.need(n, f"'{key}'[{i}]")
        offsets[i], lengths[i] = cur.pos, n
        cur.pos += n
    return StringArray(cur.data, offsets, lengths, cur.path, key)


def _alignment(value: Any, path: Path) -> int:
    """``general.alignment``: GGUF's spec asks for a multiple of 8; a power of two keeps every tensor aligned for
    its elements and blocks."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 8 and not value & (value - 1):
        return value
    raise ModelFileError(f"{path}: general.alignment is {value!r}; it must be a power of two, at least 8")


@dataclass
class _RawInfo:
    name: str
    dims: tuple[int, ...]          # innermost first, as stored
    kind: int
    offset: int                    # from the start of the data


def _tensor_info(cur: _Cursor, i: int) -> _RawInfo:
    name = cur.string(f"the name of tensor #{i}")
    n_dims = cur.scalar("I", f"the dimension count of tensor '{name}'")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor '{name}' has {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}")
    cur.need(8 * n_dims, f"the dimensions of tensor '{name}'")
    dims = struct.unpack_from(f"<{n_dims}Q", cur.buffer, cur.pos)
    cur.pos += 8 * n_dims
    kind = cur.scalar("I", f"the type of tensor '{name}'")
    offset = cur.scalar("Q", f"the offset of tensor '{name}'")
    return _RawInfo(name, tuple(int(d) for d in dims), kind, offset)


def type_name(kind: int) -> str:
    """The name of ggml tensor type number ``kind`` (``Q5_0`` for 6), or ``type N`` for a number ggml lacks."""
    if kind in TYPES:
        return TYPES[kind][0]
    # Only on this error path: the gguf package is slow to import (its metadata helpers load yaml and more), and
    # nothing else of reading needs it.
    from gguf import GGMLQuantizationType
    try:
        return GGMLQuantizationType(kind).name
    except ValueError:
        return f"type {kind}"


def _check_tensors(infos: list[_RawInfo], data_start: int, alignment: int, size: int, path: Path
                   ) -> dict[str, TensorInfo]:
    """The tensors checked one by one against the file (see ``read_header``), then for overlaps."""
    unsupported = [f"{r.name} ({type_name(r.kind)})" for r in infos if r.kind not in TYPES]
    if unsupported:
        raise ModelFileError(f"{path}: tensor type not supported: {', '.join(unsupported[:6])}"
                             f"{' ...' if len(unsupported) > 6 else ''}; sirocco reads {', '.join(READ_TYPES)}")
    room = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for r in infos:
        if r.name in tensors:
            raise ModelFileError(f"{path}: tensor '{r.name}' appears twice")
        kind, per_block, block_bytes = TYPES[r.kind]
        shape = tuple(reversed(r.dims))
        if min(r.dims) < 1:
            raise ModelFileError(f"{path}: tensor '{r.name}' has a dimension of size 0 (shape {list(shape)})")
        if r.dims[0] % per_block:
            raise ModelFileError(f"{path}: tensor '{r.name}' ({kind}) has rows of {r.dims[0]} values, not a "
                                 f"multiple of its block of {per_block}")
        elements = 1
        for d in r.dims:
            elements *= d
        nbytes = elements // per_block * block_bytes
        if r.offset % alignment:
            raise ModelFileError(f"{path}: tensor '{r.name}' starts at data offset {r.offset}, not a multiple of the "
                                 f"alignment {alignment}")
        if r.offset > room or nbytes > room - r.offset:
            raise ModelFileError(f"{path}: tensor '{r.name}' ({kind}, shape {list(shape)}, {nbytes} bytes at data "
                                 f"offset {r.offset}) ends past the end of the file ({max(room, 0)} bytes of data; "
                                 "truncated?)")
        tensors[r.name] = TensorInfo(r.name, shape, kind, data_start + r.offset, nbytes)
    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.offset + a.nbytes > b.offset:
            raise ModelFileError(f"{path}: tensors '{a.name}' (bytes {a.offset}..{a.offset + a.nbytes}) and "
                                 f"'{b.name}' (from byte {b.offset}) overlap")
    return tensors
