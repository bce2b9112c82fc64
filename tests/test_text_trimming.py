"""Text encoding runs on the batch's used length only; embeddings must equal the full-context ones."""

from __future__ import annotations

import torch

CAPTIONS = ["a dog barking at a cat on the sofa", "two elephants", "x", "a very long caption " * 30]


def _batch(encoder, captions):  # noqa: ANN001
    pre = encoder.preprocessor("text")
    return encoder.collate("text", [pre(c)[0] for c in captions])


def test_open_clip_trimmed_text_equals_full_context(tiny_clip):
    assert tiny_clip._can_trim_text()
    for captions in (CAPTIONS, CAPTIONS[:3], CAPTIONS[2:3]):
        batch = _batch(tiny_clip, captions)
        with torch.inference_mode():
            full = tiny_clip.model.encode_text(batch)
            trimmed = tiny_clip.forward("text", batch)
        torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)


def test_end_of_text_token_is_the_argmax_the_trim_relies_on():
    from open_clip import get_tokenizer

    tokens = get_tokenizer("ViT-B-32")(["two elephants", "a dog barking at a cat on the sofa"])
    last = tokens.argmax(dim=-1)  # end-of-text positions
    assert last.tolist() == [3, 10]  # trimming keeps 11 of 77 positions for this batch


def test_clap_trimmed_text_equals_full_context(tiny_clap):
    from cmcr.pipeline.clap_encoder import trim_padding

    for captions in (CAPTIONS[:3], CAPTIONS[2:3], CAPTIONS):
        batch = _batch(tiny_clap, captions)
        trimmed_batch = trim_padding(batch)
        assert trimmed_batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
        with torch.inference_mode():
            full = tiny_clap.model.encode_text(batch, device="cpu")
            trimmed = tiny_clap.forward("text", batch)
        torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
