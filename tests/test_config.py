"""Configuration: presets hold the checkpoints' values; a value that cannot work fails naming its field."""

import pytest

from sirocco.config import PRESETS, preset
from sirocco.errors import ConfigError


def test_presets_have_the_published_values():
    assert PRESETS["mistral-7b-v0.1"].sliding_window == 4096 and PRESETS["mistral-7b-v0.1"].rope_theta == 1e4
    assert PRESETS["mistral-7b-v0.3"].vocab_size == 32768 and PRESETS["mistral-7b-v0.3"].sliding_window is None
    m = PRESETS["mixtral-8x22b"]
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.hidden_dim, m.vocab_size, m.rope_theta) == \
        (6144, 56, 48, 8, 16384, 32768, 1e6)
    assert PRESETS["mixtral-8x7b"].moe.num_experts == 8 and PRESETS["mixtral-8x7b"].moe.num_experts_per_tok == 2
    assert 7.2e9 < PRESETS["mistral-7b-v0.1"].num_parameters() < 7.3e9       # 7.24B
    assert 46e9 < PRESETS["mixtral-8x7b"].num_parameters() < 47e9            # 46.7B


@pytest.mark.parametrize("change,field", [({"n_kv_heads": 3}, "n_heads"), ({"head_dim": 15}, "head_dim"),
                                          ({"dim": 0}, "dim"), ({"norm_eps": 0.0}, "norm_eps")])
def test_invalid_values_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        preset("tiny", **change)
