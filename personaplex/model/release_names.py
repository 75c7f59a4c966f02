"""The release's tensor names over modules that hold its weights apart.

Implements `keep_release_names(module, fused)`. The checkpoint stores some weights fused that our
modules hold as separate linear modules, so that each matrix is an `nn.Linear` (a weight format
is then a swap of that module at load): an attention's q, k and v projections as one
`in_proj_weight`, and the depformer's per-step projections as one tensor of every step. With it,
the module's `state_dict` speaks the release's names (its parts concatenated along the output
dimension) and its `load_state_dict` takes them (split back into the parts, as views: nothing is
copied), so loading stays strict against the release's key list and shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


def keep_release_names(module: nn.Module, fused: Mapping[str, Sequence[str]]) -> None:
    """`fused`: the release's name (relative to `module`) -> the names of our tensors that it
    concatenates along dim 0, in order; one name is a plain rename."""

    def save(_: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for release, parts in fused.items():
            tensors = [state.pop(prefix + part) for part in parts]
            state[prefix + release] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)

    def load(_: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for release, parts in fused.items():
            if prefix + release not in state:
                continue  # missing: the strict load names our part as missing
            tensor = state.pop(prefix + release)
            if tensor.shape[0] % len(parts):
                state[prefix + release] = tensor  # cannot be split evenly: reported as unexpected
                continue
            for part, piece in zip(parts, tensor.chunk(len(parts), dim=0), strict=True):
                state[prefix + part] = piece

    module.register_state_dict_post_hook(save)
    module.register_load_state_dict_pre_hook(load)
