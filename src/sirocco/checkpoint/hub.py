"""Models named by their Hugging Face Hub id, fetched through ``huggingface_hub``: its cache, resumable downloads,
the token from the environment (``HF_TOKEN``), offline mode (``HF_HUB_OFFLINE=1``) and its progress bars.

Three forms (``parse_hub_name``), as transformers, vLLM and llama.cpp's ``-hf`` take them:

- ``org/repo``: a checkpoint in safetensors, Mistral's consolidated layout (``params.json`` +
  ``consolidated.safetensors``) or Hugging Face's (``config.json`` + ``model*.safetensors``), with the tokenizer
  files beside it. Only the files of one layout are fetched (the consolidated one where the repository has both,
  as ``find_layout`` prefers it, unless the other is already complete in the cache); pickled weights
  (``*.bin``, ``*.pth``) never. A repository of GGUF files only is read as ``org/repo:Q4_K_M``, then ``:Q8_0``,
  then its first GGUF file, as llama.cpp does.
- ``org/repo:QUANT``: the GGUF file of a repository whose name carries ``QUANT`` followed by ``.`` or ``-``, case
  ignored (``:q4_k_m`` finds ``Mistral-7B-Instruct-v0.3-Q4_K_M.gguf``), the first in the repository's order.
  A model split in parts (``...-00001-of-00003.gguf``) is refused: sirocco reads one-file GGUF.
- ``org/repo/path/file.gguf``: that file.

Online, the repository's file list comes from the Hub and the chosen files are downloaded into the cache (or
found there); offline, or when the Hub cannot be reached, the list is that of the cached snapshot of ``main``
(``<cache>/models--org--repo/refs/main`` -> ``snapshots/<commit>/``), and every chosen file must be there.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError

log = logging.getLogger(__name__)

_REPO = r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*"
_HUB_NAME = re.compile(rf"(?P<repo>{_REPO})(?::(?P<quant>[A-Za-z0-9_.-]+)|/(?P<file>[^:]+\.gguf))?", re.IGNORECASE)
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_NOT_A_MODEL = ("mmproj", "imatrix")            # GGUF files of a repository that are not the language model
_TOKENIZER = re.compile(r"tokenizer\.model(\.v\d+)?|tekken\.json|tokenizer\.json|tokenizer_config\.json|"
                        r"special_tokens_map\.json")
_DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")


@dataclass(frozen=True)
class HubName:
    """A parsed hub name: the repository, and the quant tag or the GGUF file asked for (at most one)."""
    repo_id: str
    quant: str | None = None
    filename: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f":{self.quant}" if self.quant else f"/{self.filename}" if self.filename else "")


def parse_hub_name(name: str) -> HubName | None:
    """``org/repo``, ``org/repo:QUANT`` or ``org/repo/file.gguf`` as a HubName; None for anything else (a path
    starting with ``.``, ``/`` or ``~``, a name without exactly one ``org/`` part, ...).

    >>> parse_hub_name("mistralai/Mistral-7B-Instruct-v0.3")
    HubName(repo_id='mistralai/Mistral-7B-Instruct-v0.3', quant=None, filename=None)
    >>> parse_hub_name("bartowski/Mistral-7B-Instruct-v0.3-GGUF:q4_k_m").quant
    'q4_k_m'
    >>> parse_hub_name("org/repo/sub/model-Q8_0.gguf").filename, parse_hub_name("./models/tiny")
    ('sub/model-Q8_0.gguf', None)
    """
    m = _HUB_NAME.fullmatch(name)
    if not m or ".." in name or "--" in m["repo"]:
        return None
    return HubName(m["repo"], m["quant"], m["file"])


def hub_cache() -> Path:
    """The cache ``huggingface_hub`` uses (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Whether ``huggingface_hub`` is in offline mode (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of the repository's ``main`` (``models--org--repo/snapshots/<refs/main>``), or None."""
    from huggingface_hub.file_download import repo_folder_name
    repo = hub_cache() / repo_folder_name(repo_id=repo_id, repo_type="model")
    ref = repo / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo / "snapshots" / ref.read_text().strip()
    return snapshot if snapshot.is_dir() else None


def _cached_files(repo_id: str) -> list[str] | None:
    snapshot = cached_snapshot(repo_id)
    if snapshot is None:
        return None
    return sorted(PurePosixPath(os.path.relpath(os.path.join(root, f), snapshot)).as_posix()
                  for root, _, files in os.walk(snapshot) for f in files
                  if os.path.exists(os.path.join(root, f)))            # a dangling link is not a cached file


def _where_tried(repo_id: str) -> str:
    return (f"the Hugging Face cache at {hub_cache()} has no snapshot of {repo_id}"
            + (" (HF_HUB_OFFLINE=1: nothing is downloaded)" if hub_offline() else ""))


def _repo_files(repo_id: str) -> tuple[list[str], bool]:
    """The repository's files (paths relative to its root) and whether the list came from the Hub (else from the
    cached snapshot)."""
    if not hub_offline():
        from huggingface_hub import HfApi
        from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError
        try:
            return sorted(HfApi().list_repo_files(repo_id)), True
        except GatedRepoError:
            raise CheckpointError(f"{repo_id} is gated on the Hugging Face Hub: accept its terms on its page and set "
                                  "HF_TOKEN to a token of that account") from None
        except RepositoryNotFoundError:
            raise CheckpointError(f"no repository {repo_id} on the Hugging Face Hub (or it is private: set "
                                  "HF_TOKEN)") from None
        except Exception as e:         # the Hub unreachable (no network, a proxy, a timeout): try the cache
            cached = _cached_files(repo_id)
            if cached is None:
                raise CheckpointError(f"cannot reach the Hugging Face Hub ({type(e).__name__}: {e}), and "
                                      f"{_where_tried(repo_id)}") from None
            log.warning("cannot reach the Hugging Face Hub (%s); using the cached snapshot of %s", type(e).__name__,
                        repo_id)
            return cached, False
    cached = _cached_files(repo_id)
    if cached is None:
        raise CheckpointError(_where_tried(repo_id))
    return cached, False


def _tokenizer_files(files: list[str]) -> list[str]:
    return [f for f in files if _TOKENIZER.fullmatch(f)]


def _safetensors_layouts(files: list[str]) -> list[list[str]]:
    """The weight files of each complete safetensors layout in ``files``: consolidated first, then Hugging Face's."""
    have = set(files)
    layouts = []
    if {"params.json", "consolidated.safetensors"} <= have:
        layouts.append(["params.json", "consolidated.safetensors"])
    if "config.json" in have:
        shards = [f for f in files if re.fullmatch(r"model-\d+-of-\d+\.safetensors", f)]
        if "model.safetensors.index.json" in have and shards:
            layouts.append(["config.json", "model.safetensors.index.json", *shards])
        elif "model.safetensors" in have:
            layouts.append(["config.json", "model.safetensors"])
    return layouts


def _model_ggufs(files: list[str]) -> list[str]:
    return [f for f in files if f.lower().endswith(".gguf")
            and not any(k in PurePosixPath(f).name.lower() for k in _NOT_A_MODEL)]


def _gguf_with_quant(repo_id: str, files: list[str], quant: str) -> str | None:
    """The first model GGUF whose path carries ``quant`` then ``.`` or ``-`` (case ignored), as llama.cpp picks
    it; the first part of a split model."""
    pattern = re.compile(re.escape(quant) + r"[.-]", re.IGNORECASE)
    for f in _model_ggufs(files):
        if pattern.search(f):
            split = _SPLIT.search(f)
            if split and int(split[1]) != 1:
                continue
            if split:
                raise CheckpointError(f"{repo_id}: {f} is the first of {int(split[2])} parts of a split GGUF model; "
                                      f"sirocco reads one-file GGUF (join the parts with llama.cpp's "
                                      f"llama-gguf-split --merge)")
            return f
    return None


def choose_files(name: HubName, files: list[str], cached: list[str] | None = None) -> tuple[list[str], str]:
    """The files to fetch for ``name`` from a repository holding ``files``, and the path to load relative to the
    snapshot ("" for the snapshot folder itself). ``cached``: the files already in the cache, so that a layout
    complete there is preferred. Raises CheckpointError naming what the repository has."""
    repo = name.repo_id
    ggufs = _model_ggufs(files)
    if name.filename is not None:
        if name.filename not in files:
            raise CheckpointError(f"{repo} has no file {name.filename}"
                                  + (f"; its GGUF files: {', '.join(ggufs)}" if ggufs else ""))
        return [name.filename], name.filename
    if name.quant is not None:
        found = _gguf_with_quant(repo, files, name.quant)
        if found is None:
            raise CheckpointError(f"no GGUF file of {repo} carries {name.quant} in its name"
                                  + (f"; it has: {', '.join(ggufs)}" if ggufs else " (it has no GGUF file)"))
        return [found], found
    layouts = _safetensors_layouts(files)
    if layouts:
        have = set(cached or [])
        complete = [layout for layout in layouts if set(layout) <= have]
        layout = (complete or layouts)[0]
        return layout + _tokenizer_files(files), ""
    if ggufs:
        for quant in _DEFAULT_QUANTS:
            found = _gguf_with_quant(repo, files, quant)
            if found:
                return [found], found
        first = next((f for f in ggufs if not _SPLIT.search(f)), None)
        if first is not None:
            return [first], first
    pickles = [f for f in files if f.endswith((".bin", ".pth", ".pt", ".pkl"))]
    raise CheckpointError(f"{repo} has no safetensors checkpoint (params.json + consolidated.safetensors, or "
                          f"config.json + model*.safetensors) and no one-file GGUF model"
                          + (f"; sirocco does not download pickled weights ({', '.join(pickles[:3])})" if pickles else
                             f"; it has: {', '.join(files[:8])}{' ...' if len(files) > 8 else ''}"))


def resolve_hub_name(name: HubName) -> Path:
    """The local path of the checkpoint folder or GGUF file ``name`` stands for, downloading what is missing into
    the cache (online) or finding it there (offline). Logs what was fetched and where it lives."""
    from huggingface_hub import snapshot_download

    files, listed_online = _repo_files(name.repo_id)
    before = set(_cached_files(name.repo_id) or [])
    wanted, target = choose_files(name, files, sorted(before))
    missing = [f for f in wanted if f not in before]
    try:
        folder = Path(snapshot_download(name.repo_id, allow_patterns=wanted))
    except CheckpointError:
        raise
    except Exception as e:
        if hub_offline() or not listed_online:
            raise CheckpointError(f"{name}: {', '.join(missing or wanted)} not complete in the Hugging Face cache at "
                                  f"{hub_cache()} ({type(e).__name__})"
                                  + (" and HF_HUB_OFFLINE=1: nothing is downloaded" if hub_offline() else "")) from None
        raise CheckpointError(f"{name}: fetching {', '.join(missing or wanted)} from the Hugging Face Hub failed "
                              f"({type(e).__name__}: {e})") from None
    absent = [f for f in wanted if not (folder / f).exists()]
    if absent:
        raise CheckpointError(f"{name}: the cached snapshot {folder} lacks {', '.join(absent)}"
                              + (" (HF_HUB_OFFLINE=1: nothing is downloaded)" if hub_offline() else ""))
    size = sum((folder / f).stat().st_size for f in wanted)
    fetched = [f for f in missing if listed_online]
    log.info("%s: %s (%d file%s, %.2f GiB%s) in %s", name, "fetched" if fetched else "found in the cache",
             len(wanted), "" if len(wanted) == 1 else "s", size / 2**30,
             f"; downloaded {', '.join(fetched)}" if fetched else "", folder)
    return folder / target if target else folder
