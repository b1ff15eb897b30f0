"""The metrics record -> TensorBoard tags mapping, worked out by hand, and the event-file writer read back."""

import re
from pathlib import Path

from apexq.cluster.tensorboard import LAG_TAGS, TAGS, ScalarLogger, scalars

ROOT = Path(__file__).resolve().parents[2]


def test_a_record_maps_to_its_tags():
    rec = {
        "time_s": 3.5,
        "env_steps": 1000,
        "episodes": 5,
        "updates": 300,
        "transitions_inserted": 990,
        "transitions_sampled": 4800,
        "replay_size": 900,
        "rejected": 0,
        "weights_version": 10,
        "actor_weights_versions": [7, 9, -1, 12],
        "mean_return": -150.5,
        "eval_return": None,
        "loss": 0.25,
        "td_abs": 1.5,
        "q_mean": -20.0,
        "restarts": 1,
        "first_update_s": 2.0,
        "env_steps_per_s": 2000.0,
        "eval_time_s": 0.0,
        "final": True,
    }
    assert scalars(rec) == {
        "train/episode_return": -150.5,
        "train/episodes": 5.0,
        "throughput/env_steps_per_s": 2000.0,
        "learner/updates": 300.0,
        "learner/loss": 0.25,
        "learner/td_error_abs": 1.5,
        "learner/q_mean": -20.0,
        "learner/weights_version": 10.0,
        "replay/size": 900.0,
        "replay/inserted": 990.0,
        "replay/sampled": 4800.0,
        "replay/rejected": 0.0,
        "supervision/restarts": 1.0,
        "time/elapsed_s": 3.5,
        "time/eval_s": 0.0,
        # actors at 7, 9 and 12 of 10 (the -1 has no weights yet): lags 3, 1 and 0 (12 looked ahead)
        "actors/weights_lag_max": 3.0,
        "actors/weights_lag_mean": 4 / 3,
    }  # eval_return null and updates_per_s absent (first tick): no sample, as in Prometheus


def test_lag_needs_an_actor_with_weights():
    got = scalars({"env_steps": 5, "weights_version": 4, "actor_weights_versions": [-1, -1]})
    assert got == {"learner/weights_version": 4.0}


def test_readme_documents_every_tag():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Monitor with TensorBoard") :]
    documented = set(re.findall(r"^\| `([a-z_]+/[a-z_]+)` \|", section, re.M))
    assert documented == set(TAGS) | set(LAG_TAGS)


def test_events_read_back_with_tensorboards_reader(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = ScalarLogger(tmp_path)
    log.write({"env_steps": 100, "loss": 0.5, "mean_return": None})
    log.write({"loss": 0.7})  # no env_steps: nowhere to put it
    log.write({"env_steps": 250, "loss": 0.125, "mean_return": -190.0})
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()  # before close: each record is flushed as it is written
    assert [(e.step, e.value) for e in acc.Scalars("learner/loss")] == [(100, 0.5), (250, 0.125)]
    assert [(e.step, e.value) for e in acc.Scalars("train/episode_return")] == [(250, -190.0)]
    log.close()
    log.write({"env_steps": 300, "loss": 1.0})  # a failing event file is reported once, never raised
    log.write({"env_steps": 400, "loss": 1.0})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("apexq: TensorBoard events stop here") and log.failed


def test_writing_events_does_not_import_torch(tmp_path):
    # the writer lives in the driver, which must never import torch (tests/unit/test_driver_imports.py)
    import subprocess
    import sys

    code = (
        "import sys; from cluster.tensorboard import ScalarLogger; log = ScalarLogger(sys.argv[1]); "
        "log.write({'env_steps': 1, 'loss': 0.5}); log.close(); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout[:300]
