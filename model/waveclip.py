"""The WaveCLIP image tower: per-level wavelet patch tokens, block-causal ViT with an explicit KV cache."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import WaveCLIPConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each [batch, heads, length, head_dim]


class Attention(nn.Module):
    """Multi-head self-attention that appends its keys/values to a cache (parameter names as open_clip's)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, past: KV | None = None, mask: torch.Tensor | tuple[int, ...] | None = None
                ) -> tuple[torch.Tensor, KV]:
        """``mask``: a boolean [T, T] mask (True: may attend), or the sizes of consecutive token blocks: block-causal
        attention computed block by block (each block's queries against the keys up to its end: no masked scores,
        the same result)."""
        w = self.in_proj_weight.shape[1]
        hd = w // self.heads
        y = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # Shapes read from the projection and q, k, v moved to [batch, heads, tokens, head_dim] by one transpose: in
        # an int8 QDQ graph a Shape of ``x`` kept a DequantizeLinear of it alive, and three transposes cost more
        # (ONNX Runtime, int8 b16 one pass: 798 -> 654 kernels, 2-4% faster; docs/performance.md)
        b, t = y.shape[0], y.shape[1]
        q, k, v = y.reshape(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        scale = 1.0 / math.sqrt(hd)
        if isinstance(mask, tuple):
            blocks, e = [], 0
            for qb in q.split(list(mask), dim=2):
                e += qb.shape[2]  # this block's queries see keys [0, e); the last block sees them all
                kb, vb = (k, v) if e >= k.shape[2] else (k[:, :, :e], v[:, :, :e])
                blocks.append(torch.matmul((torch.matmul(qb, kb.transpose(-2, -1)) * scale).softmax(dim=-1), vb))
            out = torch.cat(blocks, dim=2)
        else:
            scores = torch.matmul(q, k.transpose(-2, -1)) * scale
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.matmul(scores.softmax(dim=-1), v)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, w)), (k, v)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block (open_clip ResidualAttentionBlock layout)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, past: KV | None = None, mask: torch.Tensor | tuple[int, ...] | None = None
                ) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.ln_1(x), past, mask)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


def patch_embedding(values: int, hidden: int, width: int) -> nn.Module:
    """A level's patch embedding: linear (``hidden`` 0), or Linear -> GELU -> Linear through ``hidden`` units."""
    if not hidden:
        return nn.Linear(values, width)
    return nn.Sequential(nn.Linear(values, hidden), nn.GELU(), nn.Linear(hidden, width))


def gelu_mlp_state(weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state of a Linear -> GELU -> Linear (``patch_embedding`` with 2 x out hidden units) that computes the linear
    layer (``weight`` [out, in], ``bias``) exactly: GELU(z) - GELU(-z) = z for the exact (erf) GELU. A linear patch
    embedding so grows into a two-layer one with the same function (Net2Net-style), which fine-tuning can bend."""
    eye = torch.eye(weight.shape[0], dtype=weight.dtype)
    return {"0.weight": torch.cat([weight, -weight]), "0.bias": torch.cat([bias, -bias]),
            "2.weight": torch.cat([eye, -eye], dim=1), "2.bias": torch.zeros_like(bias)}


def resample_positions(positions: torch.Tensor, grid: int) -> torch.Tensor:
    """Position embeddings of a square grid [g*g, width] (row-major) -> those of a ``grid`` x ``grid`` one, bicubic."""
    g, w = math.isqrt(positions.shape[0]), positions.shape[1]
    square = positions.reshape(1, g, g, w).permute(0, 3, 1, 2)
    return F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)[0].permute(1, 2, 0
                                                                                                   ).reshape(-1, w)


class WaveCLIP(nn.Module):
    """WaveCLIP image tower.

    Input of level k: its wavelet patches ``[batch, grid*grid, config.patch_dim(k)]``
    (from :func:`runtime.wavelet.images_to_levels`). Each level's tokens are ``[CLS_k, patches...]``; a token of level k
    attends to every token of levels <= k, so running the levels one by one with the KV cache equals the full
    block-causal forward.
    """

    def __init__(self, config: WaveCLIPConfig) -> None:
        super().__init__()
        self.config = config
        w, n = config.width, config.num_levels
        self.patch_embed = nn.ModuleList(patch_embedding(config.patch_dim(k), config.patch_hidden, w) for k in range(n))
        for k in range(n):  # fixed input standardisation per level and value (identity unless set from data)
            self.register_buffer(f"patch_shift_{k}", torch.zeros(config.patch_dim(k)))
            self.register_buffer(f"patch_scale_{k}", torch.ones(config.patch_dim(k)))
        self.cls_token = nn.Parameter(torch.randn(n, w) * 0.02)
        self.level_embed = nn.Parameter(torch.randn(n, w) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(config.grid ** 2, w) * 0.02)
        # levels on a finer grid (config.level_grids) have position embeddings of their own, one per grid
        finer = sorted({config.level_grid(k) for k in range(n)} - {config.grid})
        self.pos_embed_grid = nn.ParameterDict({str(g): nn.Parameter(torch.randn(g * g, w) * 0.02) for g in finer})
        self.cls_pos_embed = nn.Parameter(torch.zeros(w))
        self.ln_pre = nn.LayerNorm(w)
        self.blocks = nn.ModuleList(Block(w, config.heads, config.mlp_ratio) for _ in range(config.layers))
        self.ln_post = nn.ModuleList(nn.LayerNorm(w) for _ in range(n))
        self.proj = nn.Parameter(torch.randn(w, config.embed_dim) * w ** -0.5)  # shared: one embedding space

    def set_patch_stats(self, level: int, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise level ``level``'s patch values by the data's ``mean`` and ``std`` [patch_dim] (the Haar
        detail bands are 10-100x smaller than the LL band, which would otherwise slow their weights' learning)."""
        getattr(self, f"patch_shift_{level}").copy_(mean)
        getattr(self, f"patch_scale_{level}").copy_(1.0 / std)

    def embed_level(self, level: int, patches: torch.Tensor) -> torch.Tensor:
        """Tokens of one level: [batch, 1 + grid*grid, width] (CLS first), before ``ln_pre``."""
        patches = (patches - getattr(self, f"patch_shift_{level}")) * getattr(self, f"patch_scale_{level}")
        x = self.patch_embed[level](patches) + self.position_embedding(level)
        cls = (self.cls_token[level] + self.cls_pos_embed).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.level_embed[level]

    def position_embedding(self, level: int) -> torch.Tensor:
        """[grid*grid, width] of level ``level``'s grid."""
        g = self.config.level_grid(level)
        return self.pos_embed if g == self.config.grid else self.pos_embed_grid[str(g)]

    def head(self, level: int, cls: torch.Tensor) -> torch.Tensor:
        """CLS state of a level -> its L2-normalised embedding."""
        return F.normalize(self.ln_post[level](cls) @ self.proj, dim=-1)

    def forward_level(self, level: int, patches: torch.Tensor, past: list[KV] | None = None
                      ) -> tuple[torch.Tensor, list[KV]]:
        """Run one level on top of the cache of the levels before it.

        ``past``: per layer (key, value) of shape [batch, heads, past_len, head_dim] with past_len the tokens of the
        levels before (``config.past_length``; None for level 0). Returns the level's embedding [batch, embed_dim]
        and the updated cache (past + this level).
        """
        expected = self.config.past_length(level)
        got = 0 if past is None else past[0][0].shape[2]
        if got != expected:
            raise ValueError(f"level {level} needs a KV cache of length {expected}, got {got}")
        x = self.ln_pre(self.embed_level(level, patches))
        present = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i])
            present.append(kv)
        return self.head(level, x[:, 0]), present

    def block_causal_mask(self, num_levels: int, device: torch.device | None = None) -> torch.Tensor:
        """Boolean [S, S] mask, True where attention is allowed: level of key <= level of query."""
        sizes = torch.tensor(self.level_sizes(num_levels), device=device)
        level = torch.arange(num_levels, device=device).repeat_interleave(sizes)
        return level[None, :] <= level[:, None]

    def level_sizes(self, num_levels: int) -> tuple[int, ...]:
        """Tokens of levels 0..num_levels-1 in the sequence."""
        return tuple(self.config.level_tokens(k) for k in range(num_levels))

    def forward(self, patches: list[torch.Tensor], return_tokens: bool = False, blockwise: bool = False
                ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Full masked forward over levels 0..len(patches)-1 -> one embedding per level; with ``return_tokens`` also
        each level's final patch-token states [batch, its grid*grid, width] (for dense distillation). ``blockwise``:
        attention level by level (each level's queries against the keys of levels <= it) instead of one masked
        matrix: the same result without masked scores (the exported one-pass graph; see Attention)."""
        n = len(patches)
        x = self.ln_pre(torch.cat([self.embed_level(k, p) for k, p in enumerate(patches)], dim=1))
        sizes = self.level_sizes(n)
        mask = sizes if blockwise else self.block_causal_mask(n, x.device)
        for block in self.blocks:
            x, _ = block(x, mask=mask)
        starts = [sum(sizes[:k]) for k in range(n)]
        embeddings = [self.head(k, x[:, s]) for k, s in enumerate(starts)]
        if return_tokens:
            return embeddings, [x[:, s + 1:s + t] for s, t in zip(starts, sizes)]
        return embeddings

    def forward_cascade(self, patches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Levels one by one with the KV cache (what the exported graphs do)."""
        past, out = None, []
        for k, p in enumerate(patches):
            emb, past = self.forward_level(k, p, past)
            out.append(emb)
        return out

    @torch.no_grad()
    def init_from_vit(self, vit: dict) -> None:
        """Start from a ViT teacher's weights (open_clip VisionTransformer state): blocks, ln_pre, CLS and position
        embeddings (resampled to this grid), ln_post and proj when their shapes fit."""
        w = self.config.width
        if vit["width"] != w or len(vit["blocks"]) != self.config.layers:
            raise ValueError(
                f"teacher ViT (width {vit['width']}, {len(vit['blocks'])} layers) does not match preset "
                f"(width {w}, {self.config.layers} layers)"
            )
        for block, state in zip(self.blocks, vit["blocks"]):
            block.load_state_dict({k: v for k, v in state.items() if not k.startswith("ls_")}, strict=True)
        pos = vit["positional_embedding"]
        for g, param in [(self.config.grid, self.pos_embed), *((int(k), v) for k, v in self.pos_embed_grid.items())]:
            param.copy_(resample_positions(pos[1:], g))
        self.cls_pos_embed.copy_(pos[0])
        self.cls_token.copy_(vit["class_embedding"].expand_as(self.cls_token))
        if "ln_pre" in vit:
            self.ln_pre.load_state_dict(vit["ln_pre"])
        if "ln_post" in vit:
            for ln in self.ln_post:
                ln.load_state_dict(vit["ln_post"])
        if vit.get("proj") is not None and tuple(vit["proj"].shape) == (w, self.config.embed_dim):
            self.proj.copy_(vit["proj"])
