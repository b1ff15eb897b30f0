import dataclasses
import typing

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


def test_the_yaml_is_the_only_place_defaults_live():
    """No field of the config's dataclasses has a default in code: one there could drift from the YAML."""
    todo, checked = [Config], 0
    while todo:
        cls = todo.pop()
        types = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, (
                f"{cls.__name__}.{f.name}"
            )
            if dataclasses.is_dataclass(types[f.name]):
                todo.append(types[f.name])
            else:
                checked += 1
    assert checked == len(leaves(load_config().to_dict()))  # every section was walked


def test_a_config_file_is_an_overlay_of_the_default(tmp_path):
    """A file naming one key changes that key; every other key keeps the packaged default, and an
    empty section keeps its section's defaults."""
    default = load_config().to_dict()
    path = tmp_path / "mine.yaml"
    path.write_text("actors:\n  num: 7\nlearner:\n")
    got = load_config(path).to_dict()
    assert got["actors"]["num"] == 7
    got["actors"]["num"] = default["actors"]["num"]
    assert got == default
    # --set goes over the file, and a whole section given by --set merges the same way
    cfg = load_config(path, ["actors.envs_per_actor=4", "learner={lr: 0.01}"])
    assert (cfg.actors.num, cfg.actors.envs_per_actor, cfg.learner.lr) == (7, 4, 0.01)
    assert cfg.learner.batch_size == default["learner"]["batch_size"]
    # so does a saved config (a checkpoint's) that predates a key
    saved = load_config(path).to_dict()
    del saved["redis"]["unreachable_timeout_s"]
    assert load_config(base=saved).redis.unreachable_timeout_s == default["redis"]["unreachable_timeout_s"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("actors:\n  numm: 7\n", "actors.numm: unknown key (did you mean actors.num?)"),
        ("actor:\n  num: 7\n", "actor: unknown key (did you mean actors?)"),
        ("actors:\n  num: -1\n", "actors.num: must be between 1 and 4096, got -1"),
        ("actors: 7\n", "actors: expected a mapping, got 7"),
        ("- actors\n", "config: expected a mapping, got ['actors']"),
    ],
)
def test_a_bad_key_in_an_overlay_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == message


def test_errors_reading_the_users_file_name_it(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("actors: [\n")
    with pytest.raises(ConfigError, match=f"^--config {path}: line 2 is not valid YAML$"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"^--config {tmp_path / 'none.yaml'}: cannot read"):
        load_config(tmp_path / "none.yaml")


def leaves(data: dict, prefix: str = "") -> set:
    out = set()
    for k, v in data.items():
        out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_documented_defaults_by_hand(tmp_path):
    """The defaults README and the YAML's comments promise (values written here by hand)."""
    cfg = load_config()
    assert (cfg.seed, cfg.env.id) == (0, "MountainCar-v0")
    assert (cfg.actors.num, cfg.actors.envs_per_actor, cfg.actors.n_step, cfg.actors.gamma) == (2, 64, 5, 0.98)
    assert (cfg.replay.shards, cfg.replay.capacity, cfg.replay.samples_per_insert) == (1, 50_000, 8.7)
    assert (cfg.replay.min_size_to_sample, cfg.replay.error_buffer) == (2000, 20_000.0)
    assert (cfg.replay.priority_alpha, cfg.replay.beta_start, cfg.replay.redis_urls) == (0.6, 0.4, [])
    assert (cfg.learner.batch_size, cfg.learner.lr, cfg.learner.hidden_sizes) == (256, 0.0035, [64, 64])
    assert (cfg.learner.device, cfg.learner.batches_per_request, cfg.learner.cuda_graphs) == ("auto", 8, True)
    assert cfg.learner.checkpoint_every_s == 30.0
    assert (cfg.eval.every_seconds, cfg.eval.episodes) == (10.0, 100)
    assert (cfg.train.max_seconds, cfg.train.max_env_steps, cfg.train.stop_at_return) == (600.0, None, None)
    assert (cfg.redis.host, cfg.redis.appendfsync, cfg.redis.server_path) == ("127.0.0.1", "everysec", None)
    assert (cfg.metrics.enabled, cfg.metrics.host, cfg.metrics.port) == (True, "127.0.0.1", 9400)
    # an empty file is the defaults, not an error or zeros
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml").to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "override, message",
    [
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
    ],
)
def test_invalid_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_overrides_coerce_types():
    cfg = load_config(
        overrides=[
            "actors.num=4",
            "train.stop_at_return=-110",
            "train.max_env_steps=null",
            "learner.hidden_sizes=[64, 64]",
            "learner.dueling=true",
        ]
    )
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
