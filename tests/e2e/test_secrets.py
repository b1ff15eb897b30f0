"""The Redis password of a real distributed run, given the way the README says (APEXQ_REDIS_URL and a
`file:` entry in replay.redis_urls), appears in no argv, no file of the run directory, no line the run
prints and no metric, and the run's components are never refused a command by the client ACL."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]


def descendants(root: int) -> set:
    """Pids of every live process below ``root`` (Ray's daemons and workers included)."""
    children: dict = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def scrape(run_dir: Path) -> dict:
    """{address: /metrics body} of every endpoint the run lists in prometheus_targets.json."""
    try:
        groups = json.loads((run_dir / "prometheus_targets.json").read_text())
    except (OSError, ValueError):
        return {}
    bodies = {}
    for group in groups:
        for addr in group["targets"]:
            try:
                bodies[addr] = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read()
            except OSError:
                pass
    return bodies


@pytest.mark.slow
def test_the_redis_password_stays_out_of_argv_records_logs_and_metrics(redis_server, tmp_path):
    password = redis_server.password.encode()
    admin = redis.Redis.from_url(redis_server.admin_url)
    admin.execute_command("ACL", "LOG", "RESET")
    url_file = tmp_path / "shard-url"
    url_file.write_text(redis_server.url + "\n")
    run_dir = tmp_path / "run"
    env = dict(
        os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", APEXQ_REDIS_URL=redis_server.url
    )
    argv = [
        sys.executable,
        "-m",
        "apexq.cluster.cli",
        "train",
        "--run-dir",
        str(run_dir),
        "--set",
        "train.max_seconds=15",
        "--set",
        "train.progress_every_s=2",
        "--set",
        "eval.every_seconds=5",
        "--set",
        "eval.episodes=5",
        "--set",
        "learner.checkpoint_every_s=5",
        "--set",
        "replay.min_size_to_sample=500",
        "--set",
        f"replay.redis_urls=[file:{url_file}]",
    ]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = err = b""
    seen_argv: dict = {}
    bodies: dict = {}
    try:
        deadline, next_scrape = time.monotonic() + 180, 0.0
        while proc.poll() is None and time.monotonic() < deadline:
            for pid in descendants(proc.pid) | {proc.pid}:
                seen_argv.setdefault(pid, cmdline(pid))
            if time.monotonic() >= next_scrape:  # every few seconds while it runs
                bodies.update(scrape(run_dir))
                next_scrape = time.monotonic() + 3
            time.sleep(0.2)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (out[-2000:] + err[-3000:]).decode(errors="replace")
    assert b"apexq: done" in out

    # argv of every process the run started (the driver, Ray's daemons, every worker)
    assert len(seen_argv) >= 5, seen_argv
    leaked = {pid: a.replace(b"\0", b" ")[:200] for pid, a in seen_argv.items() if password in a}
    assert not leaked, leaked
    # everything it printed
    assert password not in out and password not in err
    # every file in the run directory, checkpoint included
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"config.yaml", "checkpoint.pt", "metrics.jsonl", "prometheus_targets.json"} <= {p.name for p in files}
    for p in files:
        assert password not in p.read_bytes(), f"{p.name} holds the Redis password"
    assert f"file:{url_file}" in (run_dir / "config.yaml").read_text()  # the reference, kept for --resume
    # every metrics endpoint (driver, shard, learner, actors), scraped while the run was up
    assert len(bodies) >= 4, sorted(bodies)
    for addr, body in bodies.items():
        assert b"apexq_" in body and password not in body, addr
    # and nothing the run sent was refused by the client user's ACL
    assert admin.execute_command("ACL", "LOG") == []


def test_replay_server_takes_the_url_from_a_file_or_the_environment(redis_server, tmp_path):
    """`apexq replay-server` without --redis-url: a one-line error when no source gives a URL; with the
    file or the variable it serves, and neither its argv nor its output holds the password."""
    base = [sys.executable, "-m", "apexq.cluster.cli", "replay-server", "--shard", "0", "--namespace", "sec"]
    env = {k: v for k, v in os.environ.items() if k != "APEXQ_REDIS_URL"}
    r = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == (
        "apexq: error: --redis-url: give the run's Redis with --redis-url-file PATH, $APEXQ_REDIS_URL or --redis-url"
    )
    url_file = tmp_path / "url"
    url_file.write_text(redis_server.url + "\n")
    for extra, extra_env in (["--redis-url-file", str(url_file)], {}), ([], {"APEXQ_REDIS_URL": redis_server.url}):
        p = subprocess.Popen(
            base + extra, cwd=ROOT, env={**env, **extra_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            line = p.stdout.readline()
            assert line.startswith("apexq replay-server: shard 0") and "apexq:***@127.0.0.1" in line, line
            assert redis_server.password.encode() not in cmdline(p.pid)
        finally:
            p.kill()
            out, err = p.communicate(timeout=20)
        assert redis_server.password not in line + out + err
