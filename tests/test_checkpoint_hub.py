"""``--model org/repo`` (checkpoint/hub.py through pretrained.model_folder): Hugging Face Hub ids resolved through
``huggingface_hub`` in offline mode, against a cache laid out as the hub's client lays it out
(``models--org--repo/refs/main``, ``snapshots/<commit>/<file>`` links into ``blobs/``); that ``huggingface_hub``
itself reads the layout is checked first. No test reaches the network: the client is in offline mode and the Hub's
listing is never asked for (``no_hub_api``)."""

import hashlib
import json
import os
import re
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

from sirocco.checkpoint.gguf_write import save_gguf
from sirocco.checkpoint.hub import HubName, choose_files, parse_hub_name
from sirocco.cli import main
from sirocco.errors import CheckpointError, SiroccoError
from sirocco.pretrained import BUNDLED, load, model_folder

from hf_fixtures import hf_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = BUNDLED / "sirocco-tiny"
COMMIT = "3ad1e0f0c0ffee5eed0123456789abcdef012345"


def add_to_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT) -> Path:
    """Lay ``files`` (name in the repo -> local file) into ``cache`` as huggingface_hub stores a download: the
    content in ``blobs/<sha256>``, ``snapshots/<commit>/<name>`` a relative link to it, ``refs/main`` the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo / "snapshots" / commit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache, the client in offline mode (the environment for child processes, the constants the
    client read at import for this one), and the Hub's API unreachable."""
    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_hub_api(*args, **kwargs):
        raise AssertionError("the Hub's API was called in offline mode")
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_hub_api)
    return folder


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_file()}


def generate(capsys, model: str) -> list[int]:
    code = main(["generate", "--model", model, "--no-progress", "--json", "--temperature", "0", "--max-tokens", "6",
                 "--ignore-eos", "The sliding window"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)["tokens"]


def test_the_cache_layout_is_the_one_huggingface_hub_reads(cache):
    snapshot = add_to_cache(cache, "acme/tiny", folder_files(TINY))
    info = huggingface_hub.scan_cache_dir(cache)
    (repo,) = info.repos
    assert repo.repo_id == "acme/tiny" and set(repo.refs) == {"main"} and not info.warnings
    assert {f.file_name for f in next(iter(repo.revisions)).files} == set(folder_files(TINY))
    path = huggingface_hub.hf_hub_download("acme/tiny", "params.json", cache_dir=cache, local_files_only=True)
    assert Path(path) == snapshot / "params.json"


def test_consolidated_repo_resolves_and_generates_as_the_folder(cache, capsys, caplog):
    caplog.set_level("INFO", logger="sirocco")
    snapshot = add_to_cache(cache, "acme/sirocco-tiny", folder_files(TINY))
    assert model_folder("acme/sirocco-tiny") == snapshot
    assert "acme/sirocco-tiny: found in the cache (3 files" in caplog.text and str(snapshot) in caplog.text
    assert generate(capsys, "acme/sirocco-tiny") == generate(capsys, str(TINY))


@pytest.mark.slow
def test_hugging_face_repo_written_by_transformers(cache, tmp_path, capsys):
    folder = tmp_path / "hf-mistral"
    hf_model("mistral", window=6, vocab_size=4096).save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes((TINY / "tokenizer.model").read_bytes())
    snapshot = add_to_cache(cache, "acme/tiny-hf", folder_files(folder))
    assert model_folder("acme/tiny-hf") == snapshot
    assert generate(capsys, "acme/tiny-hf") == generate(capsys, str(folder))


def test_gguf_repo_by_quant_tag_and_by_file(cache, tmp_path, capsys):
    q8 = tmp_path / "tiny-Q8_0.gguf"
    assert main(["quantize", str(TINY), str(q8), "--type", "q8_0", "--no-progress"]) == 0
    f32 = tmp_path / "tiny-f32.gguf"
    save_gguf(load(str(TINY)).model, f32, TINY / "tokenizer.model")
    (tmp_path / "README.md").write_text("a model card")
    snapshot = add_to_cache(cache, "acme/tiny-GGUF", {q8.name: q8, f32.name: f32, "README.md": tmp_path / "README.md"})
    for name in ("acme/tiny-GGUF:Q8_0", "acme/tiny-GGUF:q8_0", "acme/tiny-GGUF/tiny-Q8_0.gguf", "acme/tiny-GGUF"):
        assert model_folder(name) == snapshot / "tiny-Q8_0.gguf", name        # no tag: Q4_K_M, then Q8_0
    assert model_folder("acme/tiny-GGUF:F32") == snapshot / "tiny-f32.gguf"
    capsys.readouterr()
    assert generate(capsys, "acme/tiny-GGUF:q8_0") == generate(capsys, str(q8))


def test_a_local_path_wins_over_a_hub_id(cache, tmp_path, monkeypatch):
    add_to_cache(cache, "acme/sirocco-tiny", folder_files(TINY))
    local = tmp_path / "acme" / "sirocco-tiny"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert model_folder("acme/sirocco-tiny") == Path("acme/sirocco-tiny")
    assert model_folder("sirocco-tiny") == TINY                                 # a bundled name before the hub


def test_a_name_that_is_nothing_gets_one_clear_error(cache, capsys):
    code = main(["generate", "--model", "nobody/nothing", "--no-progress", "hi"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "--model nobody/nothing: no such folder or file, and not a bundled model" in err
    assert f"the Hugging Face cache at {cache} has no snapshot of nobody/nothing" in err
    assert "HF_HUB_OFFLINE=1: nothing is downloaded" in err
    with pytest.raises(SiroccoError, match="nor a Hugging Face Hub id"):
        model_folder("./no/such/folder")


def test_missing_quant_and_incomplete_snapshot_name_what_there_is(cache, tmp_path):
    q8 = tmp_path / "m-Q8_0.gguf"
    q8.write_bytes(b"GGUF")
    add_to_cache(cache, "acme/m-GGUF", {q8.name: q8})
    with pytest.raises(CheckpointError, match=re.escape("no GGUF file of acme/m-GGUF carries Q5_K_M in its name; "
                                                        "it has: m-Q8_0.gguf")):
        model_folder("acme/m-GGUF:Q5_K_M")
    with pytest.raises(CheckpointError, match=re.escape("acme/m-GGUF has no file m-Q4_0.gguf; its GGUF files: "
                                                        "m-Q8_0.gguf")):
        model_folder("acme/m-GGUF/m-Q4_0.gguf")
    snapshot = add_to_cache(cache, "acme/half", folder_files(TINY))
    (snapshot / "consolidated.safetensors").unlink()                       # the weights never finished
    with pytest.raises(CheckpointError, match="acme/half has no safetensors checkpoint"):
        model_folder("acme/half")


# The file lists of two real repositories (abridged), for the choices the Hub's listing leads to
MISTRAL_7B_V03 = ["README.md", "config.json", "consolidated.safetensors", "generation_config.json",
                  "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                  "model-00003-of-00003.safetensors", "model.safetensors.index.json", "params.json",
                  "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer.model.v3",
                  "tokenizer_config.json"]
GGUF_REPO = ["README.md", "Mistral-7B-Instruct-v0.3-IQ4_XS.gguf", "Mistral-7B-Instruct-v0.3-Q4_K_M.gguf",
             "Mistral-7B-Instruct-v0.3-Q4_K_S.gguf", "Mistral-7B-Instruct-v0.3-Q8_0.gguf",
             "Mistral-7B-Instruct-v0.3.imatrix", "mmproj-Q8_0.gguf", "Big-Q6_K-00001-of-00002.gguf",
             "Big-Q6_K-00002-of-00002.gguf", "pytorch_model.bin"]


def test_choice_of_files_from_a_repository_listing():
    name = HubName("mistralai/Mistral-7B-Instruct-v0.3")
    tokenizer = ["special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer.model.v3",
                 "tokenizer_config.json"]
    assert choose_files(name, MISTRAL_7B_V03) == (["params.json", "consolidated.safetensors", *tokenizer], "")
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    hf_cached = ["config.json", "model.safetensors.index.json", *shards]
    assert choose_files(name, MISTRAL_7B_V03, hf_cached)[0] == hf_cached + tokenizer    # complete in the cache
    repo = "bartowski/Mistral-7B-Instruct-v0.3-GGUF"
    assert choose_files(HubName(repo, quant="q4_k_m"), GGUF_REPO)[1] == "Mistral-7B-Instruct-v0.3-Q4_K_M.gguf"
    assert choose_files(HubName(repo, quant="Q8_0"), GGUF_REPO)[1] == "Mistral-7B-Instruct-v0.3-Q8_0.gguf"
    assert choose_files(HubName(repo), GGUF_REPO)[1] == "Mistral-7B-Instruct-v0.3-Q4_K_M.gguf"
    with pytest.raises(CheckpointError, match="first of 2 parts of a split GGUF model"):
        choose_files(HubName(repo, quant="Q6_K"), GGUF_REPO)
    with pytest.raises(CheckpointError, match=r"does not download pickled weights \(pytorch_model.bin\)"):
        choose_files(HubName("old/model"), ["config.json", "pytorch_model.bin", "tokenizer.model"])


def test_what_counts_as_a_hub_name():
    assert parse_hub_name("org/repo") == HubName("org/repo")
    assert parse_hub_name("org/repo:Q4_K_M") == HubName("org/repo", quant="Q4_K_M")
    assert parse_hub_name("org/repo/a/b-Q8_0.gguf") == HubName("org/repo", filename="a/b-Q8_0.gguf")
    for not_hub in ("sirocco-tiny", "./org/repo", "/abs/path", "~/models/x", "org/repo/folder", "a/b/c",
                    "org/../etc", "org/repo:", "org--x/repo"):
        assert parse_hub_name(not_hub) is None, not_hub
