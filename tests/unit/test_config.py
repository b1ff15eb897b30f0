import pytest

from cluster.config import DEFAULT_CONFIG, ConfigError, load_config


def test_default_config_loads_and_has_the_contract_keys():
    cfg = load_config()
    assert cfg.env.id == "MountainCar-v0"
    for key in ("seed",):
        assert hasattr(cfg, key)
    assert cfg.actors.num >= 1 and cfg.actors.envs_per_actor >= 1
    assert cfg.replay.shards >= 1 and cfg.replay.capacity >= 1
    assert cfg.learner.batch_size >= 1 and cfg.learner.device in ("auto", "cpu", "cuda")
    assert hasattr(cfg.train, "max_seconds") and hasattr(cfg.train, "max_env_steps")
    assert cfg.train.stop_at_return is None or isinstance(cfg.train.stop_at_return, float)


@pytest.mark.parametrize("override, message", [
    ("actors.num=-3", "actors.num: must be between 1 and 4096, got -3"),
    ("replay.capacity=abc", "replay.capacity: expected an integer, got 'abc'"),
    ("actors.numm=2", "actors.numm: unknown key (did you mean actors.num?)"),
    ("learner.device=tpu", "learner.device: must be one of auto, cpu, cuda, got 'tpu'"),
    ("actors.gamma=0", "actors.gamma: must be in (0, 1], got 0"),
    ("learner.hidden_sizes=[64,x]", "learner.hidden_sizes[1]: expected an integer, got 'x'"),
    ("learner.dueling=3", "learner.dueling: expected true or false, got 3"),
    ("nosuch.key=1", "nosuch: unknown key"),
    ("seed=1.5", "seed: expected an integer, got 1.5"),
    ("train.max_seconds=.nan", "train.max_seconds: must be a finite number"),
])
def test_invalid_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_overrides_coerce_types():
    cfg = load_config(overrides=["actors.num=4", "train.stop_at_return=-110", "train.max_env_steps=null",
                                 "learner.hidden_sizes=[64, 64]", "learner.dueling=true"])
    assert cfg.actors.num == 4 and cfg.train.stop_at_return == -110.0 and cfg.train.max_env_steps is None
    assert cfg.learner.hidden_sizes == [64, 64] and cfg.learner.dueling is True
    # YAML 1.1 reads 1e15 (no dot) as a string: a float key still takes it as the number
    cfg = load_config(overrides=["replay.error_buffer=1e15", "learner.lr=5E-4"])
    assert cfg.replay.error_buffer == 1e15 and cfg.learner.lr == 5e-4
    with pytest.raises(ConfigError, match="replay.error_buffer: expected a number, got '1e15x'"):
        load_config(overrides=["replay.error_buffer=1e15x"])


def test_deadlocking_rate_limiter_is_refused():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["replay.error_buffer=10"])
    assert str(err.value).startswith("replay.error_buffer:") and "deadlock" in str(err.value)


def test_every_key_is_documented_in_the_yaml():
    lines = DEFAULT_CONFIG.read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped:
            key = stripped.split(":")[0]
            prev = lines[i - 1].strip()
            is_section = stripped.endswith(":")
            assert is_section or prev.startswith("#"), f"key {key!r} has no comment above it"
