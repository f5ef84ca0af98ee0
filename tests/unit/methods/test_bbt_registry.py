import sys

import pytest

from bbt_client.errors import ConfigError
from bbt_client.methods.bbt import BBTConfig, BBTTuner
from bbt_client.methods.bbtv2 import BBTv2Config, BBTv2Tuner
from bbt_client.methods.registry import config_class, known_methods, make_config, make_tuner


def test_make_tuner_from_dict_model_and_defaults(model_info):
    t = make_tuner("bbt", model_info, {"intrinsic_dim": 10, "prompt_tokens": 2}, seed=1)
    assert isinstance(t, BBTTuner) and t.config.intrinsic_dim == 10
    t2 = make_tuner("bbtv2", model_info, BBTv2Config(intrinsic_dim=10, prompt_tokens=2), seed=1)
    assert isinstance(t2, BBTv2Tuner)
    assert config_class("bbt") is BBTConfig and config_class("bbtv2") is BBTv2Config
    assert make_config("bbt").intrinsic_dim == 500 and make_config("bbt").popsize == 20


def test_unknown_method_and_bad_config(model_info):
    with pytest.raises(ConfigError, match="bbt, bbtv2, gdfo"):
        make_tuner("es", model_info)
    with pytest.raises(ConfigError, match="popsize"):
        make_config("bbt", {"popsize": 1})
    with pytest.raises(ConfigError, match="nope"):
        make_config("bbtv2", {"nope": 3})
    assert known_methods() == ["bbt", "bbtv2", "gdfo", "bdpl", "cmaes-tokens"]


def test_gdfo_missing_dependency_is_a_config_error(model_info, monkeypatch):
    # Simulate an install without torch: importing it fails, and so must loading gdfo, clearly.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "bbt_client.methods.gdfo.tuner", raising=False)
    with pytest.raises(ConfigError, match="gdfo"):
        make_tuner("gdfo", model_info, task=object(), train=object())
