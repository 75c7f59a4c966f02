"""Causal streaming convolutions and the SEANet encoder/decoder of Mimi.

Implements `StreamingConv1d`, `StreamingConvTranspose1d`, the SEANet residual block, and
`SEANetEncoder` / `SEANetDecoder` with the release's module indices (`encoder.model.12`, ...).

Padding is causal and applied outside the convolution: P = (k - 1) * dilation + 1 - stride
samples on the left. In streaming mode a fixed-size buffer of the last P input samples replaces
that padding (zeros after a reset, which is exactly the constant padding; for the `replicate`
mode of Mimi's downsampling conv, the first sample of the first chunk). Chunks must be whole
multiples of the stride; Mimi always feeds whole 80 ms frames. The transposed convolution keeps
the last k - stride output samples (without bias) and adds them to the next chunk's head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import SEANetConfig
from .streaming import StreamingModule, StreamingState


class _Wrap(nn.Module):
    """Holds a raw conv as `.conv` / `.convtr`, as the checkpoint's `NormConv1d` wrappers do."""

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__()
        self.add_module(name, module)


@dataclass
class ConvState(StreamingState):
    previous: torch.Tensor  # [B, C_in, P] the last P input samples
    started: torch.Tensor  # [B] bool: a chunk was seen since the reset

    def reset(self, mask: torch.Tensor) -> None:
        self.previous.masked_fill_(mask[:, None, None], 0.0)
        self.started.masked_fill_(mask, False)


class StreamingConv1d(StreamingModule):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        assert pad_mode in ("constant", "replicate"), pad_mode
        self.conv = _Wrap("conv", nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, bias=bias))
        self.stride = stride
        self.pad_mode = pad_mode
        self.padding = (kernel_size - 1) * dilation + 1 - stride

    @property
    def raw(self) -> nn.Conv1d:
        return self.conv.conv

    def make_state(self, batch_size: int) -> ConvState:
        w = self.raw.weight
        return ConvState(
            previous=torch.zeros(batch_size, w.shape[1], self.padding, device=w.device, dtype=w.dtype),
            started=torch.zeros(batch_size, dtype=torch.bool, device=w.device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state is None:
            return self.raw(self._pad_whole(x))
        assert isinstance(state, ConvState)
        assert x.shape[-1] % self.stride == 0, f"streaming chunks must be multiples of {self.stride}"
        previous = state.previous
        if self.pad_mode == "replicate":
            first = x[..., :1].expand_as(previous)
            previous = torch.where(state.started[:, None, None], previous, first)
        x = torch.cat([previous, x], dim=-1)
        if self.padding:
            state.previous.copy_(x[..., -self.padding :])
        if self.pad_mode == "replicate":  # only replicate padding reads `started`
            state.started.fill_(True)
        return self.raw(x)

    def _pad_whole(self, x: torch.Tensor) -> torch.Tensor:
        """Left padding P, plus right padding so that a partial last frame is completed."""
        length = x.shape[-1]
        k_eff = self.padding + self.stride
        n_frames = (length - k_eff + self.padding) / self.stride + 1
        ideal = (math.ceil(n_frames) - 1) * self.stride + (k_eff - self.padding)
        return F.pad(x, (self.padding, ideal - length), mode=self.pad_mode)


@dataclass
class ConvTrState(StreamingState):
    partial: torch.Tensor  # [B, C_out, k - stride] overlap of the last chunk, bias removed

    def reset(self, mask: torch.Tensor) -> None:
        self.partial.masked_fill_(mask[:, None, None], 0.0)


class StreamingConvTranspose1d(StreamingModule):
    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1, bias: bool = True
    ) -> None:
        super().__init__()
        self.convtr = _Wrap("convtr", nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias))
        self.overlap = kernel_size - stride

    @property
    def raw(self) -> nn.ConvTranspose1d:
        return self.convtr.convtr

    def make_state(self, batch_size: int) -> ConvTrState:
        w = self.raw.weight
        out_channels = w.shape[1] * self.raw.groups
        return ConvTrState(partial=torch.zeros(batch_size, out_channels, self.overlap, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.raw(x)  # [B, C, (T - 1) * s + k]
        state = self.state
        if state is not None and self.overlap:
            assert isinstance(state, ConvTrState)
            y[..., : self.overlap] += state.partial
            tail = y[..., -self.overlap :]
            if self.raw.bias is not None:
                tail = tail - self.raw.bias[:, None]  # the bias must count once in the overlap
            state.partial.copy_(tail)
        return y[..., : y.shape[-1] - self.overlap]


class ResidualBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel_size: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ELU(alpha=1.0),
            StreamingConv1d(dim, hidden, kernel_size),
            nn.ELU(alpha=1.0),
            StreamingConv1d(hidden, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class SEANetEncoder(nn.Module):
    """pcm [B, 1, T] -> latent [B, dimension, T / hop] (25 Hz for the release)."""

    def __init__(self, cfg: SEANetConfig) -> None:
        super().__init__()
        nf = cfg.n_filters
        layers: list[nn.Module] = [StreamingConv1d(cfg.channels, nf, cfg.kernel_size)]
        for i, ratio in enumerate(reversed(cfg.ratios)):
            dim = nf * 2**i
            layers += [ResidualBlock(dim, dim // cfg.compress, cfg.residual_kernel_size) for _ in range(cfg.n_residual_layers)]
            layers += [nn.ELU(alpha=1.0), StreamingConv1d(dim, 2 * dim, 2 * ratio, stride=ratio)]
        layers += [nn.ELU(alpha=1.0), StreamingConv1d(nf * 2 ** len(cfg.ratios), cfg.dimension, cfg.last_kernel_size)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class SEANetDecoder(nn.Module):
    """latent [B, dimension, T] -> pcm [B, 1, T * hop]."""

    def __init__(self, cfg: SEANetConfig) -> None:
        super().__init__()
        nf = cfg.n_filters
        dim = nf * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [StreamingConv1d(cfg.dimension, dim, cfg.kernel_size)]
        for ratio in cfg.ratios:
            layers += [nn.ELU(alpha=1.0), StreamingConvTranspose1d(dim, dim // 2, 2 * ratio, stride=ratio)]
            dim //= 2
            layers += [ResidualBlock(dim, dim // cfg.compress, cfg.residual_kernel_size) for _ in range(cfg.n_residual_layers)]
        layers += [nn.ELU(alpha=1.0), StreamingConv1d(nf, cfg.channels, cfg.last_kernel_size)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
