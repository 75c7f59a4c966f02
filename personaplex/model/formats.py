"""Weight formats: the LM's matrices as loaded, or in 8 bits, one scale per output row.

Implements:
  * `FORMATS` (`config.WEIGHT_FORMATS`): "bf16" (as loaded: bf16 on CUDA, float32 on a CPU), "int8" and "fp8"
    (float8 e4m3), and `quantize(lm, format)`, which swaps every `nn.Linear` and `nn.Embedding`
    of the LM (the temporal transformer, the depformer, the heads, the embeddings) for its 8-bit
    twin, module by module, so that the full-width weights are freed as it goes;
  * `Linear8`: w8a16, `x @ (q * s).T` computed as `(x @ q.T) * s`: the weight is cast to the
    activation's dtype inside the matmul (one fused kernel once compiled) and each output row
    scaled after it;
  * `Embedding8`: the rows looked up in 8 bits and widened with their own scale;
  * `compute_dtype(module)`: the dtype a (possibly 8-bit) module computes in; `weight_bytes`
    (as held) and `weight_bytes_as` (as a format would hold them, without quantizing).
Quantization is symmetric per output row (per embedding row): for int8 `s = max|w| / 127`, `q =
round(w / s)`; for fp8 (e4m3, largest 448) `w / s` cast, with the scale of each row chosen to
round it best (`WeightFormat._rows`). Mimi stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import WEIGHT_FORMATS

ROWS_AT_ONCE = 4096  # rows quantized together: the float32 copies of a 7B matrix stay a few hundred MB
FLOAT_SCALES = 8  # fractions of an octave tried for each row of a float8 matrix


@dataclass(frozen=True)
class WeightFormat:
    name: str
    storage: torch.dtype | None  # None: as loaded
    qmax: float = 0.0

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w [rows, cols] -> (q [rows, cols] in `storage`, the scales [rows] in w's dtype)."""
        assert self.storage is not None, "the bf16 format keeps the weights as loaded"
        parts = [self._rows(rows.float()) for rows in w.split(ROWS_AT_ONCE)]
        return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts]).to(w.dtype)

    def _rows(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)  # [rows]
        if not self.storage.is_floating_point:  # int8: a uniform grid, the largest value on its end
            scale = amax / self.qmax
            return (w / scale[:, None]).round().clamp(-self.qmax, self.qmax).to(self.storage), scale
        # float8: a logarithmic grid, so where a row's values fall on it depends on the scale's
        # mantissa. Of `FLOAT_SCALES` scales a row keeps the one that rounds it with the least
        # squared error, its scale refit by least squares (measured on the tiny checkpoint: the
        # audio codebooks' top-1 agreement 0.924 -> 0.963 against bf16's 0.986).
        best_q = best_s = best_err = None
        for k in range(FLOAT_SCALES):
            scale = amax / self.qmax * 2 ** (k / FLOAT_SCALES)  # the largest value at 448, then a little below
            q = (w / scale[:, None]).clamp(-self.qmax, self.qmax).to(self.storage)
            qf = q.float()
            fit = (w * qf).sum(dim=1) / (qf * qf).sum(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
            err = (w - qf * fit[:, None]).square().sum(dim=1)
            if best_err is None:
                best_q, best_s, best_err = q, fit, err
                continue
            better = err < best_err
            best_q = torch.where(better[:, None], q.view(torch.uint8), best_q.view(torch.uint8)).view(self.storage)
            best_s, best_err = torch.where(better, fit, best_s), torch.where(better, err, best_err)
        return best_q, best_s


FORMATS = {
    "bf16": WeightFormat("bf16", None),
    "int8": WeightFormat("int8", torch.int8, 127.0),
    "fp8": WeightFormat("fp8", torch.float8_e4m3fn, 448.0),
}
assert tuple(FORMATS) == WEIGHT_FORMATS


class Linear8(nn.Module):
    """An `nn.Linear` without bias whose weight is stored in 8 bits with one scale per output row."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [out, in] int8 or float8
        self.register_buffer("scale", scale)  # [out] in the compute dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scale.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scale


class Embedding8(nn.Module):
    """An `nn.Embedding` whose rows are stored in 8 bits, each with its own scale."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", weight)  # [num, dim] int8 or float8
        self.register_buffer("scale", scale)  # [num] in the compute dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scale.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.scale.dtype) * F.embedding(ids, self.scale[:, None])


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a linear or embedding module computes in (an 8-bit one: its scales')."""
    return getattr(module, "compute_dtype", None) or module.weight.dtype


def quantize(root: nn.Module, name: str, device: torch.device | None = None) -> None:
    """Swap every `nn.Linear` (without bias) and `nn.Embedding` under `root` for its 8-bit twin in
    format `name` (in place; "bf16" changes nothing), each quantized on `device` (default: where it
    is) and kept there: a model loaded in host memory reaches the GPU a matrix at a time, in 8 bits."""
    fmt = FORMATS[name]
    if fmt.storage is None:
        return
    for parent in list(root.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, child_name, Linear8(*fmt.quantize(child.weight.detach().to(device))))
            elif isinstance(child, nn.Embedding):
                setattr(parent, child_name, Embedding8(*fmt.quantize(child.weight.detach().to(device))))


def weight_bytes(root: nn.Module) -> int:
    """The bytes of every parameter and buffer under `root`, as held."""
    return sum(t.nbytes for t in [*root.parameters(), *root.buffers()])


def weight_bytes_as(root: nn.Module, name: str) -> int:
    """The bytes `root` (as loaded) would hold once `quantize(root, name)` ran: a byte a weight of
    every matrix it swaps, and a scale a row."""
    if FORMATS[name].storage is None:
        return weight_bytes(root)
    total = 0
    for module in root.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        swapped = isinstance(module, nn.Embedding) or (isinstance(module, nn.Linear) and module.bias is None)
        if swapped:
            rows, _ = module.weight.shape
            total += module.weight.numel() + rows * module.weight.element_size()
        else:
            total += sum(t.nbytes for t in own)
    return total
