"""`cmcr serve`: the search service, its HTTP API, the web page (in a real browser), the client and
`cmcr search --server`, on a fast demo run (tiny random encoders, bundled media)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cmcr.cli import main

TINY = ["open_clip:cmcr-tiny-clip@random", "clap:cmcr-tiny-clap@random"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--fast", "--out", str(out), "--captions", "120", "--epochs", "2", "--no-synthetic",
                     "--num-workers", "0"]) == 0
    (out / "printed.txt").write_text(printed.getvalue())
    return out


@pytest.fixture(scope="module")
def service(demo_out):
    from cmcr.service import SearchService

    return SearchService(demo_out / "connector", [demo_out / "projected" / "clip_image",
                                                  demo_out / "projected" / "clap_audio"], encoders=TINY)


@pytest.fixture(scope="module")
def client(service):
    from fastapi.testclient import TestClient

    from cmcr.server import create_app

    return TestClient(create_app(service, max_upload_bytes=400_000, max_audio_seconds=12.0))


def _audio_file(sample_data: Path, label: str) -> Path:
    return sorted((sample_data / "audio" / label).glob("*.ogg"))[0]


def test_health_and_galleries(client):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["galleries"] == 2
    g = client.get("/api/galleries").json()
    assert [x["name"] for x in g["galleries"]] == ["clip_image", "clap_audio"]
    assert {x["modality"] for x in g["galleries"]} == {"image", "audio"}
    assert g["query_modalities"] == ["audio", "image", "text"]
    assert g["random_weights"] is True and g["random_weight_encoders"]
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/search", "/api/search/media"}


def test_text_query_matches_the_library_search(client, service, demo_out):
    r = client.post("/api/search", json={"text": "a dog barking", "gallery": "clap_audio", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["hits"]) == 5 and body["modality"] == "audio" and body["random_weights"] is True
    # the same query computed by hand: CLAP text (the audio gallery's side) -> projector -> exact cosine
    from cmcr.pipeline.encoders import load_encoder
    from cmcr.stores.store import Store
    from cmcr.trainer.connector import Connector

    conn = Connector.load(demo_out / "connector")
    enc = load_encoder(TINY[1], device="cpu")
    q = conn.project(conn.side_for(enc.identity(), "text"), enc.encode("text", ["a dog barking"]),
                     identity=enc.identity(), modality="text")[0]
    g = Store.open(demo_out / "projected" / "clap_audio")
    scores = g.embeddings(np.float32) @ q
    expect = [g.keys()[i] for i in np.argsort(-scores, kind="stable")[:5]]
    assert [h["key"] for h in body["hits"]] == expect
    assert body["hits"][0]["score"] == pytest.approx(float(scores.max()), abs=1e-4)
    assert all(h["metadata"]["label"] for h in body["hits"])


def test_media_upload_and_media_urls(client, sample_data):
    wav = _audio_file(sample_data, "dog")
    with open(wav, "rb") as f:
        r = client.post("/api/search/media", files={"file": (wav.name, f)}, data={"gallery": "clip_image", "k": "3"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 3 and r.json()["query"]["modality"] == "audio"
    # the hit's media URL serves the image file it was encoded from
    m = client.get(hits[0]["media_url"])
    assert m.status_code == 200
    src = sample_data / "images" / hits[0]["metadata"]["source"]
    assert m.content == src.read_bytes()


def test_localize_route_draws_where_the_sound_is_in_a_gallery_image(client, sample_data):
    import io as _io
    import json as _json

    from PIL import Image

    wav = _audio_file(sample_data, "dog")
    key = client.post("/api/search/media", files={"file": (wav.name, wav.read_bytes())},
                      data={"gallery": "clip_image", "k": "1"}).json()["hits"][0]["key"]
    r = client.post("/api/localize", files={"file": (wav.name, wav.read_bytes())},
                    data={"gallery": "clip_image", "key": key})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    Image.open(_io.BytesIO(r.content)).verify()
    info = _json.loads(r.headers["X-Cmcr-Localization"])
    assert info["min"] <= info["max"] and len(info["peak_xy"]) == 2 and info["grid"] == [4, 4]
    assert "LOCALIZE = true" in client.get("/").text and client.get("/api/galleries").json()["localize"] is True
    bad = client.post("/api/localize", files={"file": (wav.name, wav.read_bytes())},
                      data={"gallery": "clap_audio", "key": key})
    assert bad.status_code == 422 and "not images" in bad.json()["detail"]
    missing = client.post("/api/localize", files={"file": (wav.name, wav.read_bytes())},
                          data={"gallery": "clip_image", "key": "no-such-key"})
    assert missing.status_code == 404 and "no-such-key" in missing.json()["detail"]  # as /api/search answers


def test_query_by_key_across_galleries(client):
    r = client.post("/api/search", json={"key": "dog/sounds_dog_bark", "key_gallery": "clap_audio",
                                         "gallery": "clip_image", "k": 4})
    assert r.status_code == 200, r.text
    assert r.json()["query"]["modality"] == "audio" and len(r.json()["hits"]) == 4
    # a key queried against its own gallery finds itself first at cosine 1
    r = client.post("/api/search", json={"key": "dog/sounds_dog_bark", "gallery": "clap_audio", "k": 1})
    assert r.json()["hits"][0]["key"] == "dog/sounds_dog_bark"
    assert r.json()["hits"][0]["score"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("path", ["/media/clap_audio/..%2F..%2F..%2Fetc%2Fpasswd", "/media/clap_audio/../../etc/passwd",
                                  "/media/nope/dog", "/media/clap_audio/no-such-key"])
def test_media_route_refuses_traversal_and_unknowns(client, path):
    assert client.get(path).status_code == 404


def test_media_path_stays_inside_the_root(service, tmp_path):
    g = service.gallery("clap_audio")
    saved = g.rows([g.row_of("dog/sounds_dog_bark")])[0]["metadata"]["source"]
    assert g.resolve_media("../../../../../../etc/passwd") is None  # a row whose source leaves the root
    assert g.media_path("dog/sounds_dog_bark").name == Path(saved).name
    assert g.media_path("no/such-key") is None


def test_bad_requests_are_clear_4xx(client, tmp_path, sample_data):
    def media(name: str, data: bytes, gallery: str = "clip_image"):
        return client.post("/api/search/media", files={"file": (name, data)}, data={"gallery": gallery})

    r = client.post("/api/search", json={"gallery": "clip_image"})
    assert r.status_code == 400 and "exactly one" in r.json()["detail"]
    r = client.post("/api/search", json={"text": "x", "gallery": "nope"})
    assert r.status_code == 404 and "clip_image" in r.json()["detail"]
    r = client.post("/api/search", json={"text": "   ", "gallery": "clip_image"})
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    # invalid fields: 422 with one sentence naming the field (not pydantic's list), unknown fields refused
    r = client.post("/api/search", json={"text": "x", "gallery": "clip_image", "k": 0})
    assert r.status_code == 422 and isinstance(r.json()["detail"], str) and r.json()["detail"].startswith("k: ")
    r = client.post("/api/search", json={"text": "x", "gallery": "clip_image", "side": "C"})
    assert r.status_code == 422 and r.json()["detail"].startswith("side: ") and "'C'" in r.json()["detail"]
    r = client.post("/api/search", json={"text": "x", "gallery": "clip_image", "bogus": 1})
    assert r.status_code == 422 and "bogus: unknown field" in r.json()["detail"]
    r = client.post("/api/search/media", files={"file": ("a.jpg", b"x")}, data={"gallery": "clip_image", "side": "C"})
    assert r.status_code == 422 and r.json()["detail"].startswith("side: ")
    r = client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)
    r = client.post("/api/search", json={"key": "no/such", "gallery": "clip_image"})
    assert r.status_code == 404 and "no/such" in r.json()["detail"]
    r = media("notes.txt", b"hello")
    assert r.status_code == 422 and "extension" in r.json()["detail"]
    r = media("big.png", b"\0" * 400_001)
    assert r.status_code == 413 and "400000" in r.json()["detail"]
    r = media("broken.wav", b"RIFF0000WAVEjunk")
    assert r.status_code == 422 and "broken.wav" in r.json()["detail"]
    r = media("empty.jpg", b"")
    assert r.status_code == 422
    r = media("garbage.png", b"\x89PNG not really")
    assert r.status_code == 422 and "garbage.png" in r.json()["detail"] and "/tmp" not in r.json()["detail"]
    import soundfile as sf

    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(8000 * 13, np.float32), 8000)
    r = media("long.wav", long.read_bytes())
    assert r.status_code == 422 and "13.0 s" in r.json()["detail"] and "--max-audio-seconds" in r.json()["detail"]


def test_page_has_the_controls_and_the_random_banner(client):
    html = client.get("/").text
    for needle in ('id="text"', 'id="drop"', 'id="gallery"', 'id="random-banner"', "Random weights",
                   'value="clap_audio"', ".wav"):
        assert needle in html, needle


def test_wrong_space_gallery_is_refused_at_start(demo_out):
    from cmcr.errors import ConnectorError
    from cmcr.service import SearchService

    with pytest.raises(ConnectorError, match="not in the space of connector"):
        SearchService(demo_out / "connector", [demo_out / "stores" / "clap_audio"])


def test_an_encoder_of_neither_side_is_refused(demo_out):
    from cmcr.errors import ConnectorError
    from cmcr.service import SearchService

    with pytest.raises(ConnectorError, match="either side"):
        SearchService(demo_out / "connector", [demo_out / "projected" / "clip_image"],
                      encoders=["open_clip:cmcr-tiny-clip@random:7"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(service):
    """The app on a real uvicorn server in a thread (127.0.0.1, a free port)."""
    import uvicorn

    from cmcr.server import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_python_client_and_cli_search_server(live_server, sample_data, capsys):
    from cmcr.client import CmcrClient, ServerError

    with CmcrClient(live_server) as c:
        assert c.health()["status"] == "ok"
        names = [g["name"] for g in c.galleries()["galleries"]]
        text_hits = c.search_text("a dog barking", gallery="clap_audio", k=3)["hits"]
        assert len(text_hits) == 3
        file_hits = c.search_file(_audio_file(sample_data, "cat"), gallery="clip_image", k=2)["hits"]
        assert len(file_hits) == 2 and c.media(file_hits[0]["media_url"])[:2] in (b"\xff\xd8", b"\x89P")
        with pytest.raises(ServerError) as e:
            c.search_text("x", gallery="nope")
        assert e.value.status == 404
    assert names == ["clip_image", "clap_audio"]
    code = main(["search", "--server", live_server, "-g", "clap_audio", "--text", "a dog barking", "-k", "3", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [h["key"] for h in out["hits"]] == [h["key"] for h in text_hits]
    assert out["random_weights"] is True


def test_cli_search_server_unreachable_is_one_clear_line(capsys):
    port = _free_port()
    assert main(["search", "--server", f"http://127.0.0.1:{port}", "-g", "x", "--text", "hi"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach cmcr server" in err and "Traceback" not in err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)")
def test_page_in_a_real_browser(live_server, sample_data, tmp_path):
    """Load the page in headless Chromium (Playwright), search by caption and by an uploaded file, and check
    that result cards render (image thumbnails, audio players, random-weights banner)."""
    pw = pytest.importorskip("playwright.sync_api")
    shots = os.environ.get("CMCR_SCREENSHOT_DIR")
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(live_server + "/")
            assert page.locator("#random-banner").is_visible()
            page.select_option("#gallery", "clap_audio")
            page.fill("#text", "a dog barking")
            page.click("#search-text")
            page.wait_for_selector("#results .hit audio", timeout=30_000)
            assert page.locator("#results .hit").count() == 10
            assert "a dog barking" in page.locator("#status").inner_text()
            page.select_option("#gallery", "clip_image")
            page.set_input_files("#file", str(_audio_file(sample_data, "dog")))
            page.wait_for_selector("#results .hit img", timeout=30_000)
            page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
            widths = page.eval_on_selector_all("#results img", "els => els.map(e => e.naturalWidth)")
            assert len(widths) == 10 and all(w > 0 for w in widths)
            assert page.locator("#query audio").count() == 1  # the uploaded query is playable
            if shots:
                page.screenshot(path=str(Path(shots) / "serve.png"), full_page=True)
            # browse: "find similar" on a hit queries by its key
            first = page.locator("#results .hit").first.get_attribute("data-key")
            page.locator("#results .similar").first.click()
            page.wait_for_function(f"document.getElementById('status').innerText.includes({json.dumps(first)})")
            assert page.locator("#results .hit").first.get_attribute("data-key") == first  # itself, at cosine 1
        finally:
            browser.close()


def test_the_serve_command_the_demo_prints_works(demo_out, tmp_path):
    """`cmcr demo` ends with the one command that serves its output; run it as printed (a subprocess on a
    free port) and query it."""
    import httpx

    line = [x for x in (demo_out / "printed.txt").read_text().splitlines() if x.startswith("browse it: ")]
    assert len(line) == 1
    argv = shlex.split(line[0].removeprefix("browse it: "))
    assert argv[:2] == ["cmcr", "serve"]
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cmcr.cli", *argv[1:], "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(600):
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise AssertionError(proc.stderr.read()) from None
                time.sleep(0.1)
        assert r.json()["galleries"] == 2
        hits = httpx.post(f"http://127.0.0.1:{port}/api/search", timeout=60,
                          json={"text": "a dog barking", "gallery": "clip_image", "k": 3}).json()["hits"]
        assert len(hits) == 3
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "gallery clip_image: 56 image rows" in err and "random-init" in err


@pytest.mark.parametrize("name", ["cow/spot_triangulated.obj", "bbq/BBQ_xyzrgb.npy"])
def test_3d_previews_render_meshes_and_clouds(sample_data, name):
    """3D gallery rows get a rendered PNG preview (the page's thumbnail): deterministic, not blank, and the
    cloud's own colours are used when it has them."""
    from PIL import Image

    from cmcr.server import _thumbnail_png

    path = sample_data / "3d" / name
    png = _thumbnail_png(str(path), path.stat().st_mtime_ns)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert img.shape == (256, 256, 3)
    background = np.array([233, 236, 243])
    drawn = np.abs(img - background).sum(axis=2) > 30
    assert 0.03 < drawn.mean() < 0.9  # an object, not an empty or a filled square
    from cmcr.pipeline.pointcloud import load_points
    from cmcr.service import render_points_png

    assert render_points_png(load_points(path.read_bytes(), path.suffix)) == png  # deterministic
    if name.endswith("xyzrgb.npy"):  # coloured: not the depth-shaded blue of colourless clouds
        colours = img[drawn]
        assert not np.all((colours[:, 2] > colours[:, 0]) & (colours[:, 2] > colours[:, 1]))
