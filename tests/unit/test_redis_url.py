"""Where the Redis URL comes from (--redis-url, --redis-url-file, $APEXQ_REDIS_URL, env:/file: entries)
and what records of a run keep of it (cluster/redis_url.py, Config.to_dict)."""

import pytest
import yaml

from apexq.cluster.config import ConfigError, dump_config, load_config
from apexq.cluster.redis_url import ENV_VAR, from_cli, resolve_entry, resolved

URL = "redis://default:s3cret-pw@10.0.0.5:6380/0"


def test_precedence_flag_then_file_then_environment(tmp_path):
    f = tmp_path / "url"
    f.write_text("  redis://:from-file@h:1/0 \nsecond line is ignored\n")
    env = {ENV_VAR: "redis://:from-env@h:1/0"}
    assert from_cli("redis://:from-flag@h:1/0", str(f), env) == "redis://:from-flag@h:1/0"
    assert from_cli(None, str(f), env) == "redis://:from-file@h:1/0"
    assert from_cli(None, None, env) == "redis://:from-env@h:1/0"
    assert from_cli(None, None, {}) is None
    assert from_cli(None, None, {ENV_VAR: "  "}) is None


def test_url_file_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "url").write_text(URL + "\n")
    assert from_cli(None, "~/url", {}) == URL


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "--redis-url-file {p}: cannot read (No such file or directory)"),
        ("", "--redis-url-file {p}: is empty"),
        ("\n  \n", "--redis-url-file {p}: is empty"),
        ("s3cret-pw\n", "--redis-url-file {p}: is not a redis://, rediss:// or unix:// URL"),
    ],
)
def test_bad_url_file_is_one_line_that_never_echoes_the_content(tmp_path, content, message):
    p = tmp_path / "url"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ConfigError) as err:
        from_cli(None, str(p), {})
    assert str(err.value) == message.format(p=p)
    assert "s3cret" not in str(err.value)


def test_environment_value_that_is_not_a_url_is_refused_without_echo():
    with pytest.raises(ConfigError, match=f"^{ENV_VAR}: is not a redis://") as err:
        from_cli(None, None, {ENV_VAR: "s3cret-pw"})
    assert "s3cret" not in str(err.value)


def test_replay_redis_urls_references_resolve(tmp_path):
    (tmp_path / "u1").write_text(URL + "\n")
    env = {"SHARD0_URL": "redis://:pw0@h0:1/0"}
    assert resolve_entry("env:SHARD0_URL", "replay.redis_urls[0]", env) == "redis://:pw0@h0:1/0"
    assert resolve_entry(f"file:{tmp_path / 'u1'}", "replay.redis_urls[1]", env) == URL
    assert resolve_entry(URL, "replay.redis_urls[2]", env) == URL
    with pytest.raises(
        ConfigError,
        match=r"^replay.redis_urls\[0\]: environment variable NOPE \(from env:NOPE\) "
        r"is not set$",
    ):
        resolve_entry("env:NOPE", "replay.redis_urls[0]", env)
    with pytest.raises(
        ConfigError,
        match=r"^replay.redis_urls\[1\]: the saved config holds this URL with its "
        r"password redacted; give it as env:VAR or file:PATH",
    ):
        resolve_entry("redis://default:***@h:1/0", "replay.redis_urls[1]", env)


def test_records_keep_references_and_redact_literal_passwords(tmp_path):
    (tmp_path / "u").write_text(URL)
    cfg = load_config(
        overrides=[
            "replay.shards=3",
            "replay.capacity=3000",
            "replay.min_size_to_sample=500",
            f"replay.redis_urls=[{URL}, env:SHARD1_URL, file:{tmp_path / 'u'}]",
        ]
    )
    saved = yaml.safe_load(dump_config(cfg))["replay"]["redis_urls"]
    assert saved == ["redis://default:***@10.0.0.5:6380/0", "env:SHARD1_URL", f"file:{tmp_path / 'u'}"]
    assert "s3cret" not in dump_config(cfg) and "s3cret" not in repr(cfg.to_dict())
    run = resolved(cfg, {"SHARD1_URL": "redis://:pw1@h1:1/0"})
    assert run.replay.redis_urls == [URL, "redis://:pw1@h1:1/0", URL]
    assert cfg.replay.redis_urls[1] == "env:SHARD1_URL"  # the config itself is left as given
    assert "pw1" not in dump_config(run) and "s3cret" not in dump_config(run)
    # a saved config with a redacted URL loads (it is a valid config), but cannot be resolved
    again = load_config(base=yaml.safe_load(dump_config(cfg)))
    with pytest.raises(ConfigError, match=r"replay.redis_urls\[0\]: the saved config"):
        resolved(again, {"SHARD1_URL": "redis://:pw1@h1:1/0"})
