"""Mimi's split residual vector quantizer.

Implements `EuclideanCodebook` (centroids = embedding_sum / clamp(cluster_usage, 1e-5);
nearest neighbour by `torch.cdist` + argmin, first index on ties), the residual quantizer, and
`SplitResidualVectorQuantizer`: one semantic codebook and the acoustic ones, both quantizing
the same projected input, each part with its own input and output projection. Attribute names
follow the checkpoint (`rvq_rest.vq.layers.3._codebook.embedding_sum`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantizerConfig

_CLUSTER_USAGE_EPS = 1e-5


class EuclideanCodebook(nn.Module):
    def __init__(self, dim: int, bins: int) -> None:
        super().__init__()
        self.register_buffer("_initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))
        self._centroids: torch.Tensor | None = None

    def centroids(self) -> torch.Tensor:
        """[bins, dim], computed once per weights and device (the buffers never change at inference)."""
        cached = self._centroids
        if cached is None or cached.device != self.embedding_sum.device:
            usage = self.cluster_usage.clamp(min=_CLUSTER_USAGE_EPS)
            cached = self._centroids = self.embedding_sum / usage[:, None]
        return cached

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._centroids = None
        super()._load_from_state_dict(*args, **kwargs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, dim] -> codes [N]."""
        return torch.cdist(x[None], self.centroids()[None], p=2)[0].argmin(dim=-1)


class _QuantizerLayer(nn.Module):
    def __init__(self, dim: int, bins: int) -> None:
        super().__init__()
        self._codebook = EuclideanCodebook(dim, bins)


class _LayerList(nn.Module):
    def __init__(self, dim: int, bins: int, n_q: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_QuantizerLayer(dim, bins) for _ in range(n_q))


class ResidualVectorQuantizer(nn.Module):
    def __init__(self, dim: int, in_dim: int, bins: int, n_q: int) -> None:
        super().__init__()
        self.input_proj = nn.Conv1d(in_dim, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, in_dim, 1, bias=False)
        self.vq = _LayerList(dim, bins, n_q)

    def codebooks(self, n: int) -> list[EuclideanCodebook]:
        assert n <= len(self.vq.layers), f"only {len(self.vq.layers)} codebooks"
        return [layer._codebook for layer in self.vq.layers[:n]]

    def encode(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """x [B, in_dim, T] -> codes [B, n, T]: each codebook quantizes the previous residual."""
        B, _, T = x.shape
        residual = self.input_proj(x).transpose(1, 2).reshape(B * T, -1)  # [B*T, dim]
        codes = []
        for codebook in self.codebooks(n):
            idx = codebook.encode(residual)  # [B*T]
            residual = residual - F.embedding(idx, codebook.centroids())
            codes.append(idx)
        return torch.stack(codes, dim=0).view(n, B, T).transpose(0, 1)  # [B, n, T]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, n, T] -> [B, in_dim, T]: sum of the codebook vectors, then the projection."""
        n = codes.shape[1]
        quantized = sum(
            F.embedding(codes[:, i], cb.centroids()) for i, cb in enumerate(self.codebooks(n))  # [B, T, dim]
        )
        assert isinstance(quantized, torch.Tensor)
        return self.output_proj(quantized.transpose(1, 2))


class SplitResidualVectorQuantizer(nn.Module):
    def __init__(self, cfg: QuantizerConfig, in_dim: int) -> None:
        super().__init__()
        self.n_q_semantic = cfg.n_q_semantic
        self.rvq_first = ResidualVectorQuantizer(cfg.dimension, in_dim, cfg.bins, cfg.n_q_semantic)
        self.rvq_rest = ResidualVectorQuantizer(cfg.dimension, in_dim, cfg.bins, cfg.n_q - cfg.n_q_semantic)

    def fill_caches(self) -> None:
        """Compute every codebook's centroids now (a compiled encode then takes no guard on them)."""
        for rvq in (self.rvq_first, self.rvq_rest):
            for codebook in rvq.codebooks(len(rvq.vq.layers)):
                codebook.centroids()

    def encode(self, x: torch.Tensor, num_codebooks: int) -> torch.Tensor:
        """latent [B, in_dim, T] -> codes [B, num_codebooks, T]; both parts see the same input."""
        semantic = self.rvq_first.encode(x, self.n_q_semantic)
        acoustic = self.rvq_rest.encode(x, num_codebooks - self.n_q_semantic)
        return torch.cat([semantic, acoustic], dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> latent [B, in_dim, T]."""
        latent = self.rvq_first.decode(codes[:, : self.n_q_semantic])
        if codes.shape[1] > self.n_q_semantic:
            latent = latent + self.rvq_rest.decode(codes[:, self.n_q_semantic :])
        return latent
