"""The authors' released connectors: import, projection, binding, info (trainer/release.py, cmcr connector ...)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cmcr.cli import main
from cmcr.errors import ConnectorError
from cmcr.stores.store import Store
from cmcr.trainer.connector import META_FILE, Connector
from cmcr.trainer.evaluate import evaluate_retrieval, project_store
from cmcr.trainer.release import CLAP_FUSION_630K, CLIP_VITB32_OPENAI, ULIP2_POINTBERT, import_release
from tests.fixtures_connect import unit_rows, write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RELEASE = Path(__file__).resolve().parent.parent / "cmcr" / "data" / "release"
ULIP_CLIP = RELEASE / "ulip_clip.pt"


def make_clap_clip_standin(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ``clap_clip.pt`` with the released key names, shapes and dtypes (the real file is 8.45 MB and not
    shipped): per head ``net1 = Linear(512->1024), BatchNorm1d(1024)`` (then ReLU), ``net2 = Linear(1024->512),
    BatchNorm1d(512)``."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for head in ("Head_A", "Head_B"):
        for block, (din, dout) in (("net1", (512, 1024)), ("net2", (1024, 512))):
            state[f"{head}.{block}.0.weight"] = torch.randn(dout, din, generator=g) / din ** 0.5
            state[f"{head}.{block}.0.bias"] = torch.randn(dout, generator=g) * 0.05
            state[f"{head}.{block}.1.weight"] = 1 + 0.1 * torch.randn(dout, generator=g)
            state[f"{head}.{block}.1.bias"] = 0.1 * torch.randn(dout, generator=g)
            state[f"{head}.{block}.1.running_mean"] = 0.1 * torch.randn(dout, generator=g)
            state[f"{head}.{block}.1.running_var"] = 0.01 + torch.rand(dout, generator=g) * 0.05
            state[f"{head}.{block}.1.num_batches_tracked"] = torch.tensor(4242, dtype=torch.int64)
    torch.save(state, path)
    return state


def by_hand(state: dict[str, torch.Tensor], head: str, x: np.ndarray) -> np.ndarray:
    """Eval-mode forward of one released head with plain torch ops, straight from the released keys."""

    def block(prefix: str, h: torch.Tensor, relu: bool) -> torch.Tensor:
        h = h @ state[prefix + "0.weight"].double().T + state[prefix + "0.bias"].double()
        mean, var = state[prefix + "1.running_mean"].double(), state[prefix + "1.running_var"].double()
        gamma, beta = state[prefix + "1.weight"].double(), state[prefix + "1.bias"].double()
        h = (h - mean) / torch.sqrt(var + 1e-5) * gamma + beta
        return torch.relu(h) if relu else h

    h = torch.from_numpy(x).double()
    h = h / h.norm(dim=1, keepdim=True)
    if f"{head}.net.0.weight" in state:  # ulip_clip: Linear-BN-ReLU
        y = block(f"{head}.net.", h, relu=True)
    else:  # clap_clip: Linear-BN-ReLU-Linear-BN
        y = block(f"{head}.net2.", block(f"{head}.net1.", h, relu=True), relu=False)
    return (y / y.norm(dim=1, keepdim=True)).numpy()


@pytest.fixture(scope="module")
def clap_clip(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("release") / "clap_clip.pt"
    return path, make_clap_clip_standin(path)


@pytest.fixture(scope="module")
def ulip_state() -> dict[str, torch.Tensor]:
    return torch.load(ULIP_CLIP, map_location="cpu", weights_only=True)


def test_ulip_clip_projects_like_the_released_heads(ulip_state, tmp_path):
    conn = import_release(ULIP_CLIP, "ulip_clip", tmp_path / "u")
    x = unit_rows(np.random.default_rng(0), 9, 512)
    # side A = CLIP = Head_A in ulip_clip.pt; side B = ULIP = Head_B
    za = conn.project("A", x, identity=CLIP_VITB32_OPENAI, modality="image")
    zb = conn.project("B", x, identity=ULIP2_POINTBERT, modality="3d")
    np.testing.assert_allclose(za, by_hand(ulip_state, "Head_A", x), atol=1e-6, rtol=0)
    np.testing.assert_allclose(zb, by_hand(ulip_state, "Head_B", x), atol=1e-6, rtol=0)
    assert np.abs(za - by_hand(ulip_state, "Head_B", x)).max() > 0.1  # the heads differ: the test sees a swap
    loaded = Connector.load(tmp_path / "u")  # and the same after a round trip through the files
    np.testing.assert_allclose(loaded.project("A", x, identity=CLIP_VITB32_OPENAI, modality="text"), za, atol=1e-6)
    assert loaded.provenance["sides"]["A"]["released_head"] == "Head_A"
    assert loaded.architecture["B"]["depth"] == 1 and loaded.architecture["B"]["final_activation"] is True


def test_clap_clip_standin_projects_like_the_released_heads_with_the_swap(clap_clip, tmp_path):
    path, state = clap_clip
    conn = import_release(path, "clap_clip", tmp_path / "c")
    x = unit_rows(np.random.default_rng(1), 9, 512)
    # the trap: in clap_clip.pt Head_A is CLAP and Head_B is CLIP
    za = conn.project("A", x, identity=CLIP_VITB32_OPENAI, modality="image")
    zb = conn.project("B", x, identity=CLAP_FUSION_630K, modality="audio")
    np.testing.assert_allclose(za, by_hand(state, "Head_B", x), atol=1e-6, rtol=0)
    np.testing.assert_allclose(zb, by_hand(state, "Head_A", x), atol=1e-6, rtol=0)
    assert np.abs(za - by_hand(state, "Head_A", x)).max() > 0.1
    assert conn.sides["A"].mcr == "clip" and conn.sides["B"].mcr == "clap"
    assert conn.provenance["sides"] == {
        "A": {"released_head": "Head_B", "model": "OpenAI CLIP ViT-B/32", "bound_by": "preset default"},
        "B": {"released_head": "Head_A", "model": "LAION-CLAP HTSAT-tiny fusion (630k-fusion-best.pt)",
              "bound_by": "preset default"}}
    assert conn.architecture["A"]["hidden_dim"] == 1024 and conn.architecture["A"]["depth"] == 2
    assert int(conn.projectors["B"].net[1].num_batches_tracked) == 4242


def test_stores_of_the_wrong_side_or_encoder_are_refused(tmp_path):
    conn = import_release(ULIP_CLIP, "ulip_clip", tmp_path / "u")
    rows = unit_rows(np.random.default_rng(2), 6, 512)
    audio = write_store(tmp_path / "clap_audio", rows, modality="audio", encoder=CLAP_FUSION_630K)
    with pytest.raises(ConnectorError, match="no side"):
        project_store(conn, audio, tmp_path / "p_audio")
    random_clip = write_store(tmp_path / "rand_clip", rows, modality="image",
                              encoder={**CLIP_VITB32_OPENAI, "weights": "random", "seed": 0})
    with pytest.raises(ConnectorError, match="no side"):
        project_store(conn, random_clip, tmp_path / "p_rand")
    with pytest.raises(ConnectorError, match="bound to"):  # a CLIP text row given to the ULIP side
        conn.project("B", rows, identity=CLIP_VITB32_OPENAI, modality="image")
    with pytest.raises(ConnectorError, match="modalities"):  # the CLIP side takes no 3D
        conn.project("A", rows, identity=CLIP_VITB32_OPENAI, modality="3d")
    other_file = {**CLIP_VITB32_OPENAI, "weights": "sha256:" + "0" * 64}
    with pytest.raises(ConnectorError, match="--side-a"):  # a checkpoint file not vouched for: says how to bind it
        conn.project("A", rows, identity=other_file, modality="image")


def test_imported_connector_projects_and_evaluates_stores(tmp_path):
    conn = import_release(ULIP_CLIP, "ulip_clip", tmp_path / "u")
    rng = np.random.default_rng(3)
    img, pts = unit_rows(rng, 20, 512), unit_rows(rng, 20, 512)
    keys = [f"item{i}" for i in range(20)]
    # extra identity fields that the binding does not name are free (e.g. a recorded precision)
    images = write_store(tmp_path / "clip_image", img, modality="image", keys=keys,
                         encoder={**CLIP_VITB32_OPENAI, "precision": "fp32"})
    clouds = write_store(tmp_path / "ulip_3d", pts, modality="3d", keys=keys, encoder=ULIP2_POINTBERT)
    pi = project_store(conn, images, tmp_path / "pi")
    pp = project_store(tmp_path / "u", clouds, tmp_path / "pp")
    assert pi.encoder["side"] == "A" and pp.encoder["side"] == "B" and pi.encoder["connector"] == conn.fingerprint
    r = evaluate_retrieval(pp, pi, by="key")
    assert r["direction"] == "3d->image" and r["pool"] == 20


def test_cli_project_and_search_on_an_imported_connector(tmp_path, capsys):
    conn = import_release(ULIP_CLIP, "ulip_clip", tmp_path / "u")
    rng = np.random.default_rng(5)
    keys = [f"item{i}" for i in range(12)]
    write_store(tmp_path / "clip_image", unit_rows(rng, 12, 512), modality="image", keys=keys,
                encoder=CLIP_VITB32_OPENAI)
    clouds = unit_rows(rng, 12, 512)
    write_store(tmp_path / "ulip_3d", clouds, modality="3d", keys=keys, encoder=ULIP2_POINTBERT)
    assert main(["project", str(tmp_path / "u"), str(tmp_path / "clip_image"), str(tmp_path / "pi")]) == 0
    capsys.readouterr()
    assert main(["search", "-c", str(tmp_path / "u"), "-g", str(tmp_path / "pi"), "--key", "item3",
                 "--store", str(tmp_path / "ulip_3d"), "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    z_img = conn.project("A", Store.open(tmp_path / "clip_image").embeddings(np.float32),
                         identity=CLIP_VITB32_OPENAI, modality="image")
    z_q = conn.project("B", clouds[3], identity=ULIP2_POINTBERT, modality="3d")
    best = np.argsort(-(z_img @ z_q))[:5]
    assert [h["key"] for h in hits] == [keys[i] for i in best]


def test_side_binding_override_and_sha256_of_the_official_clip_file(tmp_path):
    ours = {"family": "ulip", "architecture": "PointBERT", "weights": "sha256:" + "ab" * 32, "dim": 512}
    conn = import_release(ULIP_CLIP, "ulip_clip", tmp_path / "u", sides={"B": ours}, bound_by={"B": "JSON"})
    rows = unit_rows(np.random.default_rng(4), 3, 512)
    assert conn.side_for(ours, "3d") == "B"
    with pytest.raises(ConnectorError):
        conn.side_for(ULIP2_POINTBERT, "3d")  # replaced, not added
    official_file = {**CLIP_VITB32_OPENAI, "weights": "sha256:" + conn.sides["A"].accepts[1]["weights"][7:]}
    assert conn.side_for(official_file, "image") == "A"
    conn.project("A", rows, identity=official_file, modality="image")
    assert conn.provenance["sides"]["B"]["bound_by"] == "JSON"
    default = import_release(ULIP_CLIP, "ulip_clip", tmp_path / "d")
    assert default.fingerprint != conn.fingerprint  # the binding is part of what the fingerprint names
    with pytest.raises(ConnectorError, match="512"):
        import_release(ULIP_CLIP, "ulip_clip", tmp_path / "x", sides={"A": {"family": "open_clip", "dim": 768}})


def test_rerun_is_a_no_op_and_another_connector_needs_overwrite(clap_clip, tmp_path):
    first = import_release(ULIP_CLIP, "ulip_clip", tmp_path / "u")
    before = (tmp_path / "u" / META_FILE).read_bytes()
    again = import_release(ULIP_CLIP, "ulip_clip", tmp_path / "u")
    assert again.fingerprint == first.fingerprint and (tmp_path / "u" / META_FILE).read_bytes() == before
    with pytest.raises(ConnectorError, match="--overwrite"):
        import_release(clap_clip[0], "clap_clip", tmp_path / "u")
    replaced = import_release(clap_clip[0], "clap_clip", tmp_path / "u", overwrite=True)
    assert Connector.load(tmp_path / "u").fingerprint == replaced.fingerprint != first.fingerprint


def test_wrong_preset_or_broken_file_is_a_clear_error(clap_clip, tmp_path):
    with pytest.raises(ConnectorError, match="--preset ulip_clip"):
        import_release(ULIP_CLIP, "clap_clip", tmp_path / "a")
    with pytest.raises(ConnectorError, match="--preset clap_clip"):
        import_release(clap_clip[0], "ulip_clip", tmp_path / "b")
    state = dict(clap_clip[1])
    state["Head_A.net1.0.weight"] = torch.full((1024, 512), float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ConnectorError, match="NaN"):
        import_release(tmp_path / "nan.pt", "clap_clip", tmp_path / "c")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConnectorError, match="state dict"):
        import_release(tmp_path / "junk.pt", "clap_clip", tmp_path / "d")
    with pytest.raises(ConnectorError, match="preset"):
        import_release(ULIP_CLIP, "imagebind", tmp_path / "e")


class _Payload:
    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(_Payload.marker),))


def test_a_planted_payload_does_not_run(tmp_path):
    _Payload.marker = str(tmp_path / "pwned")
    torch.save({"Head_A.net.0.weight": torch.zeros(2), "evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ConnectorError, match="never unpickles"):
        import_release(tmp_path / "evil.pt", "ulip_clip", tmp_path / "out")
    assert not (tmp_path / "pwned").exists()


def test_cli_import_info_and_side_override(clap_clip, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["connector", "import", str(clap_clip[0]), "--preset", "clap_clip", "--out", str(out), "--json",
                 "--side-b", json.dumps({"family": "clap", "architecture": "cmcr-tiny-clap", "weights": "random",
                                         "seed": 0, "dim": 512})]) == 0
    imported = json.loads(capsys.readouterr().out)
    assert main(["connector", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == imported
    assert info["sides"]["B"]["accepts"][0]["architecture"] == "cmcr-tiny-clap"
    assert info["provenance"]["preset"] == "clap_clip" and info["provenance"]["source_file"] == "clap_clip.pt"
    assert info["provenance"]["sides"]["B"] == {"released_head": "Head_A", "bound_by": "JSON",
                                                "model": "LAION-CLAP HTSAT-tiny fusion (630k-fusion-best.pt)"}
    import hashlib

    assert info["provenance"]["source_sha256"] == hashlib.sha256(clap_clip[0].read_bytes()).hexdigest()
    # Linear(512->1024) + BN(1024) + Linear(1024->512) + BN(512), learnable parameters
    assert info["architecture"]["A"]["parameters"] == (512 * 1024 + 1024) + 2 * 1024 + (1024 * 512 + 512) + 2 * 512
    assert main(["connector", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Head_A" in text and "clap_clip.pt" in text and "cmcr-tiny-clap" in text
    assert main(["connector", "import", str(ULIP_CLIP), "--preset", "clap_clip", "--out", str(tmp_path / "x")]) == 1
    assert "--preset ulip_clip" in capsys.readouterr().err


def test_cli_side_override_from_an_encoder_spec(tmp_path, capsys):
    """An encoder spec is loaded once to read the identity it records; a 64-d encoder cannot take 512-d heads."""
    from cmcr.pipeline.encoders import load_encoder

    out = tmp_path / "u"
    spec = "open_clip:cmcr-tiny-clip-512@random"
    assert main(["connector", "import", str(ULIP_CLIP), "--preset", "ulip_clip", "--out", str(out),
                 "--side-a", spec]) == 0
    tiny = load_encoder(spec, device="cpu")
    conn = Connector.load(out)
    assert conn.side_for(tiny.identity(), "image") == "A"
    assert conn.provenance["sides"]["A"]["bound_by"] == "encoder spec"
    assert main(["connector", "import", str(ULIP_CLIP), "--preset", "ulip_clip", "--out", str(tmp_path / "v"),
                 "--side-a", "open_clip:cmcr-tiny-clip@random"]) == 1
    assert "512" in capsys.readouterr().err
    assert main(["connector", "import", str(ULIP_CLIP), "--preset", "ulip_clip", "--out", str(tmp_path / "w"),
                 "--side-b", spec]) == 1  # CLIP embeds no 3D: not a ULIP side
    assert "3d" in capsys.readouterr().err


def test_swapped_sides_of_an_imported_connector_are_detected(tmp_path):
    import_release(ULIP_CLIP, "ulip_clip", tmp_path / "u")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "u", copy)
    meta = json.loads((copy / META_FILE).read_text())
    meta["sides"]["A"], meta["sides"]["B"] = meta["sides"]["B"], meta["sides"]["A"]
    (copy / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConnectorError, match="swapped"):
        Connector.load(copy)


def test_cli_info_of_a_trained_connector(tiny_trained, capsys):
    assert main(["connector", "info", str(tiny_trained), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["provenance"]["kind"] == "trained" and "shared_a" in info["provenance"]["stores"]
    assert info["sides"]["A"]["match"] == "exact identity" and info["sides"]["A"]["mcr"] == "mcr-a"
    assert info["fingerprint"] == Connector.load(tiny_trained).fingerprint
    assert main(["connector", "info", str(tiny_trained)]) == 0
    assert "trained by `cmcr connect`" in capsys.readouterr().out


def test_default_bindings_accept_stores_of_the_official_files_by_name():
    """A store encoded from the official checkpoint (local copy or hub download) records its sha256 *and* its
    file name; the imported CLAP/ULIP sides accept it by the released file's name, no flag needed, while two
    stores are still compared on the digest only."""
    from cmcr.stores.store import same_encoder
    from cmcr.trainer.connector import SideInfo
    from cmcr.trainer.release import PRESETS

    clap = {"family": "clap", "architecture": "HTSAT-tiny-fusion", "text_model": "roberta", "fusion": True,
            "fusion_type": "aff_2d", "weights": "sha256:" + "ab" * 32, "weights_file": "630k-fusion-best.pt",
            "dim": 512}
    ulip = {"family": "ulip", "architecture": "PointBERT", "weights": "sha256:" + "cd" * 32,
            "weights_file": "pointbert_ULIP-2.pt", "dim": 512}

    def side(preset: str, mcr: str) -> SideInfo:
        rs = next(s for s in PRESETS[preset].sides.values() if s.mcr == mcr)
        return SideInfo(mcr=mcr, encoder=dict(rs.accepts[0]), modalities=list(rs.modalities), input_dim=512,
                        shared_modality=PRESETS[preset].shared_modality, accepts=[dict(p) for p in rs.accepts])

    assert side("clap_clip", "clap").accepts_identity(clap)
    assert side("ulip_clip", "ulip").accepts_identity(ulip)
    assert not side("clap_clip", "clap").accepts_identity({**clap, "weights_file": "630k-best.pt"})
    assert not side("clap_clip", "clap").accepts_identity({**clap, "fusion": False})
    assert not side("ulip_clip", "ulip").accepts_identity({k: v for k, v in ulip.items() if k != "weights_file"})
    # the file name never decides whether two stores are in the same space: the digest does
    assert same_encoder(clap, {**clap, "weights_file": "renamed.pt"})
    assert not same_encoder(clap, {**clap, "weights": "sha256:" + "ef" * 32})
