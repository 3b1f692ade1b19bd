"""params.yaml loading: typos and wrong types are errors that name the key."""

from __future__ import annotations

import pytest

from hllm.config import Config, ConfigError, load_config, protocol_hash, save_config


def test_repo_params_yaml_matches_the_typed_defaults_shape():
    cfg = load_config("params.yaml")
    assert isinstance(cfg, Config)
    assert set(cfg.flat()) == set(Config().flat())


def test_unknown_key_names_the_section_and_key(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) \['learning_rate'\]"):
        load_config(p)


def test_wrong_type_names_the_dotted_key(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  batch_size: eight\n")
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected int, got 'eight'"):
        load_config(p)


def test_overrides_parse_yaml_values_and_scientific_floats():
    cfg = load_config(None, ["train.lr=3e-4", "eval.protocol.ks=[1,2]", "model.item.path=null", "train.bf16=true"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.eval.protocol.ks == [1, 2]
    assert cfg.model.item.path is None
    assert cfg.train.bf16 is True


def test_bad_override_is_explained():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_round_trip_and_hashes(tmp_path):
    cfg = load_config(None, ["train.lr=0.002"])
    save_config(cfg, tmp_path / "p.yaml")
    again = load_config(tmp_path / "p.yaml")
    assert again == cfg and again.hash() == cfg.hash()
    other = load_config(None, ["eval.protocol.mask_history=false"])
    assert protocol_hash(other.eval.protocol) != protocol_hash(cfg.eval.protocol)
    # the protocol hash ignores settings outside the protocol block
    assert protocol_hash(load_config(None, ["train.lr=1.0"]).eval.protocol) == protocol_hash(cfg.eval.protocol)
