"""Configuration: presets hold the checkpoints' values; both config files are read with the traps handled."""

import json
import logging

import pytest

from sirocco.config import PRESETS, ModelArgs, preset
from sirocco.errors import ConfigError

V01 = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
       "norm_eps": 1e-05, "vocab_size": 32000, "sliding_window": 4096}                   # no rope_theta
MIXTRAL = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
           "norm_eps": 1e-05, "vocab_size": 32000, "moe": {"num_experts_per_tok": 2, "num_experts": 8}}


def test_presets_have_the_published_values():
    assert PRESETS["mistral-7b-v0.1"].sliding_window == 4096 and PRESETS["mistral-7b-v0.1"].rope_theta == 1e4
    assert PRESETS["mistral-7b-v0.3"].vocab_size == 32768 and PRESETS["mistral-7b-v0.3"].sliding_window is None
    m = PRESETS["mixtral-8x22b"]
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.hidden_dim, m.vocab_size, m.rope_theta) == \
        (6144, 56, 48, 8, 16384, 32768, 1e6)
    assert PRESETS["mixtral-8x7b"].moe.num_experts == 8 and PRESETS["mixtral-8x7b"].moe.num_experts_per_tok == 2
    assert 7.2e9 < PRESETS["mistral-7b-v0.1"].num_parameters() < 7.3e9       # 7.24B
    assert 46e9 < PRESETS["mixtral-8x7b"].num_parameters() < 47e9            # 46.7B


def test_rope_theta_rule_is_applied_and_logged(caplog):
    with caplog.at_level(logging.INFO):
        assert ModelArgs.from_params(V01).rope_theta == 10000.0
        assert ModelArgs.from_params(MIXTRAL).rope_theta == 1e6
    text = caplog.text
    assert "no rope_theta" in text and "10000" in text and "1e+06" in text
    assert ModelArgs.from_params(V01) == PRESETS["mistral-7b-v0.1"].replace(max_seq_len=32768)


def test_inferred_head_dim_is_logged(caplog):
    raw = {k: v for k, v in V01.items() if k != "head_dim"}
    with caplog.at_level(logging.INFO):
        assert ModelArgs.from_params(raw).head_dim == 128
    assert "no head_dim" in caplog.text


def test_unknown_key_warns(caplog):
    with caplog.at_level(logging.WARNING):
        ModelArgs.from_params({**V01, "fancy_new_thing": 3})
    assert "unknown field 'fancy_new_thing'" in caplog.text


@pytest.mark.parametrize("field", ["dim", "n_kv_heads", "norm_eps", "vocab_size"])
def test_missing_required_field_is_named(field):
    raw = {k: v for k, v in V01.items() if k != field}
    with pytest.raises(ConfigError, match=f"missing required field '{field}'"):
        ModelArgs.from_params(raw)


def test_missing_moe_field_is_named():
    with pytest.raises(ConfigError, match="moe.num_experts_per_tok"):
        ModelArgs.from_params({**MIXTRAL, "moe": {"num_experts": 8}})


@pytest.mark.parametrize("window,expected", [("4096", 4096), ([3, 3], 3), ([3, None], [3, None]), (None, None)])
def test_sliding_window_forms(window, expected):
    raw = {**V01, "n_layers": 2, "rope_theta": 1e4, "sliding_window": window}
    assert ModelArgs.from_params(raw).sliding_window == expected


@pytest.mark.parametrize("window,message", [("wide", "not a number"), ([3], "1 windows for 2 layers"),
                                            (-1, "positive integer")])
def test_bad_sliding_window_names_the_field(window, message):
    with pytest.raises(ConfigError, match=f"sliding_window.*{message}|{message}"):
        ModelArgs.from_params({**V01, "n_layers": 2, "sliding_window": window})


def test_hf_config_of_both_architectures_round_trips(tmp_path):
    for name in ("tiny", "tiny-moe"):
        args = preset(name)
        (tmp_path / "config.json").write_text(json.dumps(args.to_hf_config()))
        assert ModelArgs.from_hf_config_json(tmp_path / "config.json") == args
        assert ModelArgs.from_params(args.to_params()) == args


def test_hf_config_written_by_transformers_is_read():
    import transformers
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     sliding_window=None, rms_norm_eps=1e-5, rope_theta=1e6)
    args = ModelArgs.from_hf_config(cfg.to_dict())
    assert (args.dim, args.n_layers, args.head_dim, args.moe.num_experts, args.rope_theta, args.norm_eps) == \
        (64, 2, 16, 4, 1e6, 1e-5)


def test_hf_config_traps_fail_naming_the_field():
    raw = preset("tiny").to_hf_config()
    with pytest.raises(ConfigError, match="'rms_norm_eps'"):
        ModelArgs.from_hf_config({k: v for k, v in raw.items() if k != "rms_norm_eps"})
    with pytest.raises(ConfigError, match="'model_type' is 'llama'"):
        ModelArgs.from_hf_config({**raw, "model_type": "llama"})


@pytest.mark.parametrize("change,field", [({"n_kv_heads": 3}, "n_heads"), ({"head_dim": 15}, "head_dim"),
                                          ({"dim": 0}, "dim"), ({"norm_eps": 0.0}, "norm_eps")])
def test_invalid_values_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        preset("tiny", **change)
