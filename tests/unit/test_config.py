import pytest
import yaml

from apexq.cluster.config import DEFAULT_CONFIG, Config, ConfigError, load_config


def test_default_config_is_what_the_yaml_documents():
    """Every value load_config() returns is the one written (and commented) in the YAML, and every key
    of the code's schema is written there: a key the code ignored, renamed or defaulted differently
    would make the file lie to its reader."""
    documented = yaml.safe_load(DEFAULT_CONFIG.read_text())
    got = load_config().to_dict()
    assert set(got) == set(documented), set(got) ^ set(documented)
    for section, value in documented.items():
        if not isinstance(value, dict):
            assert got[section] == value, section
            continue
        assert set(got[section]) == set(value), (section, set(got[section]) ^ set(value))
        for key, v in value.items():
            assert got[section][key] == v and type(got[section][key]) in (type(v), float), f"{section}.{key}"
    # and a config file that leaves a key out gets the same value as the default file documents
    assert Config().to_dict() == got


def test_documented_defaults_by_hand(tmp_path):
    """The defaults README and the YAML's comments promise (values written here by hand)."""
    cfg = load_config()
    assert (cfg.seed, cfg.env.id) == (0, "MountainCar-v0")
    assert (cfg.actors.num, cfg.actors.envs_per_actor, cfg.actors.n_step, cfg.actors.gamma) == (2, 32, 3, 0.98)
    assert (cfg.replay.shards, cfg.replay.capacity, cfg.replay.samples_per_insert) == (1, 50_000, 8.0)
    assert (cfg.replay.min_size_to_sample, cfg.replay.error_buffer) == (2000, 20_000.0)
    assert (cfg.replay.priority_alpha, cfg.replay.beta_start, cfg.replay.redis_urls) == (0.6, 0.4, [])
    assert (cfg.learner.batch_size, cfg.learner.lr, cfg.learner.hidden_sizes) == (512, 0.002, [64, 64])
    assert (cfg.learner.device, cfg.learner.batches_per_request, cfg.learner.cuda_graphs) == ("auto", 8, True)
    assert cfg.learner.checkpoint_every_s == 30.0
    assert (cfg.eval.every_seconds, cfg.eval.episodes) == (10.0, 100)
    assert (cfg.train.max_seconds, cfg.train.max_env_steps, cfg.train.stop_at_return) == (600.0, None, None)
    assert (cfg.redis.host, cfg.redis.appendfsync, cfg.redis.server_path) == ("127.0.0.1", "everysec", None)
    assert (cfg.metrics.enabled, cfg.metrics.host, cfg.metrics.port) == (True, "127.0.0.1", 9400)
    # an empty file is the defaults, not an error or zeros
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml").to_dict() == cfg.to_dict()


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
