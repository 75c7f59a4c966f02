"""Attention over a slot's ring: pinned keys scored with their own query, and the filled part only.

Implements `pinned_attention` (the masked ring with a pinned prompt: pinned keys are scored with
the query placed for them, the others with its own position; see `transformer`), `prefix_mask`
and `prefix_attention` (the LM's one-step tick reading only each slot's filled entries, below).

In the LM's ring (one step a call, `capacity == context`) the keys a query may see are always
the first `min(offset + 1, context)` entries, pinned or not: until the ring is full, entry i
holds step i; once full, every entry is in the window. So the keys to read are a prefix whose
length is per slot. Flex attention with a block mask built from those lengths reads only the
blocks of that prefix: a young conversation, or an idle slot of the bucket, costs a block, and
the single query is not padded into a tile of the dense kernels. The mask is made of tensors of
fixed shapes, so one compiled kernel (its decoding variant on CUDA) serves every length, and a
CUDA graph replays it.

With a pinned persona (`Transformer.pinning`) the pinned keys are scored with their own query
rotation: the two queries are two rows of one flex attention (row 0 sees the pinned keys, row 1
the sliding ones), merged by their log-sum-exp. That needs the kernel's log-sum-exp, which
Inductor's CPU template does not give (so compiled on a CPU, pinned attention should keep the
masked path).

Flex attention is a fused kernel only compiled; eagerly it materialises every score, slower than
the masked path: the route is a switch (`Transformer.prefix_attention`), for whoever compiles.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

BLOCK = 128  # keys per block (the flex kernels' default block size)


def prefix_mask(lengths: torch.Tensor, capacity: int, pinned: torch.Tensor | None = None) -> BlockMask:
    """The keys of each slot: entries `0 .. lengths[b] - 1` of a ring of `capacity` ([B] long,
    each at least 1). With `pinned` ([B] long), two query rows: row 0 sees entries below
    `pinned[b]`, row 1 the others of the prefix."""
    B = lengths.shape[0]
    blocks = -(-capacity // BLOCK)
    order = torch.arange(blocks, device=lengths.device, dtype=torch.int32).expand(B, 1, 1, blocks)
    if pinned is None:
        full = torch.div(lengths, BLOCK, rounding_mode="floor").to(torch.int32)  # [B] blocks every key of which is seen
        partial = (torch.remainder(lengths, BLOCK) > 0).to(torch.int32)  # [B] the one after them, if any
        last = (full[:, None, None, None] + order).clamp(max=blocks - 1)  # [B, 1, 1, blocks], the partial one first

        def seen(b, h, q, kv):
            return kv < lengths[b]

        return BlockMask.from_kv_blocks(partial[:, None, None], last, full[:, None, None], order,
                                        BLOCK_SIZE=BLOCK, mask_mod=seen, seq_lengths=(1, capacity),
                                        compute_q_blocks=False)
    used = torch.div(lengths + BLOCK - 1, BLOCK, rounding_mode="floor").to(torch.int32)  # [B]

    def seen_pinned(b, h, q, kv):
        return torch.where(q == 0, kv < pinned[b], (kv >= pinned[b]) & (kv < lengths[b]))

    return BlockMask.from_kv_blocks(used[:, None, None], order, BLOCK_SIZE=BLOCK, mask_mod=seen_pinned,
                                    seq_lengths=(2, capacity), compute_q_blocks=False)


def prefix_attention(q: torch.Tensor, q_pinned: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
                     mask: BlockMask) -> torch.Tensor:
    """One query per slot (q, q_pinned [B, H, 1, Dh]) over the ring prefix of `mask`
    (`prefix_mask`); keys, values [B, H, capacity, Dh]. Returns [B, H, 1, Dh]. Compiled on a
    CPU, `q` must be a tensor of its own, not a view of a larger one (Inductor's CPU kernel reads
    the sizes of the buffer under it)."""
    if q_pinned is None:
        return flex_attention(q, keys, values, block_mask=mask)
    rows, aux = flex_attention(torch.cat([q_pinned, q], dim=2), keys, values, block_mask=mask,
                               return_aux=AuxRequest(lse=True))
    # Each row is a softmax over its own keys; weighted by its share of the total mass, they
    # are the softmax over both (a row without keys has lse -inf: weight 0).
    weights = torch.softmax(aux.lse, dim=-1)  # [B, H, 2] float32
    return (rows.float() * weights[..., None]).sum(2, keepdim=True).to(q.dtype)


def pinned_attention(q: torch.Tensor, q_pinned: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor, pinned: torch.Tensor) -> torch.Tensor:
    """Attention where pinned keys are scored with `q_pinned` and the others with `q` (both
    [B, H, T, Dh]; keys, values [B, H, S, Dh]; mask and pinned [B, 1, T or 1, S] bool). Both
    queries go through one matmul, so the keys are read once; softmax in float32."""
    T = q.shape[2]
    both = torch.cat([q_pinned, q], dim=2) @ keys.transpose(-1, -2)  # [B, H, 2T, S]
    scores = torch.where(pinned, both[:, :, :T], both[:, :, T:]).float() * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return probs.to(values.dtype) @ values
