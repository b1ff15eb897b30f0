"""The ``apexq`` command line: ``apexq train``, ``apexq evaluate``, ``apexq replay-server`` and ``apexq tune``."""

from __future__ import annotations

import time

LAUNCH_TIME = time.time()

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, load_config


class UserError(Exception):
    """Something the user can fix; printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apexq", description="Distributed Ape-X DQN on Ray with Redis-backed replay.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (embedded local Ray + private Redis by default)")
    t.add_argument("--config", help="YAML config (default: configs/mountaincar.yaml)")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override a config key, e.g. --set actors.num=4 (repeatable)",
    )
    t.add_argument(
        "--address",
        help="join this Ray cluster: 'auto' (the `ray start` on this machine) or HOST:PORT of its "
        "GCS; default: $RAY_ADDRESS (set inside `ray job submit`), else a local Ray of "
        "the run's own",
    )
    t.add_argument(
        "--redis-url",
        help="use this Redis (redis:// or rediss://, password in the URL) instead of spawning "
        "one; visible in `ps`: prefer --redis-url-file or $APEXQ_REDIS_URL",
    )
    t.add_argument("--redis-url-file", metavar="PATH", help="read that URL from the first line of PATH")
    t.add_argument("--run-dir", help="where to write the run (default: runs/<id>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.add_argument(
        "--single-process",
        action="store_true",
        help="run actors, replay and learner in this one process (no Ray, no Redis): for debugging and as a baseline",
    )
    t.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files under RUN_DIR/tb (sets logging.tensorboard; "
        "needs pip install 'apexq[tensorboard]')",
    )
    r = sub.add_parser(
        "replay-server",
        help="run one replay shard outside Ray, reached through Redis (for runs with replay.external: true)",
    )
    r.add_argument(
        "--redis-url",
        help="the Redis the run's actors append to (redis:// or rediss://); visible in "
        "`ps`: prefer --redis-url-file or $APEXQ_REDIS_URL",
    )
    r.add_argument("--redis-url-file", metavar="PATH", help="read that URL from the first line of PATH")
    r.add_argument("--shard", type=int, required=True, metavar="K", help="which shard, 0 <= K < replay.shards")
    r.add_argument("--config", help="the run's YAML config (default: configs/mountaincar.yaml)")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override a config key, as for train",
    )
    r.add_argument("--namespace", help="the run's Redis key namespace (default: replay.namespace)")
    r.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0 = any free port)")
    e = sub.add_parser("evaluate", help="greedy evaluation of a run's policy")
    e.add_argument(
        "target",
        help="a run directory, a checkpoint.pt, or a policy.json / policy.safetensors (given a "
        "policy.pt2 it reads those two beside it: apexq never loads .pt2 files)",
    )
    e.add_argument("--episodes", type=int, default=100)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--gif", metavar="PATH", help="also write an animation of one greedy episode (needs pygame)")
    e.add_argument("--env", help="environment id (default: the run's)")
    from .tune import add_arguments as add_tune_arguments

    add_tune_arguments(
        sub.add_parser(
            "tune",
            help="search config keys for the fastest solve (Ray Tune, Optuna "
            "TPE, ASHA; needs pip install 'apexq[tune]')",
        )
    )
    return p


def cmd_train(args) -> int:
    from .redis_url import from_cli, resolved
    from .run_dir import RunDir, new_run_id

    args.redis_url = from_cli(args.redis_url, args.redis_url_file)  # --redis-url, its file, or $APEXQ_REDIS_URL
    if args.tensorboard:
        args.overrides = [*args.overrides, "logging.tensorboard=true"]
    if args.resume:
        rd = RunDir(Path(args.resume))
        if not (rd.path / "config.yaml").is_file():
            raise UserError(f"--resume {args.resume}: not a run directory (no config.yaml)")
        if not rd.checkpoint.is_file():
            raise UserError(f"--resume {args.resume}: no checkpoint.pt to resume from")
        from apexq.learner.checkpoint import CheckpointError, load

        try:
            load(rd.checkpoint)
        except CheckpointError as exc:
            raise UserError(f"--resume: {exc}") from None
        cfg = load_config(base=rd.saved_config(), overrides=args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
        rd = RunDir(Path(args.run_dir) if args.run_dir else Path("runs") / new_run_id())
        if rd.metrics.exists():
            raise UserError(f"--run-dir {rd.path}: already holds a run; use --resume to continue it")
    if cfg.logging.tensorboard:
        from .tensorboard import INSTALL_HINT, available

        if not available():
            raise UserError(INSTALL_HINT)
    from apexq.actors.envs import EnvSpecError, env_spec

    try:
        spec = env_spec(cfg.env.id)
    except EnvSpecError as exc:
        raise UserError(str(exc)) from None
    if args.single_process or not (args.address or os.environ.get("RAY_ADDRESS", "").strip()):  # all on this machine
        from .components import check_replay_memory, physical_memory

        check_replay_memory(
            cfg,
            spec["obs_dim"],
            physical_memory(),
            "this machine",
            with_redis=not (args.redis_url or cfg.replay.redis_urls or args.single_process),
        )
    # replay.redis_urls' env:/file: references read for the run; the records keep cfg's form
    run_cfg = cfg if args.single_process else resolved(cfg)
    try:
        rd.create(cfg) if not args.resume else None
    except OSError as exc:
        raise UserError(f"--run-dir {rd.path}: cannot write there ({exc.strerror or exc})") from None
    from apexq.core.connection import RedisAuthError

    from .launch import ClusterConfigError, train
    from .redis_server import RedisNotFound
    from .run_dir import RunDirError

    if args.single_process and cfg.replay.external:
        raise UserError("replay.external: --single-process keeps its shards in the process; set replay.external=false")
    try:
        if cfg.logging.tensorboard:
            rd.open_tensorboard()
        if args.single_process:
            from .serial import train_serial

            resume_state = None
            if args.resume:
                from apexq.learner.checkpoint import load

                resume_state = load(rd.checkpoint)
            summary = train_serial(cfg, rd, resume_state=resume_state, launch_time=LAUNCH_TIME)
        else:
            summary = train(
                run_cfg,
                rd,
                address=args.address,
                redis_url=args.redis_url,
                resume=bool(args.resume),
                launch_time=LAUNCH_TIME,
            )
    except (RedisNotFound, RedisAuthError, ConnectionError, ClusterConfigError, RunDirError) as exc:
        raise UserError(str(exc)) from None
    finally:
        rd.close()
    from .plots import write_curve

    records = rd.read_metrics()
    try:
        write_curve(records, rd.path / "curve.png", title=f"{cfg.env.id} - run {rd.run_id}")
    except Exception as exc:  # a picture is never worth failing a run
        print(f"apexq: could not draw curve.png: {exc}", file=sys.stderr)
    final = summary.get("record", {})
    acct = summary.get("accounting")
    status = 0
    if acct and not acct.get("reconciled", True):
        print(
            f"apexq: error: accounting not reconciled: {acct.get('why', 'a shard could not be reached')}",
            file=sys.stderr,
        )
        status = 1
    elif acct:
        print(
            f"apexq: accounting: appended {acct['appended']} = ingested {acct['ingested']} + pending "
            f"{acct['pending']} -> {'balanced' if acct['balanced'] else 'NOT BALANCED'} | rejected entries "
            f"{acct['rejected_entries']} | lost in Redis restarts {acct['lost_in_redis']} | in flight in dead "
            f"actors {acct['in_flight_lost']}"
        )
        if not acct["balanced"]:
            print(
                "apexq: error: accounting NOT BALANCED: Redis counts appended transitions that were neither "
                "ingested by a shard nor pending in its stream (see accounting.json)",
                file=sys.stderr,
            )
            status = 1
        elif acct["lost_in_redis"]:
            print(
                f"apexq: note: {acct['lost_in_redis']} transitions that actors saw acknowledged were lost when "
                f"Redis restarted (appends inside its append-only file's fsync window, redis.appendfsync)"
            )
    if summary.get("solved_at_s") is not None:
        print(
            f"apexq: solved: reached train.stop_at_return {summary['solved_at_s']:.1f}s after launch "
            f"(evaluation time included; {summary.get('eval_time_s', 0):.1f}s of it evaluating)"
        )
    failed = str(summary.get("stop_reason", "")).startswith(("gave up", "run directory failed", "Redis unreachable"))
    print(
        f"apexq: {'stopped' if failed else 'done'} ({summary.get('stop_reason')}) | "
        f"env steps {final.get('env_steps', 0)} | "
        f"updates {final.get('updates', 0)} | inserted {final.get('transitions_inserted', 0)} | "
        f"sampled {final.get('transitions_sampled', 0)} | checkpoint {summary.get('checkpoint')} | run {rd.path}"
    )
    if summary.get("checkpoint") and summary.get("best_eval_return") is not None:
        print(
            f"apexq: the policy files (policy.json + policy.safetensors, .onnx, .pt2) hold the best evaluated "
            f"weights: v{summary['best_weights_version']}, "
            f"greedy mean return {summary['best_eval_return']:.1f} over {cfg.eval.episodes} episodes"
        )
    if failed or not summary.get("checkpoint"):
        return 1
    return status


def cmd_replay_server(args) -> int:
    """One shard as its own process: ingest its stream, answer the learner's requests through Redis."""
    import signal
    import threading

    from apexq.actors.envs import EnvSpecError, env_spec
    from apexq.core.connection import RedisAuthError, check, redact
    from apexq.replay_server.rpc import ShardRpcServer
    from apexq.replay_server.shard import ReplayShard

    from .components import shard_spec
    from .redis_url import ENV_VAR, from_cli

    cfg = load_config(args.config, args.overrides)
    args.redis_url = from_cli(args.redis_url, args.redis_url_file)
    if args.redis_url is None:
        raise UserError(f"--redis-url: give the run's Redis with --redis-url-file PATH, ${ENV_VAR} or --redis-url")
    if not 0 <= args.shard < cfg.replay.shards:
        raise UserError(f"--shard: must be between 0 and replay.shards-1={cfg.replay.shards - 1}, got {args.shard}")
    ns = args.namespace or cfg.replay.namespace
    if not ns:
        raise UserError("--namespace: give the run's namespace (or set replay.namespace in the config)")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise UserError(f"--metrics-port: must be between 0 and 65535, got {args.metrics_port}")
    try:
        spec = env_spec(cfg.env.id)
        check(args.redis_url)
    except (EnvSpecError, RedisAuthError, ConnectionError) as exc:
        raise UserError(str(exc)) from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    shard = ReplayShard(shard_spec(cfg, args.shard, spec), args.redis_url, ns, cfg.seed * 1000 + args.shard)
    info = shard.start()
    # one request is at most what the learner asks of one shard: batch_size * batches_per_request
    server = ShardRpcServer(shard, args.redis_url, ns, cfg.learner.batch_size * cfg.learner.batches_per_request).start()

    def stats() -> dict:
        return {**shard.stats(), **server.stats()}

    where = ""
    if args.metrics_port is not None:
        from .metrics import serve_component

        address = serve_component("shard", args.shard, stats, cfg.metrics.host, args.metrics_port)
        where = f" | metrics at http://{address}/metrics"
    print(
        f"apexq replay-server: shard {args.shard} of {cfg.replay.shards} | namespace {ns} | "
        f"{redact(args.redis_url)} | rebuilt {info['rebuilt']} transitions | capacity {shard.spec.capacity}{where}",
        flush=True,
    )
    status = 0
    last_report = time.monotonic()
    while not stop.wait(1.0):  # liveness every second, a status line every 10 s
        problem = server.problem() or (None if shard.ping() else "the ingest thread died")
        if problem:
            print(
                f"apexq replay-server: error: {problem}; exiting so a supervisor restarts it",
                file=sys.stderr,
                flush=True,
            )
            status = 1
            break
        if time.monotonic() - last_report < 10.0:
            continue
        last_report = time.monotonic()
        st = stats()
        print(
            f"apexq replay-server: size {st['size']} | inserted {st['inserted']} | sampled {st['sampled']} | "
            f"requests {st['rpc_requests']} | rejected {st['rejected_total'] + st['rpc_rejected_total']}",
            flush=True,
        )
    server.stop()
    shard.stop()
    st = stats()
    print(
        f"apexq replay-server: stopped | size {st['size']} | inserted {st['inserted']} | sampled {st['sampled']}",
        flush=True,
    )
    return status


def _load_policy_for_eval(target: Path, env_override) -> tuple:
    """(NumpyQPolicy, env id, what is known of it) from a run directory, a checkpoint or a policy's files.

    An exported policy is read from ``policy.json`` + ``policy.safetensors`` only, formats that
    cannot carry code. apexq never loads a ``.pt2`` (``torch.export.load`` unpickles, so a
    crafted file runs its payload): given one, it reads the two files written beside it, or
    refuses. A checkpoint loads with ``weights_only=True`` and is checked key by key.
    """
    import numpy as np

    from apexq.actors.policy import NumpyQPolicy
    from apexq.learner.policy_file import PolicyFileError, read_policy_files

    from .run_dir import RunDir

    path = target
    if target.is_dir():  # a run: its policy (the best evaluated weights), else its latest checkpoint
        rd = RunDir(target)
        found = next((p for p in (rd.policy.with_suffix(".json"), rd.checkpoint) if p.is_file()), None)
        if found is None:
            only = " (only policy.pt2, which apexq never loads)" if rd.policy.with_suffix(".pt2").exists() else ""
            raise UserError(f"{target}: no policy.json or checkpoint.pt there{only}")
        path = found
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix in (".json", ".safetensors", ".pt2", ".onnx"):
        stem = path.with_suffix("")
        if path.suffix in (".pt2", ".onnx") and not stem.with_suffix(".json").is_file():
            raise UserError(
                f"{path}: apexq never loads {path.suffix} files (a .pt2 is unpickled, so it could run "
                f"code); evaluate the {stem.name}.json + {stem.name}.safetensors written beside it, or "
                f"a checkpoint.pt"
            )
        try:
            arch, weights = read_policy_files(stem)
        except PolicyFileError as exc:
            raise UserError(str(exc)) from None
        if path.suffix in (".pt2", ".onnx"):
            print(
                f"apexq: evaluating {stem.name}.json + {stem.name}.safetensors beside {path.name} (the same "
                f"weights; apexq never loads {path.suffix} files)",
                file=sys.stderr,
            )
        known = {
            "source": str(stem.with_suffix(".json")),
            "weights_version": arch["weights_version"],
            "eval_return": arch["eval_return"],
            "updates": None,
        }
    else:
        from apexq.learner.checkpoint import CheckpointError, load, policy_weights  # (imports torch)

        try:
            state = load(path)
            arch, weights = policy_weights(state, path)
        except CheckpointError as exc:
            raise UserError(str(exc)) from None
        known = {"source": str(path), "weights_version": None, "eval_return": None, "updates": state["updates"]}
    env_id = env_override or arch["env_id"] or _run_env_id(path.parent)
    _check_env_fits(env_id, arch, path)
    policy = NumpyQPolicy(arch, arch["hidden_sizes"], arch["dueling"], rng=np.random.default_rng(0))
    policy.load_state(weights)
    return policy, env_id, known


def _run_env_id(run: Path) -> str:
    """env.id from the run's config.yaml, for a policy.json written without one."""
    import yaml

    try:
        env_id = yaml.safe_load((run / "config.yaml").read_text())["env"]["id"]
    except Exception:
        env_id = None
    if not isinstance(env_id, str):
        raise UserError(f"{run}: the policy names no environment and no config.yaml beside it does; give --env")
    return env_id


def _check_env_fits(env_id: str, arch: dict, path: Path) -> None:
    from apexq.actors.envs import EnvSpecError, env_spec

    try:
        spec = env_spec(env_id)
    except EnvSpecError as exc:
        raise UserError(str(exc)) from None
    if (spec["obs_dim"], spec["num_actions"]) != (arch["obs_dim"], arch["num_actions"]):
        raise UserError(
            f"{path}: the policy takes {arch['obs_dim']} observation values and has {arch['num_actions']} "
            f"actions; {env_id} has {spec['obs_dim']} and {spec['num_actions']}"
        )


def cmd_evaluate(args) -> int:
    import numpy as np

    from .evaluate import SEEDS_PER_RUN_SEED, evaluate

    if not 1 <= args.episodes <= SEEDS_PER_RUN_SEED:
        raise UserError(f"--episodes: must be between 1 and {SEEDS_PER_RUN_SEED}, got {args.episodes}")
    policy, env_id, known = _load_policy_for_eval(Path(args.target), args.env)
    returns = evaluate(policy, env_id, args.episodes, seed=args.seed)
    res = {
        "env": env_id,
        "episodes": args.episodes,
        "seed": args.seed,
        "mean": float(np.mean(returns)),
        "std": float(np.std(returns)),
        "min": float(np.min(returns)),
        "max": float(np.max(returns)),
        **known,
        "returns": [float(r) for r in returns],
    }
    if args.gif:
        from .render import RenderUnavailable, record_gif

        try:
            res["gif"] = record_gif(policy, env_id, args.gif, seed=args.seed)
        except RenderUnavailable as exc:
            raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{env_id}: {args.episodes} greedy episodes | mean {res['mean']:.2f} | std {res['std']:.2f} | "
            f"min {res['min']:.0f} | max {res['max']:.0f}" + (f" | animation {args.gif}" if args.gif else "")
        )
    return 0


def main(argv=None) -> int:
    from .launch import set_ray_env

    set_ray_env()
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "replay-server":
            return cmd_replay_server(args)
        if args.command == "tune":
            from .tune import TuneError, run

            try:
                return run(args)
            except TuneError as exc:
                raise UserError(str(exc)) from None
    except (ConfigError, UserError) as exc:
        print(f"apexq: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
