"""Mimi, the neural audio codec: 24 kHz pcm <-> 8 codebooks at 12.5 Hz.

Implements `Mimi.encode(pcm) -> codes` and `Mimi.decode(codes) -> pcm`, both usable on whole
clips (no streaming state) or frame by frame inside `streaming(mimi, batch)`, where every slot
is an independent stream. Encode: SEANet encoder (25 Hz), encoder transformer, learnt strided
conv to 12.5 Hz, split RVQ. Decode: RVQ decode, depthwise transposed conv to 25 Hz, decoder
transformer, SEANet decoder. Encoder and decoder states are separate.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import FRAME_SIZE, MimiConfig
from .quantizer import SplitResidualVectorQuantizer
from .seanet import SEANetDecoder, SEANetEncoder, StreamingConv1d, StreamingConvTranspose1d
from .transformer import Transformer


class _ProjectedTransformer(nn.Module):
    """The release's `ProjectedTransformer` with identity projections, channels-first in and out."""

    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        t = cfg.transformer
        self.transformer = Transformer(
            dim=t.d_model,
            num_heads=t.num_heads,
            num_layers=t.num_layers,
            hidden=t.dim_feedforward,
            context=t.context,
            max_period=t.max_period,
            chunk=cfg.downsample_stride,  # encoder steps per 80 ms frame
            mimi_style=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer(x.transpose(1, 2)).transpose(1, 2)


class _Downsample(nn.Module):
    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.conv = StreamingConv1d(dim, dim, 2 * stride, stride=stride, bias=False, pad_mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        # Depthwise: the release's `upsample_channel_wise_bug=True`, weight [dim, 1, 2 * stride].
        self.convtr = StreamingConvTranspose1d(dim, dim, 2 * stride, stride, groups=dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convtr(x)


class Mimi(nn.Module):
    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.seanet.dimension
        self.encoder = SEANetEncoder(cfg.seanet)
        self.decoder = SEANetDecoder(cfg.seanet)
        self.encoder_transformer = _ProjectedTransformer(cfg)
        self.decoder_transformer = _ProjectedTransformer(cfg)
        self.quantizer = SplitResidualVectorQuantizer(cfg.quantizer, dim)
        self.downsample = _Downsample(dim, cfg.downsample_stride)
        self.upsample = _Upsample(dim, cfg.downsample_stride)

    def fill_caches(self) -> None:
        """Compute what the codebooks cache (their centroids) now, not at the first encode."""
        self.quantizer.fill_caches()

    def encode(self, pcm: torch.Tensor) -> torch.Tensor:
        """pcm [B, 1, F * 1920] float32 -> codes [B, 8, F] int64."""
        _, C, T = pcm.shape
        assert C == 1 and T % FRAME_SIZE == 0, f"expected [B, 1, n * {FRAME_SIZE}] pcm, got {tuple(pcm.shape)}"
        return self.quantizer.encode(self.encode_latent(pcm), self.cfg.num_codebooks)

    def encode_latent(self, pcm: torch.Tensor) -> torch.Tensor:
        """pcm [B, 1, T] -> unquantized latent [B, dim, F] at 12.5 Hz."""
        return self.downsample(self.encoder_transformer(self.encoder(pcm)))

    def decode_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, F] -> quantized latent [B, dim, F] at 12.5 Hz."""
        return self.quantizer.decode(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, 8, F] -> pcm [B, 1, F * 1920] float32."""
        assert codes.dim() == 3, f"expected codes [B, K, F], got {tuple(codes.shape)}"
        latent = self.upsample(self.decode_latent(codes))  # [B, dim, 2F]
        return self.decoder(self.decoder_transformer(latent))
