"""What `batch_graphs` marks for one graph of every bucket: the leading (slot) dimension of every
tensor a compiled piece reads (its arguments, dataclasses, a flex block mask and the tensors its
mask closes over, the streaming states of its modules), and nothing of the weights. The graphs
themselves are checked in tests/test_compile.py."""

from __future__ import annotations

import torch

from personaplex.model.attention import prefix_mask
from personaplex.model.streaming import streaming
from personaplex.model.transformer import AttentionPlan, Transformer
from personaplex.runtime.batch_graphs import mark_slots


def marked(tensor: torch.Tensor) -> bool:
    return 0 in getattr(tensor, "_dynamo_weak_dynamic_indices", set())


def test_every_per_slot_tensor_a_piece_reads_is_marked_and_the_weights_are_not():
    stack = Transformer(dim=16, num_heads=2, num_layers=1, hidden=32, context=256, max_period=10_000.0, chunk=1,
                        mimi_style=False)
    with torch.inference_mode(), streaming(stack, 3):
        lengths = torch.tensor([1, 5, 9])
        mask = prefix_mask(lengths, 256)
        plan = AttentionPlan(None, torch.zeros(3, 1, 4, 2), torch.zeros(3, 2, 1, 8, dtype=torch.long), 0, False)
        plan.prefix = mask
        x = torch.zeros(3, 1, 16)
        layer = stack.layers[0]
        mark_slots((None, (layer, x, plan)))
        state = layer.self_attn.state
        assert marked(x) and marked(plan.rotation) and marked(plan.write_index)
        assert marked(state.keys) and marked(state.values)
        assert marked(mask.kv_num_blocks) and marked(mask.kv_indices) and marked(lengths)  # closed over by its mask
        assert not any(marked(p) for p in layer.parameters())
