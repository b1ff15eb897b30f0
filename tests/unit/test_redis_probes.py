"""Probes of a Redis's liveness try once: "down" comes within their own timeout.

redis-py retries a failed connection itself when a client is made from host and port (8.x: 10
retries with backoff, 3.1 s for a PING to a refused port here, and each try waits out the connect
timeout on a host that drops packets), and not when it is made from a URL; which is which has
changed between versions. So every probe says how often to try: once. The tests count the
client's connection attempts to a port that refuses them.
"""

import io
import socket

import pytest
import redis

import apexq.cluster.redis_server as rs
from apexq.cluster.config import load_config
from apexq.cluster.startup import Platform
from apexq.core.connection import check, connect


@pytest.fixture
def dead_redis(monkeypatch):
    """A loopback port that refuses connections (bound, not listening), and a count of attempts on it."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    attempts = []
    real = socket.socket.connect

    def counting(sock, address):
        if isinstance(address, tuple) and address[1] == port:
            attempts.append(address)
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", counting)
    yield f"redis://apexq:secret@127.0.0.1:{port}/0", attempts
    holder.close()


def test_check_tries_once_and_says_it_cannot_reach(dead_redis):
    url, attempts = dead_redis
    with pytest.raises(ConnectionError, match=r"^cannot reach Redis at redis://apexq:\*\*\*@127\.0\.0\.1:\d+/0: "):
        check(url)
    assert len(attempts) == 1


def test_the_drivers_liveness_ping_tries_once(dead_redis):
    url, attempts = dead_redis
    platform = Platform(load_config(None), None, url, io.StringIO(), lambda: None)
    assert platform.ping(url) is False
    assert platform.ping(url) is False  # again, with the client it keeps
    assert len(attempts) == 2


def test_the_components_clients_do_retry(dead_redis):
    """The other side of the rule: the components' clients ride out a Redis restart by retrying."""
    url, attempts = dead_redis
    with pytest.raises(redis.ConnectionError):
        connect(url, timeout=1.0).ping()
    assert len(attempts) == 6  # the first try and connect()'s 5 retries


def test_waiting_for_a_spawned_server_notices_its_exit_between_single_tries(dead_redis):
    """The server cannot bind the port (someone holds it) and exits at once; the wait says so after
    one refused PING, not after redis-py's retries (this took 15-25 s with them)."""
    url, attempts = dead_redis
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    server = rs.RedisServer(rs.find_server(), port=port)
    try:
        with pytest.raises(rs.PortInUse, match="Address already in use"):
            server.start()
    finally:
        server.stop()
    assert len(attempts) <= 2, attempts  # none if the exit is seen first; with retries: 11
