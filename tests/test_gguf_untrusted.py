"""GGUF files are untrusted input (checkpoint/gguf_header.py, gguf_read.py): a malformed or crafted file ends in
a ``ModelFileError`` naming the file and what is wrong (``sirocco generate: error: ...``, exit status 2), never a
traceback, a signal, a hang or an allocation sized by what the file claims.

The mutated files start from a tiny valid file written by ``save_gguf`` (a one-layer random model, dense and MoE,
q8_0 blocks, a 64-token vocabulary); where each field lies is read with the ``gguf`` package's own reader, so the
mutations do not depend on the parser under test."""

import random
import resource
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import pytest
import torch

from sirocco import backends
from sirocco.checkpoint import GGUFFile
from sirocco.checkpoint.gguf_write import save_gguf
from sirocco.cli import main
from sirocco.config import ModelArgs, MoeArgs
from sirocco.errors import ModelFileError
from sirocco.model import build_model
from sirocco.pretrained import load
from sirocco.tokenizer.gguf_vocab import GGUFVocab, sentencepiece_proto

pytestmark = pytest.mark.usefixtures("one_thread")

HUGE = [2**64 - 1, 2**63, 2**62 + 1, 2**32, 2**31 - 1]


def tiny_gguf(folder: Path, moe: bool) -> Path:
    pieces = ["<unk>", "<s>", "</s>", "\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["\u2581the"]
    scores = [0.0] * 3 + [-float(i) for i in range(len(pieces) - 3)]
    vocab = GGUFVocab(pieces, scores, [2, 3, 3] + [1] * (len(pieces) - 3), bos_id=1, eos_id=2, unk_id=0)
    (folder / "tokenizer.model").write_bytes(sentencepiece_proto(vocab))
    args = ModelArgs(dim=32, n_layers=1, head_dim=16, hidden_dim=32, n_heads=2, n_kv_heads=1, norm_eps=1e-5,
                     vocab_size=64, sliding_window=8, max_seq_len=64, moe=MoeArgs(2, 1) if moe else None)
    model = build_model(args, seed=0)
    backends.attach(model, "torch", quantize="q8_0")
    path = folder / f"tiny{'-moe' if moe else ''}.gguf"
    save_gguf(model, path, folder / "tokenizer.model", float_dtype=torch.float16)
    return path


@dataclass
class Spots:
    """Where the fields of a valid file lie (byte offsets), read with the gguf package's reader."""

    size: int
    data_start: int
    alignment: int
    boundaries: list[int] = field(default_factory=list)       # section and field starts
    lengths: list[int] = field(default_factory=list)          # u64 string lengths (keys, values, names, items)
    counts: list[int] = field(default_factory=list)           # u64 array counts
    value_types: list[int] = field(default_factory=list)      # u32 metadata value types
    item_types: list[int] = field(default_factory=list)       # u32 array item types
    n_dims: list[int] = field(default_factory=list)           # u32
    dims: list[int] = field(default_factory=list)             # u64 each
    names: list[str] = field(default_factory=list)            # tensors in file order
    tensor_dims: list[list[int]] = field(default_factory=list)  # each tensor's dims (innermost first)
    tensor_types: list[int] = field(default_factory=list)     # u32
    offsets: list[int] = field(default_factory=list)          # u64 tensor offsets
    data_ranges: list[tuple[int, int]] = field(default_factory=list)


def spots(path: Path) -> Spots:
    reader = gguf.GGUFReader(path)
    s = Spots(path.stat().st_size, reader.data_offset, reader.alignment, boundaries=[4, 8, 16, 24])
    for f in reader.fields.values():
        if f.name.startswith("GGUF."):
            continue
        at, starts = f.offset, []
        for part in f.parts:
            starts.append(at)
            at += part.nbytes
        s.boundaries += [starts[0], starts[2], starts[3]]
        s.lengths.append(starts[0])
        s.value_types.append(starts[2])
        kind = int(f.parts[2][0])
        if kind == gguf.GGUFValueType.STRING:
            s.lengths.append(starts[3])
        elif kind == gguf.GGUFValueType.ARRAY:
            s.item_types.append(starts[3])
            s.counts.append(starts[4])
            if int(f.parts[3][0]) == gguf.GGUFValueType.STRING:
                s.lengths += starts[5:len(starts):2]
    for t in reader.tensors:
        at, starts = t.field.offset, []
        for part in t.field.parts:
            starts.append(at)
            at += part.nbytes
        name_len, _, n_dims, dims, kind, offset = starts
        s.boundaries += [name_len, n_dims, dims, kind, offset]
        s.lengths.append(name_len)
        s.n_dims.append(n_dims)
        s.dims += [dims + 8 * k for k in range(len(t.shape))]
        s.names.append(t.name)
        s.tensor_dims.append([dims + 8 * k for k in range(len(t.shape))])
        s.tensor_types.append(kind)
        s.offsets.append(offset)
        s.data_ranges.append((int(t.data_offset), int(t.data_offset) + int(t.n_bytes)))
        s.boundaries += list(s.data_ranges[-1])
    s.boundaries += [s.data_start, s.size]
    return s


def mutate(raw: bytes, s: Spots, rng: random.Random) -> tuple[str, bytes]:
    """One mutation of the valid file ``raw``: its kind and the new bytes."""
    b = bytearray(raw)
    kind = rng.choice(["truncate", "bitflip", "count", "length", "array", "offset", "type", "dims", "value_type",
                       "item_type"])

    def u64(at: int, value: int) -> None:
        struct.pack_into("<Q", b, at, value % 2**64)

    def u32(at: int, value: int) -> None:
        struct.pack_into("<I", b, at, value % 2**32)

    def old64(at: int) -> int:
        return struct.unpack_from("<Q", raw, at)[0]

    if kind == "truncate":
        cut = rng.choice(s.boundaries) + rng.choice([-1, 0, 1]) if rng.random() < 0.7 else rng.randrange(s.size)
        return f"truncate at {cut}", bytes(b[:max(0, min(cut, s.size - 1))])
    if kind == "bitflip":
        flips = [(rng.randrange(s.data_start), rng.randrange(8)) for _ in range(rng.choice([1, 1, 2, 3]))]
        for at, bit in flips:
            b[at] ^= 1 << bit
        return f"bit flips {flips}", bytes(b)
    if kind == "count":
        at = rng.choice([8, 16])
        value = rng.choice(HUGE + [old64(at) + 1, old64(at) + 1000, old64(at) - 1, 0])
        u64(at, value)
        return f"count at {at} = {value}", bytes(b)
    if kind == "length":
        at = rng.choice(s.lengths)
        value = rng.choice(HUGE + [old64(at) + 1, old64(at) + 100, s.size, old64(at) - 1, 0])
        u64(at, value)
        return f"length at {at} = {value}", bytes(b)
    if kind == "array":
        at = rng.choice(s.counts)
        value = rng.choice(HUGE + [old64(at) + 1, old64(at) * 2, s.size, 0])
        u64(at, value)
        return f"array count at {at} = {value}", bytes(b)
    if kind == "offset":
        i = rng.randrange(len(s.offsets))
        here = old64(s.offsets[i])
        room = s.size - s.data_start
        value = rng.choice(HUGE + [room, room - 1, room - s.alignment, here + 1, here + s.alignment,
                                   old64(rng.choice(s.offsets)), 0])
        u64(s.offsets[i], value)
        return f"tensor {i} offset = {value}", bytes(b)
    if kind == "type":
        value = rng.choice([0, 1, 2, 3, 6, 8, 10, 24, 30, 31, 39, 99, 2**31, 2**32 - 1])
        at = rng.choice(s.tensor_types)
        u32(at, value)
        return f"tensor type at {at} = {value}", bytes(b)
    if kind == "dims":
        if rng.random() < 0.4:
            at, value = rng.choice(s.n_dims), rng.choice([0, 3, 4, 5, 2**32 - 1])
            u32(at, value)
            return f"n_dims at {at} = {value}", bytes(b)
        at = rng.choice(s.dims)
        value = rng.choice(HUGE + [0, 1, old64(at) * 2, old64(at) + 32, 2**40])
        u64(at, value)
        return f"dim at {at} = {value}", bytes(b)
    if kind == "value_type":
        at, value = rng.choice(s.value_types), rng.choice([0, 4, 6, 7, 8, 9, 12, 13, 99, 2**32 - 1])
        u32(at, value)
        return f"value type at {at} = {value}", bytes(b)
    at, value = rng.choice(s.item_types), rng.choice([0, 7, 8, 9, 10, 13, 2**32 - 1])
    u32(at, value)
    return f"item type at {at} = {value}", bytes(b)


def load_or_refuse(path: Path) -> str:
    """Load the file as ``--model`` does; "ok", or "refused" for a ModelFileError that names the file."""
    try:
        load(str(path), backend="torch")
    except ModelFileError as e:
        assert str(path) in str(e), str(e)
        return "refused"
    return "ok"


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {moe: tiny_gguf(folder, moe) for moe in (False, True)}


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def address_space_limit(extra: int) -> tuple[int, int]:
    """Limit this process's address space to what it maps now plus ``extra`` bytes (an allocation past it fails
    with MemoryError); returns the limits to restore."""
    before = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith("VmSize:"))) * 1024
    limit = mapped + extra if before[1] == resource.RLIM_INFINITY else min(mapped + extra, before[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, before[1]))
    return before


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the address space size from /proc")
def test_two_thousand_mutated_files_are_refused_or_read(valid, tmp_path):
    """2,000 seeded mutations of the two valid files: truncations at every section and field boundary, bit flips
    in the header, huge counts, string lengths and array lengths, offsets past the end, misaligned or
    overlapping, unknown tensor and value types, bad dimension counts and dimensions. Each case either loads (a
    harmless change) or is refused naming the file; no other exception, no case past 10 s, no allocation past
    1 GiB more than the process had mapped."""
    rng = random.Random(0)
    files = {moe: (path.read_bytes(), spots(path)) for moe, path in valid.items()}
    outcomes: dict[str, dict[str, int]] = {}
    previous = signal.signal(signal.SIGALRM, _alarm)
    limits = address_space_limit(2**30)
    t0 = time.perf_counter()
    try:
        with pytest.raises(MemoryError):          # the guard works: 2 GiB cannot be had under it
            bytearray(2**31)
        for case in range(2000):
            raw, where = files[case % 2 == 1]
            what, data = mutate(raw, where, rng)
            path = tmp_path / f"case{case}.gguf"
            path.write_bytes(data)
            signal.setitimer(signal.ITIMER_REAL, 10)
            try:
                result = load_or_refuse(path)
            except _Timeout:
                pytest.fail(f"case {case} ({what}): still reading after 10 s")
            except Exception as e:
                raise AssertionError(f"case {case} ({what}): {type(e).__name__}: {e}") from e
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            path.unlink()
            counts = outcomes.setdefault(what.split(" ")[0], {"ok": 0, "refused": 0})
            counts[result] += 1
    finally:
        resource.setrlimit(resource.RLIMIT_AS, limits)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - t0
    print(f"2000 cases in {elapsed:.1f} s: {outcomes}")
    assert all(c["refused"] > 0 for c in outcomes.values()), outcomes     # every kind of mutation is caught
    assert sum(c["refused"] for c in outcomes.values()) > 1500, outcomes


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(path: Path, match: str) -> None:
    with pytest.raises(ModelFileError, match=match) as e:
        load(str(path), backend="torch")
    assert str(e.value).startswith(str(path)), str(e.value)


def test_truncations_name_what_is_cut(valid, tmp_path):
    raw = valid[False].read_bytes()
    s = spots(valid[False])
    refused(write(tmp_path, "empty.gguf", b""), "0 bytes, shorter than a GGUF header")
    refused(write(tmp_path, "a.gguf", raw[:30]), "more than the 6 bytes after it can hold")
    refused(write(tmp_path, "b.gguf", raw[:s.lengths[-1] + 3]),        # inside the last tensor's name length
            r"the length of the name of tensor #\d+ needs 8 bytes at offset \d+, the file ends after 3")
    refused(write(tmp_path, "c.gguf", raw[:s.data_start + 10]), r"tensor '.*' .* ends past the end of the file")
    end = max(e for _, e in s.data_ranges)
    refused(write(tmp_path, "d.gguf", raw[:end - 1]), r"tensor 'output\.weight' .* ends past the end of the file")


def test_magic_version_counts_and_lengths(valid, tmp_path):
    raw = valid[True].read_bytes()
    s = spots(valid[True])

    def patched(at: int, fmt: str, value: int) -> bytes:
        b = bytearray(raw)
        struct.pack_into(fmt, b, at, value)
        return bytes(b)
    refused(write(tmp_path, "magic.gguf", b"GGML" + raw[4:]), r"not a GGUF file \(it starts with b'GGML'")
    refused(write(tmp_path, "v1.gguf", patched(4, "<I", 1)), "GGUF version 1 is not supported")
    refused(write(tmp_path, "be.gguf", patched(4, "<I", 3 << 24)), r"a big-endian file\?")
    refused(write(tmp_path, "tensors.gguf", patched(8, "<Q", 2**64 - 1)), "18446744073709551615 tensors, more than")
    refused(write(tmp_path, "keys.gguf", patched(16, "<Q", 2**40)), "1099511627776 metadata keys")
    refused(write(tmp_path, "key.gguf", patched(s.lengths[0], "<Q", 2**63)),
            "metadata key #0 needs 9223372036854775808")
    refused(write(tmp_path, "array.gguf", patched(s.counts[0], "<Q", 2**60)), r"claims 1152921504606846976 .* items")


def test_tensor_dimensions_types_offsets_and_overlaps(valid, tmp_path):
    raw = valid[False].read_bytes()
    s = spots(valid[False])

    def patched(at: int, fmt: str, value: int) -> Path:
        b = bytearray(raw)
        struct.pack_into(fmt, b, at, value)
        return write(tmp_path, f"p{at}-{value}.gguf", bytes(b))
    offsets = [struct.unpack_from("<Q", raw, at)[0] for at in s.offsets]
    q = s.names.index("blk.0.attn_q.weight")
    refused(patched(s.n_dims[0], "<I", 5), "has 5 dimensions; GGUF tensors have 1 to 4")
    refused(patched(s.dims[0], "<Q", 0), "has a dimension of size 0")
    refused(patched(s.dims[0], "<Q", 2**63), "ends past the end of the file")
    refused(patched(s.tensor_dims[q][0], "<Q", 33), r"rows of 33 values, not a multiple of its block of 32")
    refused(patched(s.tensor_types[q], "<I", 16), r"tensor type not supported: blk\.0\.attn_q\.weight \(IQ2_XXS\)")
    refused(patched(s.tensor_types[q], "<I", 4000), r"blk\.0\.attn_q\.weight \(type 4000\)")
    refused(patched(s.offsets[1], "<Q", offsets[1] + 1), "not a multiple of the alignment 32")
    refused(patched(s.offsets[1], "<Q", 2**64 - 32), "ends past the end of the file")
    refused(patched(s.offsets[1], "<Q", offsets[2]), "overlap")
    refused(patched(s.tensor_types[0], "<I", 0), r"ends past the end|overlap")   # F16 -> F32: twice the bytes


def test_metadata_that_would_build_a_huge_model_is_refused_first(valid):
    """Counts and sizes that would size loops and tensors (layers, experts, widths) are checked against the
    file's tensors before anything is built: a claim of 2**40 layers, experts or model width fails at once; so do
    special token ids past the vocabulary and a vocabulary larger than the embedding."""
    def opened(**metadata):
        g = GGUFFile(valid[True])
        g.header.metadata.update({f"llama.{k}" if "." not in k else k: v for k, v in metadata.items()})
        return g
    with pytest.raises(ModelFileError, match="block_count is 1099511627776, but the file holds only"):
        opened(block_count=2**40).args()
    g = opened(expert_count=2**40)
    with pytest.raises(ModelFileError, match=r"ffn_gate_exps\.weight has shape \[2, 32, 32\]; the metadata's "
                                             r"1099511627776 experts"):
        g.index(g.args())
    with pytest.raises(ModelFileError, match="dim size 1099511627776 .* larger than every dimension of the file's "
                                             r"tensors \(at most 64\)"):
        opened(embedding_length=2**40).args()
    with pytest.raises(ModelFileError, match="'llama.embedding_length' must be an integer of at least 1, got 'wide'"):
        opened(embedding_length="wide").args()
    with pytest.raises(ModelFileError, match="bos_token_id is 500, past the 64 tokens"):
        opened(**{"tokenizer.ggml.bos_token_id": 500}).tokenizer()
    with pytest.raises(ModelFileError, match="64 tokens, more than the model's 10 embedding rows"):
        opened(vocab_size=10).tokenizer()


@pytest.mark.parametrize("alignment", [1, 4])
def test_alignment_must_be_a_power_of_two_of_at_least_8(valid, tmp_path, monkeypatch, alignment):
    model = load(str(valid[False]), backend="torch").model
    name = gguf.GGUFWriter.add_name
    monkeypatch.setattr(gguf.GGUFWriter, "add_name", lambda self, n: (name(self, n),
                                                                      self.add_custom_alignment(alignment)))
    path = tmp_path / "aligned.gguf"
    save_gguf(model, path, valid[False].parent / "tokenizer.model")
    refused(path, f"general.alignment is {alignment}; it must be a power of two, at least 8")


def test_the_cli_exits_2_naming_the_file(valid, tmp_path, capsys):
    bad = write(tmp_path, "bad.gguf", valid[False].read_bytes()[:1000])
    assert main(["generate", "--model", str(bad), "--max-tokens", "2", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sirocco generate: error: {bad}: ") and "Traceback" not in err
    assert main(["generate", "--model", str(valid[True]), "--max-tokens", "2", "--json", "hi"]) == 0


@pytest.mark.slow
def test_the_command_line_on_malformed_files(valid, tmp_path):
    """A few malformed files through ``python -m sirocco.cli generate`` in its own process: exit status 2, one
    line ``sirocco generate: error: FILE: ...``, no traceback."""
    raw = valid[True].read_bytes()
    s = spots(valid[True])
    rng = random.Random(1)
    cases = {"truncated": raw[:len(raw) // 3], "magic": b"XXXX" + raw[4:],
             "tensors": raw[:8] + struct.pack("<Q", 2**63) + raw[16:]}
    for i in range(3):
        what, data = mutate(raw, s, rng)
        cases[f"mutation{i}"] = data
    for name, data in cases.items():
        path = write(tmp_path, f"{name}.gguf", data)
        done = subprocess.run([sys.executable, "-m", "sirocco.cli", "generate", "--model", str(path), "--max-tokens",
                               "2", "--no-progress", "hi"], capture_output=True, text=True, timeout=120)
        assert "Traceback" not in done.stderr, done.stderr
        if done.returncode == 0:                 # a harmless mutation (a random one may be)
            assert name.startswith("mutation"), done.stderr
            continue
        assert done.returncode == 2, (name, done.returncode, done.stderr)
        assert f"sirocco generate: error: {path}: " in done.stderr, done.stderr
