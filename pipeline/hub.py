"""The one place cmcr fetches files from the model hub (Hugging Face hub, via ``huggingface_hub``).

Every pretrained piece a default encoder spec needs comes through :func:`fetch`:

=====================================  ======================================  ==============================
piece                                  repo id                                 file(s)
=====================================  ======================================  ==============================
open_clip weights of a pretrained tag  open_clip's ``hf_hub`` entry, e.g.      ``open_clip_model.safetensors``
(``open_clip:ViT-B-32`` = ``openai``)  ``timm/vit_base_patch32_clip_224.openai``  (else ``open_clip_pytorch_model.bin``)
laion_clap checkpoint                  ``lukewys/laion_clap``                  ``630k-audioset-best.pt``,
                                                                               ``630k-fusion-best.pt``, ...
CLAP text tokenizer (RoBERTa)          ``roberta-base``                        ``vocab.json``, ``merges.txt``
=====================================  ======================================  ==============================

Order of lookup, with no flag needed:

1. the standard Hugging Face cache (``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``;
   ``$HF_HOME/hub`` when ``HF_HOME`` is set) — a file downloaded once is reused by every later run,
   online or offline, without any network access;
2. otherwise the hub at ``$HF_ENDPOINT`` (default ``https://huggingface.co``), with
   ``hf_hub_download`` into that cache.

Two kinds of failure are told apart, because ``cmcr demo`` may fall back to random weights only in
the first:

* :class:`~cmcr.errors.HubUnreachableError` — the file is not cached and the hub cannot be reached
  (connection refused, timeout, DNS failure, or offline mode ``HF_HUB_OFFLINE=1``);
* :class:`~cmcr.errors.HubFileError` — the hub answered but has no such repo / file / revision, or
  served a broken file, or the cached copy is corrupt (its sha256 does not match the hub's LFS
  hash, which is also the blob's name in the cache).

Both messages name the repo id, the file and how to supply it offline.

Large (LFS) files are checked against their sha256 once per process (about 1 s per GB); the
verified digest is returned (:attr:`HubFile.sha256`) so callers that record a checkpoint digest in
an encoder identity do not hash the file twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from cmcr.errors import HubFileError, HubUnreachableError
from cmcr.stores.files import sha256_file

log = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_TRUE = ("1", "true", "yes", "on")
_reachable: dict[str, bool] = {}
_verified: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class HubFile:
    """A file from the hub, present in the local cache.

    Attributes:
        repo_id: the repo it comes from (as asked, e.g. ``lukewys/laion_clap``).
        filename: its path inside the repo.
        path: the local file (a snapshot pointer inside the Hugging Face cache).
        sha256: hex digest, verified against the hub's LFS hash (``None`` for small non-LFS files).
        downloaded: True when this call downloaded it, False when it came from the cache.
    """

    repo_id: str
    filename: str
    path: Path
    sha256: str | None
    downloaded: bool


def endpoint() -> str:
    """The hub URL in use: ``$HF_ENDPOINT`` (default ``https://huggingface.co``), read at call time."""
    from huggingface_hub import constants

    return str(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """The Hugging Face hub cache folder in use (``$HF_HUB_CACHE``, default ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def offline_mode() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (checked both at huggingface_hub import and now)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """True when the hub answers a TCP connect within ``timeout_s`` (memoised per endpoint and process).

    With an HTTP(S) proxy configured the probe cannot see the hub directly and says True; the
    download itself then tells reachable from unreachable. Offline mode says False.
    """
    if offline_mode():
        return False
    url = endpoint()
    if url in _reachable:
        return _reachable[url]
    if any(os.environ.get(v) for v in _PROXY_VARS):
        _reachable[url] = True
        return True
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    ok = False
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            ok = True
    except OSError as e:
        log.debug("hub %s unreachable: %s", url, e)
    _reachable[url] = ok
    return ok


def forget_reachability() -> None:
    """Drop the memoised :func:`hub_reachable` answers (tests; a long-lived process after a network change)."""
    _reachable.clear()


def download_command(repo_id: str, filenames: str | Sequence[str]) -> str:
    """The shell command that pre-fills the cache with these files on a machine with internet."""
    names = [filenames] if isinstance(filenames, str) else list(filenames)
    return f"hf download {repo_id} {' '.join(names)}"


def offline_advice(repo_id: str, filenames: str | Sequence[str], alternative: str | None = None) -> str:
    """How to supply a hub file without network: pre-fill the cache elsewhere, or the piece's own option."""
    text = (f"To supply it offline: on a machine with internet run `{download_command(repo_id, filenames)}` and copy "
            f"the Hugging Face cache ({cache_dir()}) to this machine (or point HF_HUB_CACHE / HF_HOME at a copy); "
            f"cmcr then uses it with no flag")
    if alternative:
        text += f"; or {alternative}"
    return text + "."


def _cached(repo_ids: Sequence[str], filename: str) -> tuple[str, Path] | None:
    from huggingface_hub import try_to_load_from_cache

    for rid in repo_ids:
        try:
            p = try_to_load_from_cache(rid, filename)
        except Exception as e:  # malformed cache: treat as not cached
            log.debug("cache lookup of %s/%s failed: %s", rid, filename, e)
            continue
        if isinstance(p, str) and os.path.isfile(p):
            return rid, Path(p)
    return None


class _DigestMismatch(Exception):
    def __init__(self, blob: Path, got: str, expected: str):
        super().__init__(f"{blob} has sha256 {got}, the hub's hash is {expected}")
        self.blob, self.got, self.expected = blob, got, expected


def _verify(path: Path) -> str | None:
    """sha256 of an LFS blob, checked against its name in the cache (the hub's LFS hash); ``None`` for
    small (git) files. Raises :class:`_DigestMismatch`."""
    real = Path(os.path.realpath(path))
    expected = real.name if _SHA256_RE.match(real.name) and real.parent.name == "blobs" else None
    if expected is None:
        return None
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        got = sha256_file(real)
        if got != expected:
            raise _DigestMismatch(real, got, expected)
        _verified[key] = got
    return _verified[key]


def _cause_chain(e: BaseException) -> list[BaseException]:
    seen: set[int] = set()
    out: list[BaseException] = []
    stack = [e]
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        out.append(cur)
        stack.extend(x for x in (cur.__cause__, cur.__context__) if x is not None)
    return out


def _is_network_failure(e: BaseException) -> bool:
    names = ("ConnectError", "ConnectTimeout", "TimeoutException", "ReadTimeout", "WriteTimeout", "PoolTimeout",
             "OfflineModeIsEnabled", "NetworkError", "RemoteProtocolError")
    for x in _cause_chain(e):
        if type(x).__name__ in names or isinstance(x, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
    return False


def _http_status(e: BaseException) -> int | None:
    for x in _cause_chain(e):
        resp = getattr(x, "response", None)
        code = getattr(resp, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def fetch_cached(repo_id: str, filename: str, *, what: str = "hub file", also_cached_as: Sequence[str] = (),
                 alternative: str | None = None) -> HubFile:
    """The cached copy of a hub file, with no network access at all.

    Raises:
        LookupError: not in the cache. HubFileError: the cached copy is corrupt.
    """
    hit = _cached([repo_id, *[r for r in also_cached_as if r != repo_id]], filename)
    if hit is None:
        raise LookupError(f"{repo_id}/{filename} is not in the Hugging Face cache {cache_dir()}")
    rid, path = hit
    try:
        sha = _verify(path)
    except _DigestMismatch as e:
        raise HubFileError(
            f"{what}: the cached copy of {rid}/{filename} is corrupt: {e}. Delete {e.blob} (or run "
            f"`hf download {rid} {filename} --force-download`) and rerun. " + offline_advice(rid, filename, alternative)
        ) from None
    return HubFile(rid, filename, path, sha, downloaded=False)


def fetch(repo_id: str, filenames: str | Sequence[str], *, what: str, alternative: str | None = None,
          also_cached_as: Sequence[str] = (), probe_timeout_s: float = 3.0) -> HubFile:
    """Get a file of a hub repo: from the local Hugging Face cache, else downloaded into it.

    Args:
        repo_id: hub repo to download from, e.g. ``lukewys/laion_clap``.
        filenames: the file, or alternatives in order of preference (``["open_clip_model.safetensors",
            "open_clip_pytorch_model.bin"]``): the first one cached wins; else the first one the hub has.
        what: what the file is for (starts every error message), e.g. ``"CLAP checkpoint for clap:HTSAT-tiny"``.
        alternative: the piece's own offline option, appended to the advice (e.g. ``"pass
            clap:HTSAT-tiny@/path/630k-audioset-best.pt"``).
        also_cached_as: other repo ids the same files may be cached under (renamed repos, e.g.
            ``FacebookAI/roberta-base`` for ``roberta-base``); looked up in the cache only.
        probe_timeout_s: TCP connect timeout of the reachability probe (avoids huggingface_hub's
            minutes of retries when the hub is down).

    Returns:
        :class:`HubFile` (path in the cache, verified sha256 for LFS files).

    Raises:
        HubUnreachableError: not cached, and the hub cannot be reached (or offline mode).
        HubFileError: the hub has no such repo / file / revision, served a broken file, or the
            cached copy is corrupt.
    """
    names = [filenames] if isinstance(filenames, str) else list(filenames)
    for name in names:
        try:
            return fetch_cached(repo_id, name, what=what, also_cached_as=also_cached_as, alternative=alternative)
        except LookupError:
            continue

    first = names[0]
    if offline_mode():
        raise HubUnreachableError(
            f"{what}: {repo_id}/{first} is not in the Hugging Face cache ({cache_dir()}) and offline mode is on "
            f"(HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE to download it once from {endpoint()}. "
            + offline_advice(repo_id, first, alternative))
    if not hub_reachable(probe_timeout_s):
        raise HubUnreachableError(
            f"{what}: cannot reach the model hub {endpoint()} and {repo_id}/{first} is not in the Hugging Face "
            f"cache ({cache_dir()}). " + offline_advice(repo_id, first, alternative))

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    missing: list[str] = []
    for name in names:
        try:
            path = Path(hf_hub_download(repo_id, name, endpoint=endpoint(), library_name="cmcr"))
        except (EntryNotFoundError, FileNotFoundError) as e:
            if isinstance(e, EntryNotFoundError) and _http_status(e) == 404:
                missing.append(name)
                continue
            if _is_network_failure(e):
                raise HubUnreachableError(
                    f"{what}: lost the connection to the model hub {endpoint()} while fetching {repo_id}/{name} "
                    f"({type(e).__name__}). " + offline_advice(repo_id, name, alternative)) from e
            raise HubFileError(f"{what}: cannot fetch {repo_id}/{name} from {endpoint()} ({type(e).__name__}: "
                               f"{_first_line(e)}). " + offline_advice(repo_id, name, alternative)) from e
        except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise HubFileError(
                f"{what}: the model hub {endpoint()} has no repo {repo_id!r} (or it is gated/private: "
                f"{type(e).__name__}), so {name} cannot be fetched. " + offline_advice(repo_id, name, alternative)
            ) from e
        except Exception as e:
            if _is_network_failure(e):
                raise HubUnreachableError(
                    f"{what}: the model hub {endpoint()} did not answer for {repo_id}/{name} ({type(e).__name__}). "
                    + offline_advice(repo_id, name, alternative)) from e
            raise HubFileError(
                f"{what}: fetching {repo_id}/{name} from {endpoint()} failed ({type(e).__name__}: {_first_line(e)}); "
                f"the file on the hub may be broken. " + offline_advice(repo_id, name, alternative)) from e
        try:
            sha = _verify(path)
        except _DigestMismatch as e:
            for p in (e.blob, path):  # never leave a bad file in the cache
                with contextlib.suppress(OSError):
                    p.unlink()
            raise HubFileError(
                f"{what}: the hub {endpoint()} served a broken copy of {repo_id}/{name}: {e} (removed from the "
                f"cache; rerun to download it again). " + offline_advice(repo_id, name, alternative)) from None
        log.info("fetched %s/%s from %s into %s", repo_id, name, endpoint(), path)
        return HubFile(repo_id, name, path, sha, downloaded=True)
    raise HubFileError(
        f"{what}: the model hub {endpoint()} has repo {repo_id!r} but no file "
        + " or ".join(repr(n) for n in missing) + ". " + offline_advice(repo_id, first, alternative))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def broken_file_error(hub_file: HubFile, what: str, reason: str, alternative: str | None = None) -> HubFileError:
    """The error for a hub file that was fetched (or found cached) but cannot be read."""
    return HubFileError(
        f"{what}: {hub_file.repo_id}/{hub_file.filename} ({hub_file.path}) cannot be read: {reason}. Delete it from "
        f"the cache (or run `hf download {hub_file.repo_id} {hub_file.filename} --force-download`) and rerun. "
        + offline_advice(hub_file.repo_id, hub_file.filename, alternative))
