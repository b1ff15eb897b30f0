"""The embedded Redis's port: chosen free, but someone may bind it before the server does."""

import socket

import pytest
import redis

import apexq.cluster.redis_server as rs


def held_port():
    """A port someone else holds (bound: the server's bind fails; not listening: nothing answers)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def test_a_chosen_port_taken_before_the_bind_is_replaced_by_another(monkeypatch):
    blocker, taken = held_port()
    real = rs.free_port
    handed = iter([taken, taken])  # the first two picks are the port someone else now holds
    monkeypatch.setattr(rs, "free_port", lambda host="127.0.0.1": next(handed, None) or real(host))
    server = rs.RedisServer(rs.find_server())
    try:
        assert server.port == taken
        server.start()
        assert server.port != taken
        assert redis.Redis.from_url(server.url).ping()
        # once it ran, its URL is out: a restart keeps the port, and fails rather than move if it is taken
        port = server.port
        server.kill()
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen(8)
        with pytest.raises(rs.PortInUse):
            server.start(timeout=5)
        squatter.close()
        assert server.port == port
        server.start()
        assert server.port == port and redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()
        blocker.close()


def test_a_port_the_caller_gave_is_never_changed():
    blocker, taken = held_port()
    server = rs.RedisServer(rs.find_server(), port=taken)
    try:
        with pytest.raises(rs.PortInUse, match="Address already in use"):
            server.start()
        assert server.port == taken
    finally:
        server.stop()
        blocker.close()
