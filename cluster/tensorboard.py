"""TensorBoard event files of a run: the scalars of metrics.jsonl, indexed by env steps.

The driver is the only writer (one event file per launch, in ``runs/<id>/tb/``), so the curves
need nothing from the components. It writes with the ``tensorboard`` package's own event-file
writer and protos: no torch (the driver never imports it; ``torch.utils.tensorboard`` would) and
no second protobuf stack (tensorboardX). A resumed run opens a new event file in the same
directory and its steps go on from the resumed env steps, so TensorBoard draws one curve.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Optional

INSTALL_HINT = "logging.tensorboard: needs the tensorboard package: pip install 'apexq[tensorboard]'"

# tag -> the metrics.jsonl key it plots. The README's TensorBoard table lists the same tags
# (tests/unit/test_tensorboard_scalars.py fails when the two drift apart).
TAGS: dict[str, str] = {
    "train/episode_return": "mean_return",
    "train/episodes": "episodes",
    "eval/return": "eval_return",
    "throughput/env_steps_per_s": "env_steps_per_s",
    "throughput/updates_per_s": "updates_per_s",
    "learner/updates": "updates",
    "learner/loss": "loss",
    "learner/td_error_abs": "td_abs",
    "learner/q_mean": "q_mean",
    "learner/weights_version": "weights_version",
    "replay/size": "replay_size",
    "replay/inserted": "transitions_inserted",
    "replay/sampled": "transitions_sampled",
    "replay/rejected": "rejected",
    "supervision/restarts": "restarts",
    "time/elapsed_s": "time_s",
    "time/eval_s": "eval_time_s",
}
# derived from weights_version and actor_weights_versions (actors without a version yet, -1, are left out)
LAG_TAGS = ("actors/weights_lag_max", "actors/weights_lag_mean")


def available() -> bool:
    """Whether the writer can be imported (``pip install 'apexq[tensorboard]'``)."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: F401
        from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: F401
    except ImportError:
        return False
    return True


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def scalars(record: dict) -> dict[str, float]:
    """The tags of one metrics record; keys it lacks or holds as null are left out (no sample yet)."""
    out = {}
    for tag, key in TAGS.items():
        v = _number(record.get(key))
        if v is not None:
            out[tag] = v
    latest = _number(record.get("weights_version"))
    versions = [v for v in record.get("actor_weights_versions") or [] if _number(v) is not None and v >= 0]
    if latest is not None and versions:
        lags = [max(0.0, latest - v) for v in versions]  # stats are gathered apart: an actor can look ahead
        out[LAG_TAGS[0]] = max(lags)
        out[LAG_TAGS[1]] = sum(lags) / len(lags)
    return out


class ScalarLogger:
    """Appends one event per metrics record to a new event file under ``logdir``; flushed at each record."""

    def __init__(self, logdir: Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._writer = EventFileWriter(str(logdir), max_queue_size=64, flush_secs=60)
        self.logdir = Path(logdir)
        self.failed: Optional[str] = None

    def write(self, record: dict) -> None:
        """Log ``record`` at step env_steps. A failing event file is reported once and then left alone:
        metrics.jsonl, which the run stops on, stays the record of the run."""
        if self.failed is not None or not math.isfinite(_number(record.get("env_steps")) or math.nan):
            return
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=t, simple_value=v) for t, v in scalars(record).items()]
        try:
            self._writer.add_event(
                Event(wall_time=time.time(), step=int(record["env_steps"]), summary=Summary(value=values))
            )
            self._writer.flush()
        except Exception as exc:  # disk full, directory removed: the writer thread re-raises it here
            self.failed = f"{type(exc).__name__}: {exc}"
            print(
                f"apexq: TensorBoard events stop here (in {self.logdir}: {self.failed}); metrics.jsonl goes on",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        try:
            self._writer.close()
        except Exception:
            pass
