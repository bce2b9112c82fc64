"""Connector files: byte-reproducible for identical content, and sides/identities bound into what is verified
(issue 13 defects 2 and 7; trainer/connector.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cmcr.errors import ConnectorError
from cmcr.trainer.connector import META_FILE, WEIGHTS_FILE, Connector

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Builds the same small connector from a seed, in this process or in a child process.
BUILD = textwrap.dedent("""
    import torch
    from cmcr.trainer.connector import Connector, SideInfo
    from cmcr.trainer.projector import make_projector

    def build(seed=0):
        arch = {"in_dim": 8, "hidden_dim": 16, "out_dim": 8, "depth": 2, "batchnorm": True, "activation": "relu",
                "final_activation": False, "dropout": 0.0}
        torch.manual_seed(seed)
        projs = {s: make_projector(arch) for s in "AB"}
        for p in projs.values():
            for m in p.modules():
                if isinstance(m, torch.nn.BatchNorm1d):
                    m.running_mean.normal_()
                    m.num_batches_tracked.fill_(7)
        sides = {"A": SideInfo("mcr-a", {"family": "test", "architecture": "a", "weights": "random", "dim": 8},
                               ["text", "image"], 8, "text"),
                 "B": SideInfo("mcr-b", {"family": "test", "architecture": "b", "weights": "random", "dim": 8},
                               ["text", "audio"], 8, "text")}
        return Connector(sides=sides, projectors=projs, architecture={"A": arch, "B": arch})
""")


def _build(seed: int = 0) -> Connector:
    scope: dict = {}
    exec(BUILD, scope)  # noqa: S102 - the builder shared with the child process below
    return scope["build"](seed)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ defect 2
def test_identical_weights_give_identical_bytes_and_fingerprint_every_time(tmp_path):
    digests, fingerprints = set(), set()
    for i in range(12):  # the old writer's header order changed from one call to the next
        folder = _build().save(tmp_path / f"c{i}")
        digests.add(_digest(folder / WEIGHTS_FILE))
        fingerprints.add(Connector.load(folder).fingerprint)
    assert len(digests) == 1 and len(fingerprints) == 1
    assert _build(seed=1).fingerprint not in fingerprints  # other weights: another fingerprint


def test_identical_weights_give_identical_bytes_in_another_process(tmp_path):
    here = _build().save(tmp_path / "here")
    code = BUILD + f"\nbuild().save({str(tmp_path / 'there')!r})\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert (here / WEIGHTS_FILE).read_bytes() == (tmp_path / "there" / WEIGHTS_FILE).read_bytes()
    assert Connector.load(here).fingerprint == Connector.load(tmp_path / "there").fingerprint


def test_resaving_the_same_run_keeps_files_and_fingerprint(tiny_synthetic, tmp_path):
    """``connect --resume`` of a finished run re-saves the connector: nothing may change."""
    from cmcr.trainer.loop import train_connector
    from tests.fixtures_connect import tiny_config

    p, out = tiny_synthetic, tmp_path / "run"
    first = train_connector(p["text_a"], p["text_b"], p["image_a"], p["audio_b"], out, tiny_config(epochs=1),
                            plot=False)
    before = {f: (out / f).read_bytes() for f in (WEIGHTS_FILE, META_FILE)}
    for _ in range(3):
        again = train_connector(p["text_a"], p["text_b"], p["image_a"], p["audio_b"], out, tiny_config(epochs=1),
                                resume=True, plot=False)
        assert again["fingerprint"] == first["fingerprint"]
        assert {f: (out / f).read_bytes() for f in (WEIGHTS_FILE, META_FILE)} == before


# ------------------------------------------------------------------------------------------ defect 7
@pytest.fixture
def saved(tmp_path) -> Path:
    return _build().save(tmp_path / "conn")


def _edit(folder: Path, change) -> None:  # noqa: ANN001
    meta = json.loads((folder / META_FILE).read_text())
    change(meta)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def test_deleting_the_recorded_digest_does_not_turn_the_check_off(saved):
    data = bytearray((saved / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0x01  # a changed weight
    (saved / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ConnectorError, match="sha256"):
        Connector.load(saved)
    _edit(saved, lambda m: m["weights"].pop("sha256"))
    with pytest.raises(ConnectorError, match="sha256"):
        Connector.load(saved)
    _edit(saved, lambda m: m.pop("fingerprint"))
    with pytest.raises(ConnectorError, match="sha256"):
        Connector.load(saved)


def test_deleting_the_digest_of_intact_weights_is_refused_too(saved):
    _edit(saved, lambda m: m["weights"].pop("sha256"))
    with pytest.raises(ConnectorError, match="sha256"):
        Connector.load(saved)


def test_swapped_sides_in_the_metadata_are_detected(saved):
    def swap(meta):  # noqa: ANN001, ANN202
        meta["sides"]["A"], meta["sides"]["B"] = meta["sides"]["B"], meta["sides"]["A"]

    _edit(saved, swap)
    with pytest.raises(ConnectorError, match="side"):
        Connector.load(saved)


@pytest.mark.parametrize("field,value", [("mcr", "other"), ("modalities", ["text", "3d"]),
                                          ("encoder", {"family": "test", "architecture": "z", "weights": "random",
                                                       "dim": 8})])
def test_edited_side_identity_is_detected(saved, field, value):
    _edit(saved, lambda m: m["sides"]["B"].__setitem__(field, value))
    with pytest.raises(ConnectorError, match="side"):
        Connector.load(saved)


def test_edited_architecture_is_detected(saved, tmp_path):
    # architectures A and B are equal here; swap-proofing also covers an edited activation
    _edit(saved, lambda m: m["architecture"]["A"].__setitem__("activation", "gelu"))
    with pytest.raises(ConnectorError, match="architecture"):
        Connector.load(saved)


def test_untouched_connector_loads_and_metadata_edits_outside_the_binding_are_allowed(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    _edit(copy, lambda m: m["metrics"].__setitem__("note", "added by hand"))
    assert Connector.load(copy).fingerprint == Connector.load(saved).fingerprint
