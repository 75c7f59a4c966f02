"""Device sampling: greedy, temperature and top-k per slot, reproducible counter-based noise."""

from __future__ import annotations

import pytest
import torch

from personaplex.errors import SettingsError
from personaplex.model.config import MAX_TOP_K, SEED_MAX, SamplingParams
from personaplex.model.sampling import race_noise, sample_tokens, stream_keys

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def draws(temperature: float, top_k: int, n: int = 6000, seed: int = 1) -> torch.Tensor:
    seeds, steps = torch.full((n,), seed), torch.arange(n)
    return sample_tokens(
        LOGITS.expand(n, -1), torch.full((n,), temperature), torch.full((n,), top_k),
        lambda ids: race_noise(stream_keys(seeds, steps, 1)[:, 0], ids), max_top_k=6,
    )


def test_greedy_is_argmax():
    assert torch.all(draws(0.0, 6, n=10) == 0)


def test_samples_follow_the_tempered_distribution():
    counts = torch.bincount(draws(0.8, 6), minlength=6).float() / 6000
    expected = torch.softmax(LOGITS / 0.8, dim=0)
    torch.testing.assert_close(counts, expected, atol=0.02, rtol=0)


def test_top_k_limits_the_choice_and_renormalises():
    tokens = draws(1.0, 3)
    assert set(tokens.tolist()) == {0, 1, 2}
    counts = torch.bincount(tokens, minlength=6).float() / 6000
    torch.testing.assert_close(counts[:3], torch.softmax(LOGITS[:3], dim=0), atol=0.02, rtol=0)


def test_a_token_draws_the_same_noise_whatever_else_is_drawn():
    seed, step = torch.tensor([5, 5, 6]), torch.tensor([10, 10, 10])
    ids = torch.arange(1000).expand(3, -1)
    a = race_noise(stream_keys(seed, step, 5)[:, 3], ids)
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert torch.equal(race_noise(stream_keys(seed, step, 5)[:, 3], ids[:, 500:])[0], a[0, 500:])
    assert not torch.equal(a[0], race_noise(stream_keys(seed, step + 1, 5)[:, 3], ids)[0])
    assert not torch.equal(a[0], race_noise(stream_keys(seed, step, 5)[:, 4], ids)[0])
    assert torch.all(a > 0) and abs(a.mean().item() - 1.0) < 0.05  # Exp(1)


def test_each_slot_uses_its_own_settings():
    n = 2000
    temperature = torch.cat([torch.zeros(n), torch.ones(n)])
    top_k = torch.cat([torch.full((n,), 6), torch.full((n,), 2)])
    seeds, steps = torch.zeros(2 * n, dtype=torch.long), torch.arange(2 * n)
    tokens = sample_tokens(LOGITS.expand(2 * n, -1), temperature, top_k, lambda ids: race_noise(stream_keys(seeds, steps, 1)[:, 0], ids), 6)
    assert torch.all(tokens[:n] == 0) and set(tokens[n:].tolist()) == {0, 1}


@pytest.mark.parametrize(
    "field,value,message",
    [("temp_text", -0.1, "a number from 0 to 10"), ("temp_audio", 11.0, "a number from 0 to 10"),
     ("temp_text", float("nan"), "a number from 0 to 10"), ("temp_audio", "0.8", "a number from 0 to 10"),
     ("topk_text", 0, f"a whole number from 1 to {MAX_TOP_K['text']}"), ("topk_audio", 501, f"a whole number from 1 to {MAX_TOP_K['audio']}"),
     ("topk_text", 2.5, "a whole number"), ("greedy", "false", "true or false"),
     ("seed", 2**63, f"a whole number from 0 to {SEED_MAX}"), ("seed", -1, "a whole number from 0"), ("seed", True, "a whole number")],
)
def test_invalid_settings_are_refused(field, value, message):
    name = "the seed" if field == "seed" else field
    with pytest.raises(SettingsError, match=f"{name} must be {message}"):
        SamplingParams(**{field: value})
