"""A private `redis-server` for tests: its own free port and directory, started and stopped
by its pid. The machine's own Redis (6379) is never touched.

`durable=True` runs it with an append-only file in its directory, so a restart with
`keep_data=True` comes back with the data (like a Redis with persistence), and one with
`keep_data=False` comes back empty (like a fresh pod).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.needs import need
from tests.support import eventually_sync

REDIS_SERVER = shutil.which("redis-server")
_MACHINE_REDIS_PORT = 6379


def require_redis_server() -> str:
    """The redis-server binary, or skip (fail with HUB_REQUIRE_REDIS=1)."""
    need(REDIS_SERVER, "redis-server (Debian package redis-server)")
    assert REDIS_SERVER is not None
    return REDIS_SERVER


# Ports handed to servers a test starts later: below the kernel's ephemeral range
# (32768-60999 here), because a port the kernel picks for `bind(0)` may be taken as the
# source port of any outgoing connection before the server binds it (seen: a Cluster node's
# "Address already in use"). Random, so that test sessions side by side rarely meet.
_PORTS = range(20000, 32768)


def free_port() -> int:
    """A loopback port nothing listens on now, outside the ephemeral range (never 6379)."""
    for _ in range(1000):
        port = random.choice(_PORTS)
        if port == _MACHINE_REDIS_PORT:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in 20000-32767")


class RedisServer:
    def __init__(
        self,
        *,
        port: int | None = None,
        durable: bool = False,
        password: str | None = None,
        tls: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.binary = require_redis_server()
        self.port = port if port is not None else free_port()
        self.durable = durable
        self.password = password
        self.extra_args = extra_args
        self.dir = Path(tempfile.mkdtemp(prefix=f"hub-redis-{self.port}-"))
        self.tls = tls
        if tls:
            write_tls_files(self.dir / "tls")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None, "not running"
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def url(self) -> str:
        return self.url_for(password=self.password)

    def url_for(self, *, user: str | None = None, password: str | None = None, db: int = 0) -> str:
        """With TLS: `rediss://`, verifying the server against the test CA."""
        auth = f"{user or ''}:{password}@" if password else ""
        if not self.tls:
            return f"redis://{auth}127.0.0.1:{self.port}/{db}"
        ca = self.dir / "tls" / "ca.pem"
        return f"rediss://{auth}127.0.0.1:{self.port}/{db}?ssl_ca_certs={ca}"

    def start(self, *, keep_data: bool = True, timeout: float = 10.0) -> None:
        assert not self.running, "already running"
        data = self.dir / "data"
        if not keep_data:
            shutil.rmtree(data, ignore_errors=True)
        data.mkdir(exist_ok=True)
        args = [self.binary, "--bind", "127.0.0.1"]
        if self.tls:
            tls = self.dir / "tls"
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(tls / "server.pem")]
            args += ["--tls-key-file", str(tls / "server.key")]
            args += ["--tls-ca-cert-file", str(tls / "ca.pem")]
        else:
            args += ["--port", str(self.port)]
        args += ["--dir", str(data), "--save", "", "--daemonize", "no"]
        args += ["--appendonly", "yes" if self.durable else "no", "--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        args += list(self.extra_args)
        log = (self.dir / "redis.log").open("ab")
        self._process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_ready(timeout)

    def stop(self, *, timeout: float = 10.0) -> None:
        """SIGTERM: a durable server writes its data out before it exits."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a word to its clients' sessions."""
        self._end(signal.SIGKILL, 10.0)

    def pause(self) -> None:
        """SIGSTOP: sockets stay open but nothing answers (a half-open connection)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def restart(self, *, keep_data: bool) -> None:
        self.stop()
        self.start(keep_data=keep_data)

    def cleanup(self) -> None:
        if self.running:
            self.resume()
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            self._process = None
            return
        os.kill(process.pid, signal.SIGCONT)
        os.kill(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout)
        self._process = None

    def _wait_ready(self, timeout: float) -> None:
        """Ready when it answers PING (NOAUTH counts: it is serving)."""
        def serving_or_gone() -> str | None:
            if self._process is not None and self._process.poll() is not None:
                return "gone"
            return "serving" if self._ping().startswith((b"+PONG", b"-NOAUTH")) else None

        with contextlib.suppress(AssertionError):
            if eventually_sync(serving_or_gone, within=timeout, what="redis started",
                               ignoring=(OSError,), every=0.05) == "serving":
                return
        log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
        self._end(signal.SIGKILL, 5.0)
        pytest.fail(f"redis-server on port {self.port} did not start:\n{log}")

    def _ping(self) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
            if not self.tls:
                raw.sendall(b"PING\r\n")
                return raw.recv(64)
            context = ssl.create_default_context(cafile=self.dir / "tls" / "ca.pem")
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64)


def write_tls_files(directory: Path) -> None:
    """A throwaway CA (ca.pem) and a server certificate for 127.0.0.1 signed by it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name | None,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            address = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
            builder = builder.add_extension(x509.SubjectAlternativeName([address]), False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_cert = certificate("hub test CA", ca_key, None, ca_key, ca=True)
    server_cert = certificate("127.0.0.1", server_key, ca_cert.subject, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (directory / "server.pem").write_bytes(server_cert.public_bytes(pem))
    (directory / "server.key").write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
