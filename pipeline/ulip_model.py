"""ULIP-2 PointBERT model (three towers) and strict loading of its released checkpoint.

Our own implementation of the model class ``ULIP_PointBERT`` of ULIP / ULIP-2 (Xue et al., CVPR 2023;
arXiv 2305.08275) as vendored by the C-MCR authors (MCR-PEFT/C-MCR, commit 038dec1,
``cmcr/ULIP/models/ULIP_models.py`` and ``models/pointbert/``). Parameter names match that code, so
the released ``pointbert_ULIP-2.pt`` loads key for key (the contract is
``ulip2_pointbert_state_dict.json``: 462 keys, 171.9 M values). Three towers, all projected to 512:

* **3D** — PointBERT :class:`PointTransformer` (``point_encoder.*``): the cloud ``(B, N, 3)`` is split
  into ``num_group`` = 512 groups of ``group_size`` = 32 points (farthest-point-sampled centres, k
  nearest neighbours of each centre, coordinates relative to the centre); a mini-PointNet
  (``encoder.first_conv`` / ``second_conv``: shared MLP, max-pool, concat, MLP, max-pool) embeds
  every group to 256, ``reduce_dim`` -> 384; a cls token + positional embeddings of the centres
  (``pos_embed``: Linear-GELU-Linear on xyz) go through 12 pre-norm blocks (6 heads, qkv without
  bias; the positional embedding is added before every block); output = concat(cls, max over groups)
  = 768, then ``pc_projection (768, 512)``.
* **image** — the SLIP ViT-B/16 tower: timm ``vit_base_patch16_224``, ``num_classes=0`` (cls token
  output, 768) then ``image_projection (768, 512)``.
* **text** — CLIP-style transformer (``token_embedding (49408, 512)``, 12 layers x 512, 8 heads,
  causal mask, ``ln_final``), pooled at the end-of-text token (the largest id) then
  ``text_projection (512, 512)``.

Grouping needs no compiled extension (unlike ``knn_cuda`` / ``pointnet2_ops`` in the reference):
kNN is ``torch.cdist`` + ``topk`` on any device; farthest-point sampling is a torch loop on a GPU and
the same loop in numpy on the CPU (see :func:`farthest_point_sample`). It is deterministic: the first
FPS centre is point 0 (the reference draws it at random, so its embeddings vary slightly from call to
call; ours do not).

Loading (:func:`load_ulip_state_dict`) reads the released file form
``{"state_dict": {"module." + key: tensor}, "args": argparse.Namespace(...), ...}`` with
``torch.load(weights_only=True)`` and exactly ``argparse.Namespace`` allowlisted: no other pickled
object can be built, no code runs.
"""

from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmcr.errors import EncoderError


@dataclass(frozen=True)
class UlipConfig:
    """Sizes of the three towers (defaults = ULIP-2 PointBERT, ``PointTransformer_8192point.yaml``)."""

    # 3D tower (PointBERT)
    num_group: int = 512
    group_size: int = 32
    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    encoder_dims: int = 256
    # image tower (timm ViT)
    vision_model: str = "vit_base_patch16_224"
    vision_kwargs: dict[str, Any] = field(default_factory=dict)
    vision_width: int = 768
    image_size: int = 224
    # text tower
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    # joint space
    embed_dim: int = 512

    @property
    def pc_feat_dims(self) -> int:
        """Width of the point encoder output: concat(cls, max-pool) = 2 x ``trans_dim``."""
        return 2 * self.trans_dim


#: Named configurations: ``PointBERT`` (the released ULIP-2 model) and a tiny one for tests.
CONFIGS: dict[str, UlipConfig] = {
    "PointBERT": UlipConfig(),
    "cmcr-tiny-ulip": UlipConfig(
        num_group=16, group_size=8, trans_dim=32, depth=1, num_heads=2, encoder_dims=32,
        vision_kwargs={"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2},
        vision_width=32, image_size=32, transformer_width=32, transformer_heads=2, transformer_layers=1,
        embed_dim=64,
    ),
    # the tiny towers with the full 512-d joint space: fits the released 512-d ulip_clip.pt heads
    # (`cmcr demo --release --fast`)
    "cmcr-tiny-ulip-512": UlipConfig(
        num_group=16, group_size=8, trans_dim=32, depth=1, num_heads=2, encoder_dims=32,
        vision_kwargs={"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2},
        vision_width=32, image_size=32, transformer_width=32, transformer_heads=2, transformer_layers=1,
        embed_dim=512,
    ),
}


# ---------------------------------------------------------------------------------------------
# grouping: farthest-point sampling + kNN, plain torch
# ---------------------------------------------------------------------------------------------
def farthest_point_sample(xyz: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of ``n`` farthest-point-sampled points, the first one being point 0.

    Args:
        xyz: ``(B, N, 3)`` float coordinates, ``N >= n``.
        n: number of centres.

    Returns:
        ``(B, n)`` int64 indices into ``N`` (deterministic: ties go to the lowest index).

    The loop has ``n`` sequential steps of small element-wise work. On the CPU it runs in numpy:
    torch would split every small step over its intra-op threads, and on a machine whose cores are
    shared (DataLoader workers, other jobs) that synchronisation made it 13x slower than numpy on one
    thread (benchmarks/bench_ulip.py); on a GPU it runs as torch kernels. Both give the same indices.
    """
    if xyz.device.type == "cpu":
        return torch.from_numpy(_fps_numpy(xyz.detach().numpy(), n))
    return _fps_torch(xyz, n)


def _fps_torch(xyz: torch.Tensor, n: int) -> torch.Tensor:
    b, npts, c = xyz.shape
    idx = torch.zeros(b, n, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, npts), float("inf"), dtype=xyz.dtype, device=xyz.device)
    farthest = torch.zeros(b, 1, 1, dtype=torch.long, device=xyz.device)
    for i in range(n):  # n small kernels per step; in-place updates keep allocations out of the loop
        idx[:, i] = farthest[:, 0, 0]
        centre = torch.gather(xyz, 1, farthest.expand(b, 1, c))  # (B, 1, 3)
        torch.minimum(dist, (xyz - centre).square_().sum(-1), out=dist)
        farthest = dist.argmax(-1).view(b, 1, 1)
    return idx


def _fps_numpy(xyz: np.ndarray, n: int) -> np.ndarray:
    b, npts, _ = xyz.shape
    idx = np.zeros((b, n), np.int64)
    dist = np.full((b, npts), np.inf, xyz.dtype)
    farthest = np.zeros(b, np.int64)
    rows = np.arange(b)
    diff = np.empty_like(xyz)
    for i in range(n):
        idx[:, i] = farthest
        np.subtract(xyz, xyz[rows, farthest][:, None, :], out=diff)
        np.square(diff, out=diff)
        np.minimum(dist, diff.sum(-1), out=dist)
        farthest = dist.argmax(1)
    return idx


def knn_indices(xyz: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` nearest points of ``xyz`` ``(B, N, 3)`` to each centre ``(B, G, 3)``:
    ``(B, G, k)`` int64, nearest first (squared Euclidean distance)."""
    d = torch.cdist(centres, xyz, compute_mode="donot_use_mm_for_euclid_dist")
    return d.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(xyz: torch.Tensor, num_group: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PointBERT grouping: FPS centres, kNN neighbourhoods relative to their centre.

    Args:
        xyz: ``(B, N, 3)`` float coordinates, ``N >= max(num_group, group_size)``.

    Returns:
        ``(neighbourhoods (B, G, M, 3), centres (B, G, 3))`` with ``G = num_group``, ``M = group_size``.
    """
    b, n, _ = xyz.shape
    if n < max(num_group, group_size):
        raise ValueError(f"a point cloud of {n} points cannot be split into {num_group} groups of "
                         f"{group_size} points (needs at least {max(num_group, group_size)})")
    rows = torch.arange(b, device=xyz.device)
    centres = xyz[rows[:, None], farthest_point_sample(xyz, num_group)]  # (B, G, 3)
    nn_idx = knn_indices(xyz, centres, group_size)  # (B, G, M)
    neigh = xyz[rows[:, None, None], nn_idx]  # (B, G, M, 3)
    return neigh - centres.unsqueeze(2), centres


# ---------------------------------------------------------------------------------------------
# 3D tower: PointBERT
# ---------------------------------------------------------------------------------------------
class MiniPointNet(nn.Module):
    """Group encoder (``point_encoder.encoder``): ``(B, G, M, 3)`` -> ``(B, G, encoder_dims)``."""

    def __init__(self, encoder_channel: int):
        super().__init__()
        self.encoder_channel = encoder_channel
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                        nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                         nn.Conv1d(512, encoder_channel, 1))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        b, g, m, _ = groups.shape
        x = self.first_conv(groups.reshape(b * g, m, 3).transpose(2, 1))  # (BG, 256, M)
        pooled = x.max(dim=2, keepdim=True).values
        x = torch.cat([pooled.expand(-1, -1, m), x], dim=1)  # (BG, 512, M)
        x = self.second_conv(x).max(dim=2).values  # (BG, C)
        return x.reshape(b, g, self.encoder_channel)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention, qkv without bias (PointBERT), scale ``head_dim ** -0.5``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn = Attention(dim, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """PointBERT blocks; the positional embedding is added to the input of every block."""

    def __init__(self, dim: int, depth: int, num_heads: int):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads) for _ in range(depth)])

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointTransformer(nn.Module):
    """PointBERT point encoder: ``(B, N, 3)`` xyz -> ``(B, 2 * trans_dim)`` = concat(cls, max-pool)."""

    def __init__(self, cfg: UlipConfig):
        super().__init__()
        self.num_group = cfg.num_group
        self.group_size = cfg.group_size
        self.trans_dim = cfg.trans_dim
        self.encoder = MiniPointNet(cfg.encoder_dims)
        self.reduce_dim = nn.Linear(cfg.encoder_dims, cfg.trans_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.trans_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, cfg.trans_dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, cfg.trans_dim))
        self.blocks = TransformerEncoder(cfg.trans_dim, cfg.depth, cfg.num_heads)
        self.norm = nn.LayerNorm(cfg.trans_dim)

    def group(self, xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grouping step alone (see :func:`group_points`)."""
        return group_points(xyz, self.num_group, self.group_size)

    def forward_groups(self, neighbourhoods: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """Everything after grouping: mini-PointNet, transformer, concat(cls, max-pool) ``(B, 2 * trans_dim)``."""
        tokens = self.reduce_dim(self.encoder(neighbourhoods))  # (B, G, D)
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(centres)], dim=1)
        x = self.norm(self.blocks(x, pos))
        return torch.cat([x[:, 0], x[:, 1:].max(dim=1).values], dim=-1)

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        return self.forward_groups(*self.group(xyz[..., :3].contiguous()))


# ---------------------------------------------------------------------------------------------
# text tower: CLIP-style transformer
# ---------------------------------------------------------------------------------------------
class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (as CLIP's, for half-precision inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask.to(y.dtype))[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


# ---------------------------------------------------------------------------------------------
# the whole model
# ---------------------------------------------------------------------------------------------
class UlipModel(nn.Module):
    """ULIP_PointBERT: ``encode_pc`` / ``encode_image`` / ``encode_text`` -> ``(B, embed_dim)`` (not normalised)."""

    def __init__(self, cfg: UlipConfig):
        super().__init__()
        import timm

        self.cfg = cfg
        self.context_length = cfg.context_length
        self.visual = timm.create_model(cfg.vision_model, pretrained=False, num_classes=0, **cfg.vision_kwargs)
        self.transformer = TextTransformer(cfg.transformer_width, cfg.transformer_layers, cfg.transformer_heads)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.transformer_width))
        self.ln_final = LayerNorm(cfg.transformer_width)
        self.image_projection = nn.Parameter(torch.empty(cfg.vision_width, cfg.embed_dim))
        self.text_projection = nn.Parameter(torch.empty(cfg.transformer_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.point_encoder = PointTransformer(cfg)
        self.pc_projection = nn.Parameter(torch.empty(cfg.pc_feat_dims, cfg.embed_dim))
        self.register_buffer("attn_mask", self._causal_mask(cfg.context_length), persistent=False)
        self._init_parameters()

    @staticmethod
    def _causal_mask(n: int, device: str | torch.device | None = None) -> torch.Tensor:
        return torch.full((n, n), float("-inf"), device=device).triu_(1)

    def _init_parameters(self) -> None:
        """The reference initialisation (CLIP's for the text tower; used by ``@random`` only)."""
        if self.positional_embedding.is_meta:
            return
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        t = self.transformer
        proj_std = (t.width ** -0.5) * ((2 * t.layers) ** -0.5)
        for block in t.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=t.width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * t.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.image_projection, std=self.cfg.vision_width ** -0.5)
        nn.init.normal_(self.text_projection, std=t.width ** -0.5)
        nn.init.normal_(self.pc_projection, std=self.cfg.embed_dim ** -0.5)

    def encode_pc(self, pc: torch.Tensor) -> torch.Tensor:
        """``(B, N, 3|6)`` point clouds (xyz first; extra columns ignored) -> ``(B, embed_dim)``."""
        return self.point_encoder(pc) @ self.pc_projection

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised images -> ``(B, embed_dim)``."""
        return self.visual(image) @ self.image_projection

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """``(B, context_length)`` int64 BPE ids -> ``(B, embed_dim)``, pooled at the end-of-text token.

        The causal mask lets the transformer run on the first ``L`` positions only (``L`` = the
        longest sequence in the batch): the pooled token attends to earlier positions only, so the
        result equals the full-length forward pass (float rounding aside).
        """
        eot = text.argmax(dim=-1)  # the end-of-text token has the largest id
        n = int(eot.max().item()) + 1
        x = self.token_embedding(text[:, :n]) + self.positional_embedding[:n]
        x = self.ln_final(self.transformer(x, self.attn_mask[:n, :n]))
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection


def build_model(architecture: str, *, device: str | torch.device = "cpu", seed: int = 0) -> UlipModel:
    """Build a named configuration (``PointBERT`` or ``cmcr-tiny-ulip``) with seeded random weights.

    ``device="meta"`` builds the parameter shapes only (no memory, instant): used by the contract test.

    Raises:
        EncoderError: unknown architecture.
    """
    if architecture not in CONFIGS:
        raise EncoderError(f"unknown ULIP architecture {architecture!r}; known: {sorted(CONFIGS)} "
                           f"(ulip:PointBERT@/path/pointbert_ULIP-2.pt for the released ULIP-2 model)")
    if str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = UlipModel(CONFIGS[architecture])
    return model.eval()


# ---------------------------------------------------------------------------------------------
# checkpoint file: strict, no unpickling
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FORM = ('{"state_dict": {"module." + key: tensor}, "args": argparse.Namespace(...)} '
                   '(ULIP-2 pointbert_ULIP-2.pt, model class ULIP_PointBERT)')


def read_checkpoint_file(path: str | Path) -> Any:
    """``torch.load`` a user's checkpoint file safely: ``weights_only=True``, only ``argparse.Namespace``
    allowlisted (the ``args`` entry of ULIP checkpoints). The one place this module unpickles.

    Raises:
        EncoderError: missing file, or a file torch cannot read under those rules (names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise EncoderError(f"ULIP checkpoint {p} does not exist; pass the file of {CHECKPOINT_FORM}, "
                           f"e.g. ulip:PointBERT@/path/pointbert_ULIP-2.pt")
    from cmcr.errors import CorruptFileError, UnsafeFileError
    from cmcr.safeload import load_torch_file

    try:
        return load_torch_file(p, what="ULIP checkpoint", allowed_globals=[argparse.Namespace])
    except (CorruptFileError, UnsafeFileError) as e:  # a disallowed global, truncated zip, not a torch file
        raise EncoderError(f"cannot read ULIP checkpoint {p} ({e}); expected {CHECKPOINT_FORM}, loadable with "
                           f"torch.load(weights_only=True)") from e


def _short(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def extract_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a loaded checkpoint object: ``obj["state_dict"]`` (or ``obj`` itself when
    it is a flat dict of tensors), with the DistributedDataParallel ``module.`` prefix removed.

    Raises:
        EncoderError: ``obj`` is not of that form (names the file and what was found).
    """
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        found = f"a dict with keys {_short(sorted(map(str, obj)))}" if isinstance(obj, Mapping) else type(obj).__name__
        raise EncoderError(f"ULIP checkpoint {path} holds {found}; expected {CHECKPOINT_FORM}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], path: str | Path, architecture: str) -> None:
    """Strict key and shape check of ``sd`` against ``model``.

    Raises:
        EncoderError: listing the missing, unexpected and mis-shaped keys, the file and the expected form.
    """
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shaped = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if not (missing or unexpected or shaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_short(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_short(unexpected)}")
    if shaped:
        parts.append(f"{len(shaped)} key(s) of the wrong shape: "
                     + _short([f"{k} {list(got[k])} (model: {list(want[k])})" for k in shaped]))
    raise EncoderError(f"ULIP checkpoint {path} does not match architecture {architecture!r}: "
                       + "; ".join(parts) + f". Expected {CHECKPOINT_FORM}; pass the ULIP-2 PointBERT "
                       f"checkpoint with ulip:PointBERT@FILE")


def load_ulip_state_dict(model: UlipModel, path: str | Path, architecture: str) -> dict[str, Any]:
    """Load a ULIP checkpoint file into ``model`` strictly (keys and shapes), without unpickling code.

    ``model`` may live on the meta device (:func:`build_model` with ``device="meta"``): the file's
    tensors are then assigned (no random init of 172 M values first) and the model ends on the CPU.

    Returns:
        ``{"args_model": <args.model of the file or None>}`` (informational).

    Raises:
        EncoderError: unreadable file, wrong form, or missing / unexpected / mis-shaped keys.
    """
    obj = read_checkpoint_file(path)
    sd = extract_state_dict(obj, path)
    check_state_dict(model, sd, path, architecture)
    meta = model.positional_embedding.is_meta
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True,
                          assign=meta)
    if meta:
        model.attn_mask = model._causal_mask(model.context_length, device="cpu")
    args = obj.get("args") if isinstance(obj, Mapping) else None
    return {"args_model": getattr(args, "model", None)}


def save_ulip_checkpoint(model: nn.Module, path: str | Path, **args: Any) -> None:
    """Write ``model`` in the released file form (``module.`` prefix + ``argparse.Namespace`` args) —
    for tests and for converting weights."""
    sd = {"module." + k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "args": argparse.Namespace(model="ULIP_PointBERT", **args), "epoch": 0}, path)
