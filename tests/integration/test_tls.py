"""rediss:// URLs: actors, a shard and a standalone-shard client talk to Redis through TLS.

The pip-shipped Valkey is built without TLS, so the test puts a TLS terminator in front of it (as
stunnel or a managed Redis's TLS endpoint does) with a certificate made for the test; the clients
are the real ones, configured only by their URL.
"""

import datetime
import ipaddress
import select
import socket
import ssl
import threading
import time

import numpy as np
import pytest
from default_components import shard_spec
from needs import require_module

from apexq.core.connection import check, connect
from apexq.replay_server.client import StreamWriter
from apexq.replay_server.codec import Block
from apexq.replay_server.shard import ReplayShard

x509 = require_module("cryptography.x509")  # in the test extra: CI fails without it instead of skipping


def self_signed(tmp_path):
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


class TlsTerminator:
    """Accepts TLS on a loopback port and forwards the plain bytes to the Redis port."""

    def __init__(self, cert, key, upstream_port):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.upstream = upstream_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._pump, args=(raw,), daemon=True).start()

    def _pump(self, raw):
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):  # e.g. a client that does not trust the certificate
            raw.close()
            return
        up = socket.create_connection(("127.0.0.1", self.upstream))
        try:
            while not self.stop.is_set():
                readable = [tls] if tls.pending() else select.select([tls, up], [], [], 0.5)[0]
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    (up if s is tls else tls).sendall(data)
        except (ssl.SSLError, OSError):
            pass
        finally:
            tls.close()
            up.close()

    def close(self):
        self.stop.set()
        self.sock.close()


def test_rediss_urls_carry_the_whole_replay_path(redis_server, tmp_path):
    cert, key = self_signed(tmp_path)
    proxy = TlsTerminator(cert, key, redis_server.port)
    try:
        url = f"rediss://apexq:{redis_server.password}@127.0.0.1:{proxy.port}/0?ssl_ca_certs={cert}"
        check(url)
        assert connect(url).connection_pool.connection_class.__name__ == "SSLConnection"
        shard = ReplayShard(
            shard_spec(capacity=1000, min_size_to_sample=10, samples_per_insert=1.0, error_buffer=1e9),
            url,
            "tls",
            seed=0,
        )
        shard.start()
        try:
            w = StreamWriter(url, "tls", 0, actor_id=0, maxlen=100, max_backlog=50)
            obs = np.arange(200, dtype=np.float32).reshape(100, 2)
            w.append(
                Block(
                    obs=obs,
                    action=np.zeros(100, np.int32),
                    ret=np.ones(100, np.float32),
                    discount=np.zeros(100, np.float32),
                    next_obs=obs,
                    priority=np.ones(100, np.float32),
                )
            )
            deadline = time.monotonic() + 30
            while shard.stats()["inserted"] < 100 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert shard.stats()["inserted"] == 100, shard.stats()  # all of it came through TLS
            s = shard.sample(32)
            assert s is not None and s.size == 100
            assert set(map(tuple, s.obs.tolist())) <= set(map(tuple, obs.tolist()))
        finally:
            shard.stop()
        # a client that does not trust the server's certificate gets one clear line, not a hang
        untrusted = f"rediss://apexq:{redis_server.password}@127.0.0.1:{proxy.port}/0"
        with pytest.raises(ConnectionError, match=r"cannot reach Redis at rediss://apexq:\*\*\*@127.0.0.1.*certif"):
            check(untrusted)
    finally:
        proxy.close()
