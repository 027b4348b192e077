"""Every verb refuses a bad option value where it is parsed: ``sirocco VERB: error: argument --OPT: ...`` naming
the allowed range, exit status 2, no traceback; and the boundary values are accepted. Nothing here loads a model."""

import pytest

from sirocco.cli import build_parser, main

CONVERT = ["convert", "src", "dst"]
TRAIN = ["train", "--out", "run"]
TEXT = __file__                 # a UTF-8 text file that exists: --text-file is read where it is parsed

# (argv, the option argparse names, what the message must say about the range)
REFUSED = [
    # generate: sampling
    (["generate", "--max-tokens", "-1"], "--max-tokens", "-1 is out of range: must be >= 1"),
    (["generate", "--max-tokens", "0"], "--max-tokens", "must be >= 1"),
    (["generate", "--max-tokens", "abc"], "--max-tokens", "'abc' is not an integer (must be >= 1)"),
    (["generate", "--temperature", "-1"], "--temperature", "-1.0 is out of range: must be >= 0"),
    (["generate", "--temperature", "nan"], "--temperature", "not a finite number (must be >= 0)"),
    (["generate", "--top-p", "2"], "--top-p", "2.0 is out of range: must be in (0, 1]"),
    (["generate", "--top-p", "0"], "--top-p", "must be in (0, 1]"),
    (["generate", "--top-k", "-1"], "--top-k", "must be >= 0"),
    (["generate", "--seed", str(2**63)], "--seed", "must be in [-2**63, 2**63 - 1]"),
    (["generate", "--seed", "1.5"], "--seed", "is not an integer"),
    (["generate", "--stop", ""], "--stop", "must not be empty"),
    # generate: engine, machine, pipeline
    (["generate", "--max-rows", "0"], "--max-rows", "must be >= 1"),
    (["generate", "--chunk-size", "0"], "--chunk-size", "must be >= 1"),
    (["generate", "--threads", "0"], "--threads", "must be >= 1"),
    (["generate", "--device", "gpu0"], "--device", "'gpu0' is not a device"),
    (["generate", "--pipeline-ranks", "0"], "--pipeline-ranks", "must be >= 1"),
    (["generate", "--micro-batches", "0"], "--micro-batches", "must be >= 1"),
    (["generate", "--dist-timeout", "0"], "--dist-timeout", "0.0 is out of range: must be > 0"),
    (["generate", "--dist-timeout", "inf"], "--dist-timeout", "not a finite number (must be > 0)"),
    # chat and serve: the same sampling and engine options, declared once
    (["chat", "--temperature", "-1"], "--temperature", "must be >= 0"),
    (["chat", "--top-p", "2"], "--top-p", "must be in (0, 1]"),
    (["chat", "--max-tokens", "0"], "--max-tokens", "must be >= 1"),
    (["chat", "--max-seq-len", "0"], "--max-seq-len", "must be >= 1"),
    (["serve", "--max-rows", "0"], "--max-rows", "must be >= 1"),
    (["serve", "--max-batch-tokens", "0"], "--max-batch-tokens", "must be >= 1"),
    (["serve", "--chunk-size", "0"], "--chunk-size", "must be >= 1"),
    (["serve", "--port", "70000"], "--port", "must be in [0, 65535]"),
    (["serve", "--max-queue", "-1"], "--max-queue", "must be >= 0"),
    (["serve", "--max-body-mib", "0"], "--max-body-mib", "0.0 is out of range: must be > 0"),
    (["serve", "--max-body-mib", "ten"], "--max-body-mib", "'ten' is not a number (must be > 0)"),
    (["serve", "--prefix-cache-mib", "-1"], "--prefix-cache-mib", "-1.0 is out of range: must be >= 0"),
    (["chat", "--prefix-cache-mib", "lots"], "--prefix-cache-mib", "'lots' is not a number (must be >= 0)"),
    (["serve", "--allowed-hosts", "http://box.lan/"], "--allowed-hosts", "not a URL"),
    (["serve", "--allowed-hosts", ","], "--allowed-hosts", "',' names no host"),
    (["serve", "--allowed-hosts", "box*.lan"], "--allowed-hosts", "'*' stands alone (any Host) or starts a domain"),
    (["serve", "--allow-origin", "https://app.example/"], "--allow-origin", "no path or trailing '/'"),
    (["serve", "--allow-origin", "app.example"], "--allow-origin", "'app.example' is not an origin"),
    (["generate", "--max-batch-tokens", "0"], "--max-batch-tokens", "must be >= 1"),
    (["perplexity", "--text-file", TEXT, "--context", "1"], "--context", "must be >= 2"),
    (["perplexity", "--text-file", TEXT, "--stride", "0"], "--stride", "must be >= 1"),
    # speculative decoding: generate, chat and serve share the options
    (["generate", "--draft-tokens", "0"], "--draft-tokens", "0 is out of range: must be in [1, 7]"),
    (["chat", "--draft-tokens", "8"], "--draft-tokens", "must be in [1, 7]"),
    (["serve", "--ngram", "0"], "--ngram", "must be in [1, 16]"),
    (["viz", "cache", "--draft-tokens", "8"], "--draft-tokens", "must be in [0, 7]"),
    # viz
    (["viz", "masks", "--window", "0"], "--window", "must be >= 1"),
    (["viz", "receptive-field", "--token", "-1"], "--token", "must be >= 0"),
    # convert
    ([*CONVERT, "--max-shard-size", "5XB"], "--max-shard-size", "like 5GB, 500MB or 2GiB"),
    ([*CONVERT, "--max-shard-size", "0"], "--max-shard-size", "must be at least 1 byte"),
    # train: recipe fields, machine, pipeline
    ([*TRAIN, "--steps", "0"], "--steps", "must be >= 1"),
    ([*TRAIN, "--batch-rows", "0"], "--batch-rows", "must be >= 1"),
    ([*TRAIN, "--accum", "0"], "--accum", "must be >= 1"),
    ([*TRAIN, "--seq-len", "1"], "--seq-len", "must be >= 2"),
    ([*TRAIN, "--vocab-size", "259"], "--vocab-size", "259 is out of range: must be >= 260"),
    ([*TRAIN, "--lr", "0"], "--lr", "must be > 0"),
    ([*TRAIN, "--lr=-1e-3"], "--lr", "must be > 0"),          # argparse reads a bare -1e-3 as an option
    ([*TRAIN, "--stop-at", "0"], "--stop-at", "must be >= 1"),
    ([*TRAIN, "--seed", str(2**42 + 1)], "--seed", "must be in [-2**42, 2**42]"),
    ([*TRAIN, "--threads", "-2"], "--threads", "must be >= 1"),
    ([*TRAIN, "--pipeline-ranks", "0"], "--pipeline-ranks", "must be >= 1"),
    ([*TRAIN, "--dist-timeout", "-5"], "--dist-timeout", "must be > 0"),
    # train-tokenizer
    (["train-tokenizer", "--vocab-size", "100"], "--vocab-size", "must be >= 260"),
    (["train-tokenizer", "--val-fraction", "1"], "--val-fraction", "1.0 is out of range: must be in [0, 1)"),
    (["train-tokenizer", "--val-fraction", "-0.1"], "--val-fraction", "must be in [0, 1)"),
]


def refused(argv, option, capsys) -> str:
    """The message of the parse error ``argv`` gets (exit status 2, no traceback), checked to name ``option``."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]          # after argparse's usage lines
    assert message.startswith(f"sirocco {argv[0]}: error: argument {option}"), message
    return message


@pytest.mark.parametrize("argv, option, allowed", REFUSED, ids=[" ".join(a) for a, _, _ in REFUSED])
def test_bad_values_are_refused_where_they_are_parsed(argv, option, allowed, capsys):
    message = refused(argv, option, capsys)
    assert allowed in message, message


# The text-file options: --prompts-file of generate, --text-file of perplexity.
TEXT_FILE_OPTIONS = [(["generate", "--prompts-file"], "--prompts-file"),
                     (["perplexity", "--text-file"], "--text-file")]
TEXT_FILE_IDS = [verb for (verb, _), _ in TEXT_FILE_OPTIONS]


@pytest.mark.parametrize("argv, option", TEXT_FILE_OPTIONS, ids=TEXT_FILE_IDS)
def test_a_missing_text_file_is_refused_by_the_parser(argv, option, tmp_path, capsys):
    missing = tmp_path / "prompts.txt"
    message = refused([*argv, str(missing)], option, capsys)
    assert f"{str(missing)!r}: no such file" in message, message


@pytest.mark.parametrize("argv, option", TEXT_FILE_OPTIONS, ids=TEXT_FILE_IDS)
def test_a_folder_as_text_file_is_refused_by_the_parser(argv, option, tmp_path, capsys):
    message = refused([*argv, str(tmp_path)], option, capsys)
    assert f"{str(tmp_path)!r} is a folder, not a file" in message, message


@pytest.mark.parametrize("argv, option", TEXT_FILE_OPTIONS, ids=TEXT_FILE_IDS)
def test_an_unreadable_text_file_is_refused_by_the_parser(argv, option, tmp_path, capsys, monkeypatch):
    from sirocco.cli import options
    path = tmp_path / "secret.txt"
    path.write_text("hello\n")

    def denied(file, *a, **k):          # chmod 000 does not stop root, who may run the tests
        raise PermissionError(13, "Permission denied", str(file))
    monkeypatch.setattr(options, "open", denied, raising=False)
    message = refused([*argv, str(path)], option, capsys)
    assert f"cannot read {str(path)!r}: Permission denied" in message, message


@pytest.mark.parametrize("argv, option", TEXT_FILE_OPTIONS, ids=TEXT_FILE_IDS)
def test_a_text_file_not_utf8_is_refused_naming_the_first_bad_byte(argv, option, tmp_path, capsys):
    path = tmp_path / "binary.txt"
    path.write_bytes("first line\ncaf\u00e9 ".encode() + b"\xff and on")      # 11 + 6 bytes of UTF-8, then 0xff
    message = refused([*argv, str(path)], option, capsys)
    assert f"{str(path)!r} is not UTF-8 text: byte 0xff at offset 17 (invalid start byte)" in message, message


def test_the_offset_counts_across_the_chunks_the_file_is_read_in(tmp_path, capsys):
    path = tmp_path / "big.txt"
    chunk = 1 << 20                             # utf8_text_file's reads: a 2-byte character straddles the first two
    path.write_bytes(b"a" * (chunk - 1) + "\u00e9".encode() + b"b\xc3(")
    message = refused(["generate", "--prompts-file", str(path)], "--prompts-file", capsys)
    assert f"byte 0xc3 at offset {chunk + 2} (invalid continuation byte)" in message, message


def test_a_utf8_text_file_is_accepted_as_its_path(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("The sliding window\ncaf\u00e9 \U0001f642\n", encoding="utf-8")
    assert build_parser().parse_args(["generate", "--prompts-file", str(path)]).prompts_file == str(path)
    assert build_parser().parse_args(["perplexity", "--text-file", str(path)]).text_file == str(path)


# (argv, attribute, the parsed value): the edges of each range are allowed.
ACCEPTED = [
    (["generate", "--max-tokens", "1"], "max_tokens", 1),
    (["generate", "--temperature", "0"], "temperature", 0.0),
    (["generate", "--top-p", "1"], "top_p", 1.0),
    (["generate", "--top-p", "1e-9"], "top_p", 1e-9),
    (["generate", "--top-k", "0"], "top_k", 0),
    (["generate", "--seed", "-1"], "seed", -1),
    (["generate", "--seed", str(2**63 - 1)], "seed", 2**63 - 1),
    (["generate", "--stop", "."], "stop", ["."]),
    (["generate", "--max-rows", "1"], "max_rows", 1),
    (["generate", "--chunk-size", "1"], "chunk_size", 1),
    (["generate", "--threads", "1"], "threads", 1),
    (["generate", "--device", "cuda:1"], "device", "cuda:1"),       # present or not is for run time
    (["generate", "--pipeline-ranks", "1"], "pipeline_ranks", 1),
    (["generate", "--micro-batches", "1"], "micro_batches", 1),
    (["generate", "--dist-timeout", "0.5"], "dist_timeout", 0.5),
    ([*CONVERT, "--max-shard-size", "5GB"], "max_shard_size", 5 * 10**9),
    ([*CONVERT, "--max-shard-size", "500MB"], "max_shard_size", 500 * 10**6),
    ([*CONVERT, "--max-shard-size", "2GiB"], "max_shard_size", 2 * 2**30),
    ([*CONVERT, "--max-shard-size", "1"], "max_shard_size", 1),
    ([*TRAIN, "--steps", "1"], "steps", 1),
    ([*TRAIN, "--batch-rows", "1"], "batch_rows", 1),
    ([*TRAIN, "--accum", "1"], "accum", 1),
    ([*TRAIN, "--seq-len", "2"], "seq_len", 2),
    ([*TRAIN, "--vocab-size", "260"], "vocab_size", 260),
    ([*TRAIN, "--lr", "1e-5"], "lr", 1e-5),
    ([*TRAIN, "--stop-at", "1"], "stop_at", 1),
    ([*TRAIN, "--seed", str(-2**42)], "seed", -2**42),
    ([*TRAIN, "--dist-timeout", "1"], "dist_timeout", 1.0),
    (["train-tokenizer", "--vocab-size", "260"], "vocab_size", 260),
    (["train-tokenizer", "--val-fraction", "0"], "val_fraction", 0.0),
    (["train-tokenizer", "--val-fraction", "0.99"], "val_fraction", 0.99),
    (["serve", "--max-body-mib", "0.5"], "max_body_mib", 0.5),
    (["serve", "--prefix-cache-mib", "0"], "prefix_cache_mib", 0.0),
    (["chat", "--prefix-cache-mib", "0.5"], "prefix_cache_mib", 0.5),
    (["serve"], "prefix_cache_mib", 1024.0),
    (["serve", "--allowed-hosts", "a.lan, *.corp.example", "--allowed-hosts", "*"], "allowed_hosts",
     ["a.lan", "*.corp.example", "*"]),
    (["serve", "--allow-origin", "HTTP://LocalHost:3000", "--allow-origin", "*"], "allow_origin",
     ["http://localhost:3000", "*"]),
]


@pytest.mark.parametrize("argv, name, value", ACCEPTED, ids=[" ".join(a) for a, _, _ in ACCEPTED])
def test_boundary_values_are_accepted(argv, name, value):
    assert getattr(build_parser().parse_args(argv), name) == value


@pytest.mark.parametrize("verb, argv", [("generate", []), ("convert", CONVERT[1:]), ("train", TRAIN[1:]),
                                        ("train-tokenizer", []), ("serve", [])])
def test_defaults_are_unchanged_and_pass_their_own_validators(verb, argv):
    args = build_parser().parse_args([verb, *argv])
    expected = {
        "generate": {"max_tokens": 128, "temperature": 0.7, "top_p": 0.95, "top_k": 0, "seed": 0, "stop": [],
                     "max_rows": 8, "chunk_size": None, "threads": None, "device": None, "pipeline_ranks": 1,
                     "micro_batches": None},
        "convert": {"max_shard_size": None},
        "train": {"steps": None, "lr": None, "seed": None, "vocab_size": None, "stop_at": None, "pipeline_ranks": 1},
        "train-tokenizer": {"vocab_size": 4096, "val_fraction": 0.05},
        "serve": {"host": "127.0.0.1", "allowed_hosts": [], "allow_origin": [], "max_body_mib": 16},
    }[verb]
    assert {k: getattr(args, k) for k in expected} == expected


def test_the_recipe_refuses_a_seed_the_data_shuffle_cannot_take():
    from sirocco.train.recipe import Recipe, RecipeError
    recipe = Recipe()
    recipe.override(f"seed={2**42 + 1}")
    with pytest.raises(RecipeError, match=r"seed must be in \[-2\*\*42, 2\*\*42\]"):
        recipe.validate("--set")


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["convert", "--help"], ["train", "--help"],
                                  ["train-tokenizer", "--help"]])
def test_help_still_prints(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sirocco{' ' + argv[0] if len(argv) == 2 else ''}")
