"""A local stand-in of a web server holding webdataset shards (127.0.0.1, no internet).

``GET /<name>`` returns the file ``root/<name>`` (``200``, ``Content-Length``), ``404`` when it does
not exist; a name in :attr:`StandInShardServer.truncate` is served cut in the middle (the header
announces the full length, the connection closes after half the bytes), as a dropped connection
looks to a client. Requests are counted per path (:attr:`counts`).

Use::

    server = StandInShardServer(tmp_path)
    server.start()            # -> server.url, e.g. http://127.0.0.1:43121
    ...
    server.stop()             # the port is closed: connections are refused
"""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class StandInShardServer:
    """Serve the files of ``root`` over http on 127.0.0.1.

    Attributes:
        url: ``http://127.0.0.1:PORT`` once started; counts: ``GET`` requests per path;
        truncate: file names served cut in half.
    """

    def __init__(self, root: Path, truncate: set[str] | None = None):
        self.root = Path(root)
        self.truncate = set(truncate or ())
        self.counts: Counter[str] = Counter()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> StandInShardServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet test output
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                name = unquote(urlparse(self.path).path).lstrip("/")
                outer.counts[name] += 1
                path = outer.root / name
                if not name or ".." in Path(name).parts or not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if name in outer.truncate:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
