"""The PersonaPlex LM: embeddings, temporal transformer, depformer, heads. Math only.

Implements `LMModel` with the release's attribute names:
  * `embed(tokens)`: the 17 token rows of a column -> one input vector (audio rows in order,
    then text, each add in the model dtype, as the checkpoint was trained and the reference runs);
  * `forward_embeddings(x)`: temporal transformer + `out_norm`, the output h also feeds the
    depformer; `text_logits(h)`;
  * `depformer_step(step, prev_token, h, cache)`: one depformer step (per-step weights, no
    positional encoding, attention over the previous steps of the same frame) -> audio logits.

The depformer has `dep_q` = 16 steps: 0..7 predict the agent's codebooks, 8..15 the user's,
which live generation always teacher-forces, so callers may run only the first 8 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMConfig
from .formats import compute_dtype
from .release_names import keep_release_names
from .transformer import GatedMLP, LayerRunner, RMSNorm, Transformer, run_layer


class DepformerAttention(nn.Module):
    """Self-attention with its own projections at every depformer step (the release fuses each
    kind of them into one tensor of every step: `in_proj_weight`, `out_proj.weight`)."""

    def __init__(self, dim: int, num_heads: int, steps: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.steps = steps
        self.in_projs = nn.ModuleList(nn.Linear(dim, 3 * dim, bias=False) for _ in range(steps))
        self.out_projs = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(steps))
        keep_release_names(self, {"in_proj_weight": [f"in_projs.{s}.weight" for s in range(steps)],
                                  "out_proj.weight": [f"out_projs.{s}.weight" for s in range(steps)]})


class DepformerLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, steps: int) -> None:
        super().__init__()
        self.self_attn = DepformerAttention(dim, num_heads, steps)
        self.norm1 = RMSNorm(dim)
        self.norm2 = RMSNorm(dim)
        self.gating = nn.ModuleList(GatedMLP(dim, hidden) for _ in range(steps))


class Depformer(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DepformerLayer(cfg.depformer_dim, cfg.depformer_num_heads, cfg.depformer_hidden, cfg.dep_q)
            for _ in range(cfg.depformer_num_layers)
        )


@dataclass
class DepformerCache:
    """Keys and values of the steps run so far in the current frame, one per layer (side by side,
    so that a step writes both with one copy)."""

    kv: torch.Tensor  # [L, B, 2, H, steps, Dh]


class LMModel(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim, ddim = cfg.dim, cfg.depformer_dim
        self.emb = nn.ModuleList(nn.Embedding(cfg.card + 1, dim) for _ in range(cfg.n_q))
        self.text_emb = nn.Embedding(cfg.text_card + 1, dim)
        self.text_linear = nn.Linear(dim, cfg.text_card, bias=False)
        self.transformer = Transformer(
            dim=dim,
            num_heads=cfg.num_heads,
            num_layers=cfg.num_layers,
            hidden=cfg.hidden,
            context=cfg.context,
            max_period=cfg.max_period,
            chunk=1,
            mimi_style=False,
        )
        self.out_norm = RMSNorm(dim)
        self.depformer_in = nn.ModuleList(nn.Linear(dim, ddim, bias=False) for _ in range(cfg.dep_q))
        # Step s > 0 embeds the token of step s - 1; the last codebook is never an input.
        self.depformer_emb = nn.ModuleList(nn.Embedding(cfg.card + 1, ddim) for _ in range(cfg.dep_q - 1))
        self.depformer_text_emb = nn.Embedding(cfg.text_card + 1, ddim)
        self.depformer = Depformer(cfg)
        self.linears = nn.ModuleList(nn.Linear(ddim, cfg.card, bias=False) for _ in range(cfg.dep_q))

    @property
    def dtype(self) -> torch.dtype:
        """What it computes in (its weights may be stored in 8 bits: `formats`)."""
        return compute_dtype(self.text_linear)

    @property
    def device(self) -> torch.device:
        return self.text_linear.weight.device

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, 17, T] (text, 16 audio rows) -> input embeddings [B, T, dim].

        The sum runs audio row by audio row, then adds the text, each add rounded in the model
        dtype: in bf16 a single fused sum would round differently from the checkpoint's runs.
        """
        K = tokens.shape[1]
        assert K == self.cfg.num_streams, f"expected {self.cfg.num_streams} token rows, got {K}"
        x = self.emb[0](tokens[:, 1])
        for i in range(1, self.cfg.n_q):
            x = x + self.emb[i](tokens[:, i + 1])
        return x + self.text_emb(tokens[:, 0])  # [B, T, dim]

    def forward_embeddings(self, x: torch.Tensor, run: LayerRunner = run_layer) -> torch.Tensor:
        """[B, T, dim] -> h [B, T, dim]: temporal transformer (`run` runs each layer), then `out_norm`."""
        return self.out_norm(self.transformer(x, run))

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.text_linear(h)

    def new_depformer_cache(self, batch_size: int, steps: int) -> DepformerCache:
        cfg = self.cfg
        heads, head_dim = cfg.depformer_num_heads, cfg.depformer_dim // cfg.depformer_num_heads
        shape = (cfg.depformer_num_layers, batch_size, 2, heads, steps, head_dim)
        return DepformerCache(kv=torch.empty(shape, device=self.device, dtype=self.dtype))

    def depformer_step(self, step: int, prev_token: torch.Tensor, h: torch.Tensor, cache: DepformerCache) -> torch.Tensor:
        """One depformer step for a frame.

        step: 0..dep_q-1; prev_token [B]: the frame's text token for step 0, else the audio token
        of step - 1; h [B, dim]: the temporal output of the frame. Returns logits [B, card].
        """
        token_emb = self.depformer_text_emb if step == 0 else self.depformer_emb[step - 1]
        x = (self.depformer_in[step](h) + token_emb(prev_token))[:, None]  # [B, 1, ddim]
        for i, layer in enumerate(self.depformer.layers):
            x = x + self._depformer_attention(layer.self_attn, layer.norm1(x), step, cache, i)
            x = x + layer.gating[step](layer.norm2(x))
        return self.linears[step](x[:, 0])  # [B, card]

    def _depformer_attention(
        self, attn: DepformerAttention, x: torch.Tensor, step: int, cache: DepformerCache, layer: int
    ) -> torch.Tensor:
        B, _, D = x.shape
        qkv = attn.in_projs[step](x).view(B, 3, attn.num_heads, 1, -1)  # [B, 3, H, 1, Dh]
        cache.kv[layer, :, :, :, step : step + 1] = qkv[:, 1:]  # this step's key and value
        keys, values = cache.kv[layer, :, :, :, : step + 1].unbind(1)  # [B, H, step + 1, Dh]: every step so far
        out = F.scaled_dot_product_attention(qkv[:, 0], keys, values)  # [B, H, 1, Dh]
        return attn.out_projs[step](out.transpose(1, 2).reshape(B, 1, D))
