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


def test_the_passwords_reach_the_server_on_stdin_and_no_file_holds_them(tmp_path):
    """The users (with their passwords) go in on the server's stdin: neither the config file, nor its
    log, nor its data folder holds a password, before or after a restart on the same folder."""
    server = rs.RedisServer(rs.find_server(), data_dir=str(tmp_path))
    secrets_ = [server.password.encode(), server.admin_password.encode()]
    try:
        server.start()
        c = redis.Redis.from_url(server.url)
        assert c.ping() and c.set("apexq:x", "1")
        with pytest.raises(redis.exceptions.AuthenticationError):  # the default user is off
            redis.Redis(host=server.host, port=server.port).ping()
        server.kill()
        server.start()  # a restart on the same folder: same users, data replayed
        assert redis.Redis.from_url(server.url).get("apexq:x") == b"1"
        assert redis.Redis.from_url(server.admin_url).execute_command("ACL", "WHOAMI") == b"admin"
    finally:
        server.stop()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "redis.conf" for p in files) and any(p.name == "redis.log" for p in files)
    for p in files:
        data = p.read_bytes()
        assert not any(s in data for s in secrets_), f"{p.name} holds a password"
