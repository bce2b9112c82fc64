"""Suite-wide test setup: offline, CPU-only, deterministic.

* ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set before anything imports transformers
  (laion_clap would otherwise stall for minutes on hub retries).
* Any attempt to open a non-loopback network connection fails the test that made it.
* torch uses one intra-op thread (tiny models, small batches).
* Area fixtures live in ``tests/fixtures_<area>.py`` and are registered below.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# a private, empty Hugging Face cache: no test sees (or fills) the user's cache
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="cmcr-tests-hf-")
os.environ.pop("HF_HUB_CACHE", None)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests run tiny models on small batches: one intra-op thread is faster than two on a 2-core
# machine (measured 3-5x on tiny batches) and leaves the other core to DataLoader workers.
torch.set_num_threads(1)

pytest_plugins = ["tests.fixtures_stores", "tests.fixtures_encode", "tests.fixtures_connect",
                  "tests.fixtures_pointcloud"]

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "cmcr" / "data" / "sample"

_real_connect = socket.socket.connect


def _guarded_connect(self, address):  # noqa: ANN001
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
        raise RuntimeError(f"test tried to reach the network ({address!r}); tests must run offline")
    return _real_connect(self, address)


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    socket.socket.connect = _guarded_connect
    yield
    socket.socket.connect = _real_connect


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The bundled real sample media (``cmcr/data/sample``: audio/, images/, text/, labels.csv)."""
    assert SAMPLE_DATA.is_dir(), f"bundled sample data missing at {SAMPLE_DATA}"
    return SAMPLE_DATA
