"""Config presets and the JSON loader in the reference's hyper-parameter names."""

from __future__ import annotations

import json

import pytest
import torch

from personaplex.model.config import PERSONAPLEX_7B, TINY, ConfigError, config_from_reference_dict, load_config
from personaplex.model.lm import LMModel
from personaplex.model.mimi import Mimi

from .helpers import FIXTURES, TINY_CONFIG


def keys_shapes_dtypes(module: torch.nn.Module) -> dict[str, tuple[list[int], str]]:
    return {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()}


def test_7b_preset_has_exactly_the_release_tensors():
    release = json.loads((FIXTURES / "release_keys.json").read_text())
    with torch.device("meta"):
        lm = LMModel(PERSONAPLEX_7B.lm).to(torch.bfloat16)
        mimi = Mimi(PERSONAPLEX_7B.mimi)
    for module, part in ((lm, "lm"), (mimi, "mimi")):
        # the release's tensors, but RMSNorm scales held in float32 (their math is float32)
        want = {k: (v["shape"], "float32" if k.endswith(".alpha") else v["dtype"]) for k, v in release[part].items()}
        assert keys_shapes_dtypes(module) == want
    assert sum(p.numel() for p in lm.parameters()) == release["counts"]["lm_params"] == 8_371_408_896


def test_json_config_in_reference_names_gives_the_tiny_preset():
    assert load_config(TINY_CONFIG) == TINY


def test_gated_hidden_widths_follow_the_checkpoint():
    assert PERSONAPLEX_7B.lm.hidden == 11264 and PERSONAPLEX_7B.lm.depformer_hidden == 2816


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c["lm"].update(gating="gelu"), "lm.gating"),
        (lambda c: c["lm"].pop("dim"), "lm.dim"),
        (lambda c: c["mimi"]["seanet"].update(ratios=[8, 6, 5, 3]), "1920 samples"),
        (lambda c: c["mimi"]["transformer"].update(d_model=48), "must equal mimi.seanet.dimension"),
        (lambda c: c["lm"].update(num_heads=3), "heads"),
        (lambda c: c.pop("lm"), "lm"),
    ],
)
def test_bad_json_config_names_the_problem(edit, message):
    raw = json.loads(TINY_CONFIG.read_text())
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        config_from_reference_dict(raw)


def test_unreadable_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
