import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Every Ray process a test starts binds loopback only; no usage reporting.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


@pytest.fixture
def redis_server():
    """A real private Redis-protocol server (redis-server, valkey-server or the pip-shipped Valkey)."""
    from apexq.cluster.redis_server import RedisServer, find_server

    server = RedisServer(find_server()).start()
    yield server
    server.stop()
