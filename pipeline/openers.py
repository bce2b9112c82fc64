"""Remote shards: open ``pipe:``, ``http(s)://``, ``s3://`` (and other) URLs as byte streams.

``cmcr shard`` and ``cmcr encode`` read webdataset tars from URLs the way webdataset does:

* ``pipe:CMD`` — the standard output of the shell command ``CMD`` (``pipe:cat a.tar``,
  ``pipe:aws s3 cp s3://bucket/a.tar -``); webdataset's ``gopen_pipe``.
* ``http://``, ``https://`` (and ``gs://``, ``hf://``, ``sftp://``, ``ais://`` ...) — webdataset's
  ``gopen`` openers (``curl`` for http(s), ``gsutil`` for gs); the program must be on ``PATH``.
* any other scheme fsspec knows (``s3://``, ``gcs://``, ``az://``, ...) — ``fsspec.open``, which
  needs the protocol's package (``s3fs`` for ``s3://``; cmcr does not install it).

A URL with a brace range (``https://host/data/{00000..00099}.tar``) stands for every expansion
(:func:`expand_url`), as in webdataset. Only webdataset tars are read from URLs.

**Trust:** a ``pipe:`` URL runs a shell command, like webdataset's. It is for the user's own
command line only: nothing read from a file (a ``shards.json``, a table) is ever opened as a URL.

Errors name the URL, what failed (the opener program's exit status, explained) and the fix; they
are :class:`RemoteReadError` (an :class:`~cmcr.errors.InputDataError` and an :class:`OSError`, so
every reader that records an unreadable shard as one failure records a remote one the same way).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from typing import IO, Any

from cmcr.errors import RemoteReadError

#: ``scheme://`` of a URL (two letters at least, so ``C:/x`` stays a Windows path).
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")

#: What curl's exit statuses mean (``man curl``), for the http(s) opener's errors.
CURL_EXIT: dict[int, str] = {
    6: "the host name could not be resolved",
    7: "could not connect to the server (is it up, is the port right?)",
    18: "the transfer ended early (partial file)",
    22: "the server answered with an HTTP error (404 not found, 403 forbidden, 5xx ...)",
    28: "the transfer timed out",
    35: "the TLS handshake failed",
    52: "the server sent nothing",
    56: "the connection broke while receiving data",
    60: "the server's TLS certificate could not be verified",
}


def is_url(spec: str | Any) -> bool:
    """True for ``pipe:...`` and ``scheme://...`` (``file://`` included); False for local paths."""
    s = str(spec)
    return s.startswith("pipe:") or bool(_SCHEME.match(s))


def url_scheme(url: str) -> str:
    """``"pipe"`` for a ``pipe:`` URL, else the lower-case scheme (``https``, ``s3``...)."""
    if url.startswith("pipe:"):
        return "pipe"
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


def expand_url(url: str) -> list[str]:
    """The URLs a brace pattern stands for (``a-{000..002}.tar`` -> three URLs), in order."""
    from braceexpand import braceexpand

    return list(braceexpand(url))


def url_name(url: str) -> str:
    """A short name of a URL for messages and sources: its last path part (the command of a pipe)."""
    if url.startswith("pipe:"):
        return url
    tail = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return tail or url


def _gopen_schemes() -> Iterable[str]:
    from webdataset.gopen import gopen_schemes

    return [s for s in gopen_schemes if not s.startswith("__")]


def open_url(url: str) -> IO[bytes]:
    """Open ``url`` for reading (see the module docstring for the openers).

    Returns:
        A readable binary stream; read it to the end and close it with :func:`close_url` (which
        turns the opener's exit status into an error naming the URL).

    Raises:
        RemoteReadError: no opener for the scheme (names the package or program to install and the
            ``pipe:`` alternative), or the opener could not be started.
    """
    scheme = url_scheme(url)
    if scheme in ("pipe", "file") or scheme in _gopen_schemes():
        from webdataset.gopen import gopen

        try:
            return gopen(url, "rb")
        except FileNotFoundError as e:  # the opener program (curl, gsutil...) is not installed
            program = e.filename or "the opener program"
            raise RemoteReadError(
                f"cannot open {url}: {program} is not installed (webdataset opens {scheme}:// URLs with it); "
                f"install it, or download the shard and pass the local file") from e
        except (OSError, ValueError) as e:
            raise RemoteReadError(f"cannot open {url}: {e}") from e
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        package = "s3fs" if scheme in ("s3", "s3a") else f"the fsspec implementation of {scheme}://"
        alt = (f"'pipe:aws s3 cp {url} -'" if scheme in ("s3", "s3a") else f"'pipe:<a command that prints {url}>'")
        raise RemoteReadError(
            f"cannot open {url}: reading {scheme}:// needs {package} (pip install {package.split()[0]}"
            f"{'' if scheme in ('s3', 's3a') else ' ...'}), or pass the shard as {alt}") from e
    except ValueError as e:
        raise RemoteReadError(
            f"cannot open {url}: no opener for {scheme}:// (webdataset: {', '.join(sorted(_gopen_schemes()))}; "
            f"fsspec: not a known protocol); pass it as 'pipe:<a command that prints it>' or a local file") from e
    try:
        return fsspec.open(url, "rb").open()
    except Exception as e:  # noqa: BLE001 - credentials, missing bucket/object, network: one message naming the URL
        raise RemoteReadError(f"cannot open {url}: {type(e).__name__}: {e}; check the URL and your credentials "
                              f"(e.g. AWS_PROFILE / AWS_ACCESS_KEY_ID for s3://)") from e


def exit_status(stream: IO[bytes], timeout: float = 30.0) -> int | None:
    """The exit status of the program behind a webdataset ``Pipe`` stream (waits for it to end);
    ``None`` for a stream without a program (file, fsspec)."""
    proc = getattr(stream, "proc", None)
    if proc is None:
        return None
    try:
        return proc.wait(timeout)
    except Exception:  # noqa: BLE001 - still running after timeout: no status to report
        return None


def explain_status(url: str, status: int) -> str:
    """Why the opener of ``url`` exited with ``status``, and what to do about it."""
    scheme = url_scheme(url)
    if scheme == "pipe":
        cmd = url[5:]
        return (f"{url}: the command exited with status {status} (its error output is above); try it in a shell: "
                f"{cmd} | tar t | head")
    if scheme in ("http", "https"):
        why = CURL_EXIT.get(status, "see `man curl`, EXIT CODES")
        return (f"{url}: curl exited with status {status}: {why}; check the URL (curl -fI {shlex.quote(url)}), "
                f"or download the shard and pass the local file")
    return (f"{url}: the opener exited with status {status}; check the URL, or download the shard and pass the "
            f"local file")


def close_url(url: str, stream: IO[bytes], *, drain: bool) -> str | None:
    """Close a stream from :func:`open_url`; never raises.

    Args:
        drain: read the stream to its end first (a tar reader stops at the end-of-archive blocks;
            draining lets the opener finish, so its exit status means what it says).

    Returns:
        ``None`` when the opener ended well, else the error message (:func:`explain_status`).
    """
    error = None
    try:
        if drain:
            while stream.read(1 << 20):
                pass
    except OSError as e:
        error = str(e)
    status = exit_status(stream) if drain else None
    proc = getattr(stream, "proc", None)
    try:
        if proc is not None:
            stream.stream.close()  # type: ignore[attr-defined]  # the Pipe's own close() raises on status
            if not drain:
                proc.kill()
            proc.wait()
        else:
            stream.close()
    except Exception as e:  # noqa: BLE001 - closing must not mask the read's own error
        error = error or str(e)
    if status not in (None, 0):
        return explain_status(url, status)
    return f"{url}: {error}" if error else None


def describe_read_error(url: str, stream: IO[bytes] | None, error: BaseException) -> str:
    """The message for a URL shard whose tar could not be read: the opener's exit status when it
    failed (the real cause behind an "empty file" or "unexpected end of data"), else the tar error."""
    if isinstance(error, RemoteReadError):
        return str(error)
    status = exit_status(stream, timeout=5.0) if stream is not None else None
    if status not in (None, 0):
        return explain_status(url, status)
    return (f"{url}: not a readable webdataset tar ({type(error).__name__}: {error}); "
            f"check that the URL serves a .tar shard")
