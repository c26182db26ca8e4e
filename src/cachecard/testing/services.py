"""Real services for tests of a store beyond one machine: a ``redis-server`` (from the OS packages) and moto's
S3 server, each on a free loopback port, in a temporary directory, stopped when done. Nothing is downloaded.

    with RedisServer() as redis, MotoS3() as s3:
        store = Store("s3://cards/agents", index=redis.url, storage_options=s3.options)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_missing() -> str | None:
    """Why a Redis test cannot run here (None when it can)."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server; `make test` does it)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install 'cachecard[remote]')"
    return None


class RedisServer:
    """A ``redis-server`` on a loopback port with its data (AOF, so a restart keeps the index) in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, appendfsync: str = "everysec") -> None:
        self._tmp = None if directory is not None else tempfile.mkdtemp(prefix="cc-redis-")
        self.dir = Path(directory if directory is not None else self._tmp)
        self.port = free_port()
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
             "--maxmemory-policy", "noeviction", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}); see {self.dir / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer within 30 s")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM (it writes its AOF and exits) or, with ``kill``, SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class MotoS3:
    """moto's S3 server on a loopback port with one bucket; ``options`` are the s3fs storage options."""

    def __init__(self, bucket: str = "cards") -> None:
        self.bucket = bucket
        self.port = free_port()
        self.server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing",
                "client_kwargs": {"region_name": "us-east-1"}}

    def start(self) -> MotoS3:
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        if self.server is not None:
            import gc

            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()  # drop clients bound to this endpoint first
            gc.collect()
            self.server.stop()
            self.server = None

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["MotoS3", "RedisServer", "free_port", "redis_missing"]
