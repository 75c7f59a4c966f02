"""Device sampling: greedy, temperature and top-k per slot, reproducible counter-based noise."""

from __future__ import annotations

import pytest
import torch

from personaplex.sampling import SamplingParams, race_noise, sample_tokens

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def draws(temperature: float, top_k: int, n: int = 6000, seed: int = 1) -> torch.Tensor:
    steps = torch.arange(n)
    noise = race_noise(torch.full((n,), seed), steps, stream=0, size=LOGITS.numel())
    return sample_tokens(LOGITS.expand(n, -1), torch.full((n,), temperature), torch.full((n,), top_k), noise)


def test_greedy_is_argmax():
    assert torch.all(draws(0.0, 0, n=10) == 0)


def test_samples_follow_the_tempered_distribution():
    counts = torch.bincount(draws(0.8, 0), minlength=6).float() / 6000
    expected = torch.softmax(LOGITS / 0.8, dim=0)
    torch.testing.assert_close(counts, expected, atol=0.02, rtol=0)


def test_top_k_limits_the_choice_and_renormalises():
    tokens = draws(1.0, 3)
    assert set(tokens.tolist()) == {0, 1, 2}
    counts = torch.bincount(tokens, minlength=6).float() / 6000
    torch.testing.assert_close(counts[:3], torch.softmax(LOGITS[:3], dim=0), atol=0.02, rtol=0)


def test_noise_is_reproducible_per_seed_and_step_and_differs_otherwise():
    seed, step = torch.tensor([5, 5, 6]), torch.tensor([10, 10, 10])
    a = race_noise(seed, step, 3, 1000)
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert not torch.equal(a[0], race_noise(seed, step + 1, 3, 1000)[0])
    assert not torch.equal(a[0], race_noise(seed, step, 4, 1000)[0])
    assert torch.all(a > 0) and abs(a.mean().item() - 1.0) < 0.05  # Exp(1)


def test_each_slot_uses_its_own_settings():
    n = 2000
    logits = LOGITS.expand(2 * n, -1)
    temperature = torch.cat([torch.zeros(n), torch.ones(n)])
    top_k = torch.cat([torch.zeros(n, dtype=torch.long), torch.full((n,), 2)])
    noise = race_noise(torch.zeros(2 * n, dtype=torch.long), torch.arange(2 * n), 0, 6)
    tokens = sample_tokens(logits, temperature, top_k, noise)
    assert torch.all(tokens[:n] == 0) and set(tokens[n:].tolist()) == {0, 1}


@pytest.mark.parametrize("field,value", [("temp_text", -0.1), ("temp_audio", 11.0), ("topk_text", -1)])
def test_invalid_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
