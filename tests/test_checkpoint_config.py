"""The published config files (params.json, config.json) read into ModelArgs with the traps handled, and
written back."""

import json
import logging
import re

import pytest

from sirocco.checkpoint.config_files import (
    args_to_hf_config,
    args_to_params,
    hf_config_to_args,
    params_to_args,
    read_hf_config,
    read_params,
)
from sirocco.config import PRESETS, preset
from sirocco.errors import ConfigError

V01 = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
       "norm_eps": 1e-05, "vocab_size": 32000, "sliding_window": 4096}                   # no rope_theta
MIXTRAL = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
           "norm_eps": 1e-05, "vocab_size": 32000, "moe": {"num_experts_per_tok": 2, "num_experts": 8}}


def test_rope_theta_rule_is_applied_and_logged(caplog):
    with caplog.at_level(logging.INFO):
        assert params_to_args(V01).rope_theta == 10000.0
        assert params_to_args(MIXTRAL).rope_theta == 1e6
    text = caplog.text
    assert "no rope_theta" in text and "10000" in text and "1e+06" in text
    assert params_to_args(V01) == PRESETS["mistral-7b-v0.1"].replace(max_seq_len=32768)


def test_inferred_head_dim_is_logged(caplog):
    raw = {k: v for k, v in V01.items() if k != "head_dim"}
    with caplog.at_level(logging.INFO):
        assert params_to_args(raw).head_dim == 128
    assert "no head_dim" in caplog.text


def test_unknown_key_warns(caplog):
    with caplog.at_level(logging.WARNING):
        params_to_args({**V01, "fancy_new_thing": 3})
    assert "unknown field 'fancy_new_thing'" in caplog.text


@pytest.mark.parametrize("field", ["dim", "n_kv_heads", "norm_eps", "vocab_size"])
def test_missing_required_field_is_named(field):
    raw = {k: v for k, v in V01.items() if k != field}
    with pytest.raises(ConfigError, match=f"missing required field '{field}'"):
        params_to_args(raw)


def test_missing_moe_field_is_named():
    with pytest.raises(ConfigError, match=re.escape("moe.num_experts_per_tok")):
        params_to_args({**MIXTRAL, "moe": {"num_experts": 8}})


@pytest.mark.parametrize("window,expected", [("4096", 4096), ([3, 3], 3), ([3, None], [3, None]), (None, None)])
def test_sliding_window_forms(window, expected):
    raw = {**V01, "n_layers": 2, "rope_theta": 1e4, "sliding_window": window}
    assert params_to_args(raw).sliding_window == expected


@pytest.mark.parametrize("window,message", [("wide", "not a number"), ([3], "1 windows for 2 layers"),
                                            (-1, "positive integer")])
def test_bad_sliding_window_names_the_field(window, message):
    with pytest.raises(ConfigError, match=f"sliding_window.*{message}|{message}"):
        params_to_args({**V01, "n_layers": 2, "sliding_window": window})


def test_hf_config_of_both_architectures_round_trips(tmp_path):
    for name in ("tiny", "tiny-moe"):
        args = preset(name)
        (tmp_path / "config.json").write_text(json.dumps(args_to_hf_config(args)))
        assert read_hf_config(tmp_path / "config.json") == args
        assert params_to_args(args_to_params(args)) == args


def test_hf_config_written_by_transformers_is_read():
    import transformers
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     sliding_window=None, rms_norm_eps=1e-5, rope_theta=1e6)
    args = hf_config_to_args(cfg.to_dict())
    assert (args.dim, args.n_layers, args.head_dim, args.moe.num_experts, args.rope_theta, args.norm_eps) == \
        (64, 2, 16, 4, 1e6, 1e-5)


def test_hf_config_traps_fail_naming_the_field():
    raw = args_to_hf_config(preset("tiny"))
    with pytest.raises(ConfigError, match="'rms_norm_eps'"):
        hf_config_to_args({k: v for k, v in raw.items() if k != "rms_norm_eps"})
    with pytest.raises(ConfigError, match="'model_type' is 'llama'"):
        hf_config_to_args({**raw, "model_type": "llama"})


def test_params_json_file_round_trips_and_a_bad_file_is_named(tmp_path):
    args = preset("tiny-moe")
    (tmp_path / "params.json").write_text(json.dumps(args_to_params(args)))
    assert read_params(tmp_path / "params.json") == args
    assert read_params(tmp_path / "params.json", max_seq_len=64) == args.replace(max_seq_len=64)
    (tmp_path / "broken.json").write_text("{\"dim\": ")
    with pytest.raises(ConfigError, match=r"cannot read .*broken\.json"):
        read_params(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match=r"cannot read .*absent\.json"):
        read_hf_config(tmp_path / "absent.json")
