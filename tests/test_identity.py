"""Encoder identities are compared on what changes the vectors: embeddings imported from other tools
(clip-retrieval, an open_clip script, LAION-CLAP) line up with cmcr-encoded stores of the same model."""

from __future__ import annotations

import numpy as np
import pytest

from cmcr.errors import StoreMismatchError
from cmcr.stores.store import comparable_identity, same_encoder
from tests.fixtures_connect import unit_rows

CLIP = {"family": "open_clip", "architecture": "ViT-B-32", "weights": "openai", "dim": 16}
CLAP = {"family": "clap", "architecture": "HTSAT-tiny", "text_model": "roberta", "fusion": False,
        "weights": "sha256:" + "ab" * 32, "dim": 16}


def test_fields_that_do_not_change_the_vectors_are_ignored():
    imported = {**CLIP, "seed": 0, "source": "clip-retrieval 2.44", "notes": "img_emb/"}
    assert same_encoder(CLIP, imported)
    assert comparable_identity(imported) == CLIP
    old_clap = {**CLAP, "tokenizer": "roberta vocab 50265 sha256:0123"}  # older cmcr CLAP stores
    assert same_encoder(CLAP, old_clap)


def test_fields_that_change_the_vectors_still_count():
    assert not same_encoder(CLIP, {**CLIP, "weights": "laion2b_s34b_b79k"})
    assert not same_encoder(CLIP, {**CLIP, "architecture": "ViT-B-16"})
    assert not same_encoder(CLAP, {**CLAP, "fusion": True})
    assert not same_encoder(CLIP, {**CLIP, "activation": "gelu"})
    rnd = {**CLIP, "weights": "random"}
    assert same_encoder({**rnd, "seed": 0}, {**rnd, "seed": 0})
    assert not same_encoder({**rnd, "seed": 0}, {**rnd, "seed": 1})  # a random init does depend on its seed
    # projected identities compare their base encoders the same way
    proj = {"family": "cmcr-projected", "connector": "f" * 16, "side": "A", "base": CLIP, "dim": 8}
    assert same_encoder(proj, {**proj, "base": {**CLIP, "seed": 0}})


def test_connect_accepts_an_imported_store_with_a_seed_next_to_a_cmcr_store(make_store):
    from cmcr.trainer.data import open_connect_stores

    rng = np.random.default_rng(0)
    keys = [f"c{i}" for i in range(20)]
    sa = make_store("clip_text", unit_rows(rng, 20, 16), modality="text", encoder=CLIP, keys=keys)
    sb = make_store("clap_text", unit_rows(rng, 20, 16), modality="text", encoder=CLAP, keys=keys)
    # CLIP image embeddings brought in from clip-retrieval, identity with a recorded seed and a source note
    ma = make_store("clip_image", unit_rows(rng, 30, 16), modality="image",
                    encoder={**CLIP, "seed": 0, "source": "clip-retrieval"})
    mb = make_store("clap_audio", unit_rows(rng, 30, 16), modality="audio", encoder=CLAP)
    opened = open_connect_stores(sa, sb, ma, mb)
    assert opened is not None
    other = make_store("clip_image_l14", unit_rows(rng, 30, 16), modality="image",
                       encoder={**CLIP, "weights": "laion2b_s34b_b79k"})
    with pytest.raises(StoreMismatchError, match="same MCR"):
        open_connect_stores(sa, sb, other, mb)


@pytest.mark.parametrize("command", ["search", "zeroshot"])
def test_search_and_eval_zeroshot_take_clap_tokenizer(command, tiny_trained, tiny_synthetic, tmp_path, capsys):
    from cmcr.cli import main

    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    enc = ["--encoder", "clap:cmcr-tiny-clap@random", "--clap-tokenizer", str(empty)]
    if command == "search":
        from cmcr.trainer.evaluate import project_store

        gallery = tmp_path / "g.cmcr"
        project_store(tiny_trained, tiny_synthetic["image_a"], gallery)
        args = ["search", "-c", str(tiny_trained), "-g", str(gallery), "--text", "a dog", *enc]
    else:
        args = ["eval", "zeroshot", "-c", str(tiny_trained), "-s", str(tiny_synthetic["audio_b"]),
                "--classes", "dog,cat", *enc]
    # the folder reaches the CLAP encoder: it is read (and found lacking), not ignored
    assert main(args) == 1
    assert "lacks" in capsys.readouterr().err
