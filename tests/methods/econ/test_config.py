"""ECON configs: the paper's defaults, and bad values rejected with the field named."""

import pytest

from align_jax.config import ConfigError, FieldError, config_from_dict
from align_jax.methods.econ.config import (EconConfig, NetworkConfig, SimConfig, TrainConfig, check_reward_weights,
                                           reward_weight_vector)
from align_jax.methods.econ.sim import make_env_params


def test_defaults_are_the_papers():
    config = EconConfig()
    assert (config.network.belief_dim, config.network.num_heads, config.network.num_blocks) == (128, 4, 2)
    assert reward_weight_vector(config.reward_weights) == (0.5, 0.3, 0.2)
    tr = config.train
    assert (tr.batch_size, tr.update_every, tr.learning_rate, tr.gamma, tr.tau) == (16, 8, 1e-3, 0.99, 0.01)
    assert (config.sim.num_executors, config.sim.max_rounds) == (3, 5)
    assert hash(config) == hash(EconConfig())  # hashable despite the dict field


@pytest.mark.parametrize("weights,field", [
    ({"ts": 0.5, "bogus": 0.1}, "reward_weights.bogus"),
    ({"ts": 0.5, "al": -0.1}, "reward_weights.al"),
    ({"ts": float("nan")}, "reward_weights.ts"),
    ({"ts": 0.0, "al": 0.0}, "reward_weights"),
    ({}, "reward_weights"),
])
def test_bad_reward_weights_name_the_field(weights, field):
    with pytest.raises(FieldError) as info:
        EconConfig(reward_weights=weights)
    assert info.value.field == field
    with pytest.raises(FieldError):
        check_reward_weights(weights)


def test_missing_reward_names_weigh_zero():
    assert reward_weight_vector({"ts": 1.0}) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("make,field", [
    (lambda: SimConfig(num_executors=0), "num_executors"),
    (lambda: SimConfig(num_executors=4, num_groups=3), "num_groups"),
    (lambda: SimConfig(num_answers=1), "num_answers"),
    (lambda: NetworkConfig(belief_dim=10, num_heads=4), "num_heads"),
    (lambda: NetworkConfig(num_blocks=-1), "num_blocks"),
    (lambda: NetworkConfig(temperature_min=0.05), "temperature_min"),
    (lambda: NetworkConfig(top_p_max=0.99), "top_p_max"),
    (lambda: NetworkConfig(temperature_min=1.5, temperature_max=1.0), "temperature_min"),
    (lambda: TrainConfig(num_steps=100, update_every=8), "num_steps"),
    (lambda: TrainConfig(gamma=1.5), "gamma"),
    (lambda: TrainConfig(learning_rate=0.0), "learning_rate"),
    (lambda: TrainConfig(bne_weight=-1.0), "bne_weight"),
    (lambda: TrainConfig(reward_weight_lr=-0.1), "reward_weight_lr"),
    (lambda: TrainConfig(reward_weight_lr=float("nan")), "reward_weight_lr"),
    (lambda: EconConfig(train=TrainConfig(batch_size=32, buffer_size=16)), "train.batch_size"),
    (lambda: EconConfig(name="a/b"), "name"),
])
def test_bad_values_name_the_field(make, field):
    with pytest.raises(FieldError) as info:
        make()
    assert info.value.field == field


def test_loader_reports_the_nested_key():
    with pytest.raises(ConfigError, match=r"sim\.num_executors"):
        config_from_dict(EconConfig, {"sim": {"num_executors": 0}})
    with pytest.raises(ConfigError, match=r"reward_weights\.novelty"):
        config_from_dict(EconConfig, {"reward_weights": {"ts": 1.0, "novelty": 0.5}})
    config = config_from_dict(EconConfig, {"reward_weights": {"ts": 1.0}, "network": {"belief_dim": 64}})
    assert config.network.belief_dim == 64 and config.reward_weights == {"ts": 1.0}


def test_env_params_reject_unknown_reward_names():
    with pytest.raises(FieldError) as info:
        make_env_params(SimConfig(), reward_weights={"ts": 1.0, "style": 1.0})
    assert info.value.field == "reward_weights.style"
