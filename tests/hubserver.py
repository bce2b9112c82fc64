"""A local stand-in of the Hugging Face hub for tests (127.0.0.1, no internet).

It implements what ``huggingface_hub.hf_hub_download`` (2.x) asks of a hub endpoint:

* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}``;
* small (git) files: ``200`` with ``ETag`` (git blob sha1), ``X-Repo-Commit``, ``Content-Length``;
* large (LFS) files — ``.pt``, ``.bin``, ``.safetensors`` — as the real hub serves them: ``302`` to a
  "CDN" URL on another host name (``localhost`` instead of ``127.0.0.1``, so huggingface_hub does
  not follow it during ``HEAD``) with ``X-Linked-Etag`` (the file's sha256), ``X-Linked-Size`` and
  ``X-Repo-Commit``; the ``GET`` of the CDN URL returns the bytes (``Range`` supported);
* renamed repos: ``307`` relative redirect (``roberta-base`` -> ``FacebookAI/roberta-base``);
* unknown file: ``404`` + ``X-Error-Code: EntryNotFound`` (+ ``X-Repo-Commit``); unknown repo:
  ``404`` + ``X-Error-Code: RepoNotFound``.

It counts requests per ``(method, repo_id, filename)`` (:attr:`StandInHub.counts`; content
downloads are ``("GET", repo, file)``, whether through the CDN URL or directly).

Use::

    hub = StandInHub({"lukewys/laion_clap": {"630k-audioset-best.pt": Path(...)}})
    hub.start()              # -> hub.url, e.g. http://127.0.0.1:43121 (HF_ENDPOINT)
    ...
    hub.stop()               # the port is closed: connections are refused
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from cmcr.stores.files import sha256_file

LFS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
CDN_PREFIX = "/__cdn__/"


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class StandInHub:
    """Serve ``repos`` (``{repo_id: {filename: local file}}``) in the hub's URL layout.

    Attributes:
        url: the endpoint (``http://127.0.0.1:PORT``) once started.
        counts: requests per ``(method, repo_id, filename)``.
        redirects: renamed repos (old id -> new id), answered with a 307 like the real hub.
    """

    def __init__(self, repos: Mapping[str, Mapping[str, Path]], redirects: Mapping[str, str] | None = None):
        self.repos = {r: {f: Path(p) for f, p in files.items()} for r, files in repos.items()}
        self.redirects = dict(redirects or {})
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self._meta: dict[tuple[str, str], dict[str, str]] = {}
        self._cdn: dict[str, tuple[str, str]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        for repo, files in self.repos.items():
            for name, path in files.items():
                self._describe(repo, name, path)

    def commit(self, repo_id: str) -> str:
        return hashlib.sha1(f"commit of {repo_id}".encode()).hexdigest()

    def _describe(self, repo: str, name: str, path: Path) -> None:
        if name.endswith(LFS_SUFFIXES):
            sha = sha256_file(path)
            self._meta[(repo, name)] = {"lfs": sha, "size": str(path.stat().st_size),
                                        "etag": _git_blob_sha1_of_pointer(sha, path.stat().st_size)}
            self._cdn[sha] = (repo, name)
        else:
            self._meta[(repo, name)] = {"etag": _git_blob_sha1(path), "size": str(path.stat().st_size)}

    def replace(self, repo: str, name: str, path: Path) -> None:
        """Serve another file under this name (e.g. a broken one)."""
        self.repos.setdefault(repo, {})[name] = Path(path)
        self._describe(repo, name, Path(path))

    # ------------------------------------------------------------------ server
    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # noqa: ANN002 — quiet
                pass

            def do_HEAD(self):  # noqa: N802
                hub._handle(self, head=True)

            def do_GET(self):  # noqa: N802
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> StandInHub:
        self.start()
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.stop()

    # ----------------------------------------------------------------- requests
    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        method = "HEAD" if head else "GET"
        path = unquote(urlparse(h.path).path)
        if path.startswith(CDN_PREFIX):
            sha = path[len(CDN_PREFIX):]
            if sha not in self._cdn:
                return self._send(h, 404, {}, b"", head)
            repo, name = self._cdn[sha]
            self.counts[(method, repo, name)] += 1
            return self._send_file(h, self.repos[repo][name], head, {"ETag": f'"{sha}"'})
        if "/resolve/" not in path:
            return self._send(h, 404, {"X-Error-Code": "RepoNotFound"}, b"", head)
        repo, _, rest = path.strip("/").partition("/resolve/")
        revision, _, name = rest.partition("/")
        if repo in self.redirects:
            target = f"/{self.redirects[repo]}/resolve/{revision}/{name}"
            return self._send(h, 307, {"Location": target}, b"", head)
        self.counts[(method, repo, name)] += 1
        if repo not in self.repos:
            return self._send(h, 404, {"X-Error-Code": "RepoNotFound",
                                       "X-Error-Message": "Repository not found"}, b"", head)
        commit = self.commit(repo)
        if revision not in ("main", commit):
            return self._send(h, 404, {"X-Error-Code": "RevisionNotFound"}, b"", head)
        if name not in self.repos[repo]:
            return self._send(h, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit,
                                       "X-Error-Message": "Entry not found"}, b"", head)
        meta = self._meta[(repo, name)]
        if "lfs" in meta:  # LFS: redirect to the "CDN" (another host name: not followed during HEAD)
            port = self._server.server_address[1] if self._server else 0
            return self._send(h, 302, {"Location": f"http://localhost:{port}{CDN_PREFIX}{meta['lfs']}",
                                       "X-Repo-Commit": commit, "ETag": f'"{meta["etag"]}"',
                                       "X-Linked-Etag": f'"{meta["lfs"]}"', "X-Linked-Size": meta["size"]},
                              b"", head)
        return self._send_file(h, self.repos[repo][name], head,
                               {"ETag": f'"{meta["etag"]}"', "X-Repo-Commit": commit})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, headers: Mapping[str, str], body: bytes, head: bool) -> None:
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    @staticmethod
    def _send_file(h: BaseHTTPRequestHandler, path: Path, head: bool, headers: Mapping[str, str]) -> None:
        size = path.stat().st_size
        start, end = 0, size - 1
        rng = h.headers.get("Range")
        code = 200
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a) if a else 0
            end = int(b) if b else size - 1
            code = 206
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(end - start + 1))
        if code == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        if head:
            return
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(left, 1 << 22))
                if not chunk:
                    break
                try:
                    h.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                left -= len(chunk)


def _git_blob_sha1_of_pointer(sha256: str, size: int) -> str:
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()


def free_port() -> int:
    """A local port with nothing listening on it (for 'hub unreachable' tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------- stand-in files
def write_roberta_like_vocab(folder: Path, vocab_size: int = 50265) -> Path:
    """A RoBERTa-format byte-level BPE with ``vocab_size`` tokens (roberta-base: 50265): 4 specials,
    the 256 byte symbols, merged pairs of byte symbols, ``<mask>`` last (id 50264 as in roberta-base).
    Writes ``vocab.json`` and ``merges.txt`` into ``folder``."""
    import json

    from cmcr.pipeline.clap_encoder import _bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in symbols:
        vocab[ch] = len(vocab)
    merges = []
    n_merges = vocab_size - len(vocab) - 1
    # letters first so that common text really merges
    order = sorted(symbols, key=lambda c: (not c.isalpha(), c))
    for a in order:
        for b in order:
            if len(merges) == n_merges:
                break
            if a + b not in vocab:
                merges.append(f"{a} {b}")
                vocab[a + b] = len(vocab)
        if len(merges) == n_merges:
            break
    vocab["<mask>"] = len(vocab)
    assert len(vocab) == vocab_size, len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder
