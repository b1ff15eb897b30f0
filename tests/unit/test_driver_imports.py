"""The driver of a distributed run never imports torch (a ~3 s import that delayed every component)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

DRIVER_IMPORTS = """
import sys
import apexq.cluster.cli, apexq.cluster.launch
from apexq.cluster.services.actor import ActorService
from apexq.cluster.services.learner import LearnerService
from apexq.cluster.services.shard import ShardService
from apexq.cluster.evaluate import evaluate
from apexq.core import weights_store
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def test_driver_modules_do_not_import_torch():
    out = subprocess.run([sys.executable, "-c", DRIVER_IMPORTS], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:300]


def test_learner_service_forwards_every_method_the_driver_calls():
    # Ray exposes only methods defined on the class: each call the launcher makes must exist on the shell
    from apexq.cluster.services.learner import LearnerService

    driver = "".join(
        (ROOT / "cluster" / f).read_text() for f in ("launch.py", "ray_components.py", "shutdown.py", "supervision.py")
    )
    called = set(re.findall(r"learner\.handle\.([a-z_]+)\.remote", driver)) | {
        "run",
        "stats",
        "serve_metrics",
        "node_id",
    }
    assert called <= set(dir(LearnerService)), called - set(dir(LearnerService))
