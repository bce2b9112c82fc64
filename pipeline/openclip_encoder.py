"""open_clip adapter: image and text embeddings from any open_clip architecture.

Weights: a pretrained tag (its file comes through :mod:`cmcr.pipeline.hub`: the Hugging Face cache,
else a one-time download; the tag's QuickGELU and preprocessing settings are applied), a local
checkpoint file (identity records ``sha256:<hex>``), or ``random`` (explicit; seeded). Architectures are
open_clip's built-in configs plus the JSON configs in ``pipeline/model_configs`` (e.g.
``cmcr-tiny-clip``, a 3.4 M-parameter ViT for tests and demos).

Image path: :func:`cmcr.pipeline.images.decode_image` (any PIL mode -> RGB, alpha over white), then
open_clip's own eval transform for the model (resize shortest side, centre crop, normalise).
Text path: :func:`cmcr.pipeline.text.decode_text`, then the model's tokenizer; captions longer than
the context length are truncated by the tokenizer and flagged per row (``truncated``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from cmcr.errors import EncoderError
from cmcr.pipeline.encoders import MODEL_CONFIG_DIR, Encoder, EncoderSpec
from cmcr.pipeline.images import BACKGROUND, decode_image
from cmcr.pipeline.text import decode_text

log = logging.getLogger(__name__)

DEFAULT_TAG = "openai"
_registered = False


def _open_clip():
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True
    return open_clip


class _ToDebug(logging.Filter):
    """Root-logger filter: open_clip's own messages (it logs to the root logger) re-logged at DEBUG here."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root":
            log.debug("open_clip: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _open_clip_logs_at_debug() -> Iterator[None]:
    """Silence open_clip's root-logger messages while a model is built.

    ``create_model`` logs ``No pretrained weights loaded ... initialized randomly`` for an explicit
    ``@random`` and ``Failed to download weights`` before our :class:`EncoderError` says the same
    with a fix; both go to DEBUG (``cmcr -v``) instead.
    """
    root = logging.getLogger()
    flt = _ToDebug()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


class ImagePreprocessor:
    """Picklable ``bytes -> ((3, H, W) float32 tensor, {"width", "height"})`` for one model."""

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, raw: bytes) -> tuple[Any, dict[str, Any]]:
        img = decode_image(raw)
        return self.transform(img), {"width": img.width, "height": img.height}


class OpenClipTextPreprocessor:
    """Picklable ``caption -> ((L,) int64 token ids, {"text", "truncated"})``."""

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, raw: bytes | str) -> tuple[Any, dict[str, Any]]:
        text = decode_text(raw)
        ids = self.tokenizer([text], context_length=self.context_length)[0]
        if hasattr(self.tokenizer, "encode"):  # SimpleTokenizer: BPE tokens + <start> + <end>
            n = len(self.tokenizer.encode(text)) + 2
        else:  # HF tokenizers: count with the wrapped tokenizer
            n = len(self.tokenizer.tokenizer(text)["input_ids"])
        return ids, {"text": text, "truncated": bool(n > self.context_length)}


class OpenClipEncoder(Encoder):
    """open_clip model adapter (modalities ``image`` and ``text``)."""

    family = "open_clip"
    modalities = ("image", "text")

    def __init__(self, spec: EncoderSpec, device: str = "cpu", precision: str = "fp32"):
        super().__init__(device=device, precision=precision)
        import torch

        open_clip = _open_clip()
        self.spec = spec
        arch = spec.architecture
        if arch not in open_clip.list_models():
            raise EncoderError(
                f"unknown open_clip architecture {arch!r}; known: e.g. ViT-B-32, ViT-L-14, RN50, "
                f"cmcr-tiny-clip (see open_clip.list_models())"
            )
        weights = spec.weights or DEFAULT_TAG
        ckpt = spec.checkpoint
        if spec.is_random:
            torch.manual_seed(spec.seed)
            pretrained = None
            self._weights_id = "random"
        elif ckpt is not None:
            if not ckpt.is_file():
                raise EncoderError(f"open_clip checkpoint {ckpt} does not exist; pass an existing file "
                                   f"(open_clip:{arch}@/path/ckpt.pt) or a pretrained tag")
            from cmcr.safeload import check_torch_file
            from cmcr.stores.files import sha256_file

            check_torch_file(ckpt, what="open_clip checkpoint")  # open_clip loads it with weights_only=True too
            pretrained = str(ckpt)
            self._weights_id = "sha256:" + sha256_file(ckpt)
        tag_kwargs: dict[str, Any] = {}
        hub_file = None
        if not spec.is_random and ckpt is None:
            # a pretrained tag: the weights come through cmcr's hub module (cache first, then the hub),
            # then open_clip loads the local file with the tag's settings (QuickGELU, preprocessing)
            hub_file, tag_kwargs = fetch_pretrained(arch, weights)
            pretrained = str(hub_file.path)
            self._weights_id = weights
        # ViT-B-32 and ViT-B-32-quickgelu with a QuickGELU tag (openai) are the same model: one identity
        base = arch[: -len("-quickgelu")] if arch.endswith("-quickgelu") else arch
        self._identity_arch = base if tag_kwargs.get("force_quick_gelu") and base in open_clip.list_models() else arch
        try:
            with _open_clip_logs_at_debug():
                model = open_clip.create_model(arch, pretrained=pretrained, device=device,
                                               pretrained_image=False, pretrained_text=False, **tag_kwargs)
        except Exception as e:  # bad checkpoints (wrong architecture, truncated file)
            if hub_file is not None:
                from cmcr.pipeline.hub import broken_file_error

                first = (str(e).strip().splitlines() or [""])[0]
                raise broken_file_error(hub_file, f"open_clip weights for {arch}@{weights}",
                                        f"{type(e).__name__}: {first}") from e
            raise EncoderError(
                f"cannot build open_clip {arch} with weights {weights!r} ({type(e).__name__}: {e}). "
                f"Is the checkpoint a state dict of this architecture? Use @random only for tests"
            ) from e
        model.eval()
        self.model = model
        self.architecture = arch
        self.dim = int(model.text_projection.shape[1] if hasattr(model, "text_projection")
                       and model.text_projection is not None else model.visual.output_dim)
        from open_clip.transform import PreprocessCfg, image_transform_v2

        pp_cfg = open_clip.get_model_preprocess_cfg(model)
        self._pp_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp_cfg.items()}
        self._transform = image_transform_v2(PreprocessCfg(**pp_cfg), is_train=False)
        self._tokenizer = open_clip.get_tokenizer(arch)
        self._int8_text: Any = None
        self.context_length = int(getattr(self._tokenizer, "context_length", None) or model.context_length)

    def identity(self) -> dict[str, Any]:
        return self._identity(self._identity_arch)

    def preprocessing(self, modality: str) -> dict[str, Any]:
        self.check_modality(modality)
        if modality == "image":
            return {"decode": "PIL, exif_transpose, first frame; alpha composited over background",
                    "background": list(BACKGROUND), "transform": "open_clip image_transform_v2 (eval)",
                    **self._pp_cfg}
        return {"tokenizer": type(self._tokenizer).__name__, "context_length": self.context_length,
                "clean": "NFC, whitespace collapsed", "truncation": "tokenizer truncates; flagged per row"}

    def preprocessor(self, modality: str):
        self.check_modality(modality)
        if modality == "image":
            return ImagePreprocessor(self._transform)
        return OpenClipTextPreprocessor(self._tokenizer, self.context_length)

    def forward(self, modality: str, batch: Any) -> Any:
        if modality == "image":
            return self.model.encode_image(batch)
        if self._int8_text is not None:
            return self._encode_text_trimmed(batch, self._int8_text)
        if self._can_trim_text():
            return self._encode_text_trimmed(batch)
        return self.model.encode_text(batch)

    def quantize_text(self, mode: str = "int8") -> None:
        """Switch text queries to an int8 copy of the text tower (query serving only, opt-in).

        Every ``Linear`` of the text transformer — the MLPs and the attention input/output projections
        (``nn.MultiheadAttention`` is rebuilt from two ``Linear`` layers with the same weights, since
        PyTorch's dynamic quantisation skips its packed projections) — becomes a dynamically quantised
        int8 ``Linear`` (``torch.ao.quantization.quantize_dynamic``: int8 weights per tensor,
        activations quantised per call). Token/positional embeddings, layer norms, attention softmax
        and the final projection stay float32. The text forward reads ~4x fewer weight bytes (~3-4x
        faster on CPU); embeddings agree with float32 at cosine ~0.998 (measured by
        ``benchmarks/bench_serve.py``). The identity is unchanged (same weights) but
        :attr:`text_quantization` is set, and :func:`cmcr.pipeline.encode.open_store` refuses such an
        encoder: int8 rows must never mix into a store of float32-computed rows.

        Activations are quantised with one scale per call, so a query's embedding would depend on the
        other queries of a batch: callers embed int8 queries one at a time.

        Raises:
            EncoderError: ``mode`` is not ``int8`` or the text tower is not CLIP-style.
        """
        if mode != "int8":
            raise EncoderError(f"text quantization must be 'int8', got {mode!r}")
        if not self._can_trim_text() or str(self.device) != "cpu":
            raise EncoderError(f"int8 text queries need a CLIP-style text tower on the CPU; {self.architecture} "
                               f"on {self.device} has none")
        self._int8_text = Int8TextTower(self.model)
        self.text_quantization = "int8"

    def _can_trim_text(self) -> bool:
        """True for CLIP-style text towers whose output can be computed on the batch's used length only:
        causal attention mask and pooling at the end-of-text token (``argmax``/``eos``)."""
        m = self.model
        return (all(hasattr(m, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final"))
                and getattr(m, "attn_mask", None) is not None
                and getattr(m, "text_pool_type", None) in ("argmax", "eos"))

    def _encode_text_trimmed(self, text: Any, tower: Any = None) -> Any:

        """``CLIP.encode_text`` on the first L positions only, L = the longest sequence in the batch.

        With a causal mask, the end-of-text token (where the embedding is pooled) attends to earlier
        positions only, so dropping the padded tail gives the same embedding (float rounding aside)
        while the transformer runs on L instead of 77 positions: captions average ~15 tokens, a
        several-fold speed-up of text encoding. Checked against ``encode_text`` in the tests.
        ``tower``: an :class:`Int8TextTower` to run instead of the model's own text modules.
        """
        import torch
        from open_clip.transformer import text_global_pool

        m = self.model if tower is None else tower
        eos_id = getattr(m, "text_eos_id", None)
        if m.text_pool_type == "eos" and eos_id is not None:
            last = (text == eos_id).int().argmax(dim=-1)
        else:  # argmax pooling: the end-of-text token has the largest id
            last = text.argmax(dim=-1)
        n = int(last.max().item()) + 1
        text = text[:, :n]
        cast_dtype = torch.float32 if tower is not None else m.transformer.get_cast_dtype()
        x = m.token_embedding(text).to(cast_dtype) + m.positional_embedding[:n].to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask[:n, :n])
        x = m.ln_final(x)
        x = text_global_pool(x, text, m.text_pool_type, eos_token_id=eos_id)
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return x

    def num_parameters(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    # -- dense patches (localisation) -------------------------------------------------------
    def check_dense(self) -> None:
        """Raise :class:`EncoderError` unless this model's image tower gives dense patch embeddings (a ViT)."""
        _vision_transformer(self.model.visual, f"open_clip:{self.architecture}")

    @property
    def patch_size(self) -> int:
        """Patch side in pixels of the ViT image tower."""
        self.check_dense()
        return int(self.model.visual.patch_size[0])

    def dense_preprocessor(self, size: int | None = None) -> DenseImagePreprocessor:
        """The CPU-side transform for :meth:`dense_embed`: whole image resized to ``size x size`` (default:
        the model's input size; a multiple of the patch size), model mean/std.

        Raises:
            EncoderError: not a ViT tower, or ``size`` not a positive multiple of the patch size.
        """
        self.check_dense()
        native = self._pp_cfg["size"]
        size = int(size or (native[0] if isinstance(native, list) else native))
        p = self.patch_size
        if size <= 0 or size % p:
            raise EncoderError(f"dense input size {size} must be a positive multiple of the patch size {p} "
                               f"(e.g. {max(p, size // p * p)})")
        return DenseImagePreprocessor(size, self._pp_cfg["mean"], self._pp_cfg["std"])

    def dense_embed(self, batch: Any, *, path: str = "value") -> np.ndarray:
        """Dense patch embeddings of a collated batch from :meth:`dense_preprocessor`:
        ``(B, h, w, D)`` float32, unit rows in CLIP's joint space (:func:`dense_patch_embeddings`)."""
        return dense_patch_embeddings(self, batch, path=path)


def _linear_attention(mha: Any) -> Any:
    """An ``nn.Module`` computing ``mha`` (an ``nn.MultiheadAttention`` without bias_k/v) with two plain
    ``Linear`` layers (same weights) + ``scaled_dot_product_attention``, so dynamic quantisation reaches
    the attention projections. Called as ``mha`` is: ``(q, k, v, need_weights=False, attn_mask=...)``."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class LinearAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d = mha.embed_dim
            self.heads, self.batch_first = mha.num_heads, mha.batch_first
            self.in_proj = nn.Linear(d, 3 * d)
            self.out_proj = nn.Linear(d, d)
            with torch.no_grad():
                self.in_proj.weight.copy_(mha.in_proj_weight)
                self.in_proj.bias.copy_(mha.in_proj_bias)
                self.out_proj.weight.copy_(mha.out_proj.weight)
                self.out_proj.bias.copy_(mha.out_proj.bias)

        def forward(self, q: Any, k: Any = None, v: Any = None, need_weights: bool = False,
                    attn_mask: Any = None) -> tuple[Any, None]:
            if not self.batch_first:
                q = q.transpose(0, 1)
            b, n, d = q.shape
            qkv = self.in_proj(q).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
            o = self.out_proj(o.transpose(1, 2).reshape(b, n, d))
            return (o if self.batch_first else o.transpose(0, 1)), None

    if mha.bias_k is not None or not mha._qkv_same_embed_dim or mha.in_proj_bias is None:
        raise EncoderError("int8 text queries: unsupported attention layout (bias_k/v or separate q/k/v weights)")
    return LinearAttention()


class Int8TextTower:
    """The text modules of an open_clip ``CLIP`` with the transformer's ``Linear`` layers in int8
    (dynamic quantisation); the attribute names of ``CLIP`` so :meth:`OpenClipEncoder._encode_text_trimmed`
    runs it. Embeddings, layer norms and the text projection are the model's own (float32)."""

    def __init__(self, model: Any):
        import copy
        import warnings

        import torch
        from torch import nn

        transformer = copy.deepcopy(model.transformer)
        for block in transformer.resblocks:
            block.attn = _linear_attention(block.attn)
        with warnings.catch_warnings():  # torch 2.10+ points eager quantisation users to torchao
            warnings.simplefilter("ignore")
            self.transformer = torch.ao.quantization.quantize_dynamic(transformer.eval(), {nn.Linear},
                                                                      dtype=torch.qint8, inplace=True)
        for name in ("token_embedding", "positional_embedding", "ln_final", "text_projection", "attn_mask",
                     "text_pool_type"):
            setattr(self, name, getattr(model, name))
        self.text_eos_id = getattr(model, "text_eos_id", None)


def fetch_pretrained(arch: str, tag: str) -> tuple[Any, dict[str, Any]]:
    """Get the weights of an open_clip pretrained tag through :mod:`cmcr.pipeline.hub`.

    The repo id and file names are the ones open_clip itself asks for (its ``hf_hub`` entry,
    e.g. ``timm/vit_base_patch32_clip_224.openai`` + ``open_clip_model.safetensors``, else
    ``open_clip_pytorch_model.bin``), so a cache filled by open_clip, ``hf download`` or cmcr serves all.

    Returns:
        ``(HubFile, create_model keyword arguments)``: the tag's QuickGELU setting and image
        preprocessing (mean, std, interpolation, resize mode), as open_clip applies them for a tag.

    Raises:
        EncoderError: unknown tag for this architecture.
        HubUnreachableError, HubFileError: see :func:`cmcr.pipeline.hub.fetch`.
    """
    import os

    from cmcr.pipeline import hub

    open_clip = _open_clip()
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.transform import merge_preprocess_dict

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg or not cfg.get("hf_hub"):
        known = open_clip.list_pretrained_tags_by_model(arch)
        raise EncoderError(
            f"open_clip has no pretrained tag {tag!r} for {arch}; known tags: {', '.join(known) or 'none'} "
            f"(or pass a local checkpoint: open_clip:{arch}@/path/ckpt.pt, or @random for tests)")
    # open_clip's own rule: 'org/repo/file' or 'org/repo/' (default file name)
    repo_id, filename = os.path.split(cfg["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME
    names = [filename]
    if filename == HF_WEIGHTS_NAME:  # open_clip prefers a safetensors copy when the repo has one
        names.insert(0, HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    quick_gelu = bool(cfg.get("quick_gelu"))
    local_arch = f"{arch}-quickgelu" if quick_gelu and f"{arch}-quickgelu" in open_clip.list_models() else arch
    hub_file = hub.fetch(repo_id, names, what=f"open_clip weights for open_clip:{arch}@{tag}",
                         alternative=f"pass a local copy of the weights file: open_clip:{local_arch}@/path/{names[0]} "
                                     f"(the store identity then records its sha256 instead of the tag)")
    kwargs: dict[str, Any] = {"force_preprocess_cfg": merge_preprocess_dict({}, {k: v for k, v in cfg.items()
                                                                                  if k != "size"})}
    if quick_gelu:
        kwargs["force_quick_gelu"] = True
    return hub_file, kwargs


def save_random_checkpoint(architecture: str, path: str, seed: int = 0) -> np.ndarray | None:
    """Write a random-init open_clip checkpoint (``{"state_dict": ...}``) — for tests and demos."""
    import torch

    open_clip = _open_clip()
    torch.manual_seed(seed)
    with _open_clip_logs_at_debug():
        model = open_clip.create_model(architecture, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, path)
    return None


# ------------------------------------------------------------------------------ dense patches
#: How the last block's tokens reach the joint space (see :func:`maskclip_patch_embeddings`).
DENSE_PATHS = ("value", "value+residual")


class DenseImagePreprocessor:
    """Picklable ``bytes -> ((3, S, S) float32 tensor, {"width", "height"})`` for dense patch embeddings.

    Unlike the embedding transform (resize the shortest side, then centre crop), the whole image is resized
    to ``S x S`` (bicubic, aspect not kept), so every patch maps back to a known rectangle of the original
    image and a heatmap upsampled to ``(height, width)`` covers all of it; then the model's mean/std.
    """

    def __init__(self, size: int, mean: Any, std: Any):
        self.size = int(size)
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)

    def __call__(self, raw: bytes) -> tuple[Any, dict[str, Any]]:
        import torch
        from PIL import Image

        img = decode_image(raw)
        x = np.asarray(img.resize((self.size, self.size), Image.BICUBIC), np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((x - self.mean) / self.std), {"width": img.width, "height": img.height}


def _vision_transformer(visual: Any, what: str = "") -> Any:
    """``visual`` if it is an open_clip ViT whose patch tokens can be projected one by one, else EncoderError."""
    from open_clip.transformer import VisionTransformer

    name = what or type(visual).__name__
    if not isinstance(visual, VisionTransformer):
        raise EncoderError(
            f"dense patch embeddings need an open_clip ViT image tower (VisionTransformer); {name} has a "
            f"{type(visual).__name__} tower (ResNet / timm towers are not supported). Use a ViT architecture, "
            f"e.g. open_clip:ViT-B-16 or ViT-B-32")
    if getattr(visual, "attn_pool", None) is not None:
        raise EncoderError(
            f"{name}: the image tower pools its tokens with an attentional pooler (CoCa-style); its patch tokens "
            f"are not in the joint space one by one, so dense patch embeddings are not defined. Use a CLIP ViT")
    if getattr(visual, "proj", None) is None:
        raise EncoderError(f"{name}: the image tower has no visual projection (proj is None); dense patch embeddings "
                           f"need it to reach the joint space")
    return visual


def _token_embeddings(visual: Any, images: Any) -> Any:
    """``VisionTransformer._embeds`` for any input size that is a multiple of the patch size: the learnt
    positional embedding of the patches is resized bicubically to the input's grid (the class token's is
    kept), as MaskCLIP does for inputs larger than the training resolution. Returns ``(B, 1 + h*w, width)``."""
    import torch
    import torch.nn.functional as F

    ph, pw = visual.patch_size
    H, W = images.shape[-2:]
    if H % ph or W % pw:
        raise EncoderError(f"image size {H}x{W} is not a multiple of the patch size {ph}x{pw}")
    gh, gw = H // ph, W // pw
    x = visual.conv1(images)  # (B, width, gh, gw)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding.to(x.dtype)
    g0h, g0w = visual.grid_size
    if (gh, gw) != (g0h, g0w):
        grid = pos[1:].reshape(1, g0h, g0w, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False).to(x.dtype)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)], dim=0)
    x = x + pos
    return visual.ln_pre(x)  # patch dropout: identity in eval mode


def _value_path(block: Any, x: Any) -> Any:
    """The last block's attention branch with the query-key mixing taken out (MaskCLIP): each token goes
    through ``ln_1``, the value projection and the output projection on its own (the attention output a token
    would get if it attended only to itself). ``x``: ``(B, L, width)`` -> ``(B, L, width)``."""
    import torch.nn.functional as F
    from open_clip.transformer import Attention

    y = block.ln_1(x)
    attn = block.attn
    if isinstance(attn, Attention):  # CustomResidualAttentionBlock
        d = attn.in_proj_weight.shape[1]
        bias = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
        v = F.linear(y, attn.in_proj_weight[2 * d:], bias)
        if attn.head_scale is not None:  # (heads, 1, 1) per-head scale, applied per head of the values
            B, L, _ = v.shape
            v = (v.reshape(B, L, attn.num_heads, -1) * attn.head_scale.view(1, 1, attn.num_heads, 1)).reshape(B, L, d)
        v = attn.out_proj(attn.ln_inner(v))
        v = block.ln_attn(v) if hasattr(block, "ln_attn") else v
    else:  # torch.nn.MultiheadAttention (ResidualAttentionBlock)
        d = attn.embed_dim
        weight = attn.in_proj_weight[2 * d:] if attn._qkv_same_embed_dim else attn.v_proj_weight
        bias = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
        v = attn.out_proj(F.linear(y, weight, bias))
    return block.ls_1(v)


def maskclip_patch_embeddings(visual: Any, images: Any, *, path: str = "value") -> Any:
    """Dense patch embeddings of an open_clip ViT in CLIP's joint space (MaskCLIP, Zhou et al., ECCV 2022).

    All blocks but the last run as usual. In the last block the query-key attention is skipped: each token
    takes the value path alone (``ln_1`` -> value projection -> ``out_proj``, see :func:`_value_path`);
    ``path="value"`` keeps only that branch (no residual, no MLP; the form ClearCLIP, Lan et al. 2024, found
    cleanest), ``path="value+residual"`` adds the residual and the block's MLP as MaskCLIP's code does. Then
    ``ln_post`` and the visual projection ``proj`` — the two steps the pooled class token takes — map every
    patch token into the joint space. ``final_ln_after_pool`` towers get ``ln_post`` per patch too;
    ``pool_type="avg"`` towers keep their class token, which is dropped here like in every other tower.

    Args:
        visual: ``model.visual`` of an open_clip CLIP with a ViT tower (eval mode).
        images: ``(B, 3, H, W)`` normalised float tensor; ``H``, ``W`` multiples of the patch size (the
            positional embedding is resized when the grid differs from the training grid).
        path: ``"value"`` or ``"value+residual"``.

    Returns:
        ``(B, h, w, D)`` float32 tensor (``h = H / patch``, row-major from the top-left patch), not normalised.

    Raises:
        EncoderError: not a ViT tower (ResNet, timm), an attentional-pooler tower (CoCa), no projection,
            an input size not a multiple of the patch size, or an unknown ``path``.
    """
    import torch

    if path not in DENSE_PATHS:
        raise EncoderError(f"unknown dense path {path!r}; use one of {DENSE_PATHS}")
    visual = _vision_transformer(visual)
    B, _, H, W = images.shape
    ph, pw = visual.patch_size
    x = _token_embeddings(visual, images)
    tr = visual.transformer
    batch_first = getattr(tr, "batch_first", True)
    blocks = list(tr.resblocks)
    if not batch_first:
        x = x.transpose(0, 1)
    for blk in blocks[:-1]:
        x = blk(x)
    if not batch_first:
        x = x.transpose(0, 1)
    last = blocks[-1]
    v = _value_path(last, x)
    if path == "value+residual":
        v = x + v
        v = v + last.ls_2(last.mlp(last.ln_2(v)))
    v = visual.ln_post(v[:, 1:])
    proj = visual.proj
    v = proj(v) if isinstance(proj, torch.nn.Module) else v @ proj
    return v.reshape(B, H // ph, W // pw, -1).float()


def dense_patch_embeddings(encoder: OpenClipEncoder, images: Any, *, path: str = "value") -> np.ndarray:
    """Dense patch embeddings of ``encoder``'s image tower: ``(B, h, w, D)`` float32 numpy, each patch
    L2-normalised in CLIP's joint space (the space of ``encoder.embed("image", ...)``).

    Args:
        encoder: an :class:`OpenClipEncoder` with a ViT image tower.
        images: ``(B, 3, S, S)`` tensor from :meth:`OpenClipEncoder.dense_preprocessor`.
        path: see :func:`maskclip_patch_embeddings`.

    Raises:
        EncoderError: see :func:`maskclip_patch_embeddings`.
    """
    import torch

    with torch.inference_mode(), encoder._autocast():
        x = maskclip_patch_embeddings(encoder.model.visual, encoder.to_device(images), path=path)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x.cpu().numpy().astype(np.float32, copy=False)
