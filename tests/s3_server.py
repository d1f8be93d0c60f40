"""A real S3-compatible server for the tests: moto's standalone server on a free loopback port.

`s3_server` (session) starts it once and sets the AWS SDKs' usual variables in this process
(`AWS_ENDPOINT_URL`, test credentials, region), so s3fs, boto3 and every `vbatch` subprocess
started with `os.environ` reach it the way a user's job reaches real S3. `s3_bucket` gives each
test a fresh bucket: `S3Bucket.uri("in/")` -> `s3://<bucket>/in/`, `.client` is boto3's.
"""
from __future__ import annotations

import itertools
import os
import socket
from dataclasses import dataclass
from typing import Any

import pytest

_bucket_numbers = itertools.count()


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class S3Server:
    """The running server: its endpoint and the environment that points the SDKs at it."""

    endpoint_url: str
    env: dict[str, str]

    def client(self) -> Any:
        """A boto3 S3 client of this server."""
        import boto3  # noqa: PLC0415 (test dependency, only for the S3 tests)
        return boto3.client("s3", endpoint_url=self.endpoint_url)


@dataclass
class S3Bucket:
    """One test's bucket on the server."""

    name: str
    server: S3Server
    client: Any

    def uri(self, key: str = "") -> str:
        """`s3://<bucket>/<key>`."""
        return f"s3://{self.name}/{key}"

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix`, sorted."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name,
                                                                       Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def put(self, key: str, body: bytes) -> None:
        """Upload `body` as `key`."""
        self.client.put_object(Bucket=self.name, Key=key, Body=body)

    def get(self, key: str) -> bytes:
        """The bytes of `key`."""
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def upload_dir(self, local_dir, prefix: str) -> None:
        """Upload every file under `local_dir` to `prefix/<relative path>`."""
        from pathlib import Path  # noqa: PLC0415
        root = Path(local_dir)
        for path in sorted(root.rglob("*")):
            if path.is_file():
                self.put(f"{prefix.rstrip('/')}/{path.relative_to(root).as_posix()}",
                         path.read_bytes())


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's server on a free 127.0.0.1 port for the session (see module docstring)."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415
    port = free_loopback_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield S3Server(env["AWS_ENDPOINT_URL"], env)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> S3Bucket:
    """A fresh, empty bucket for one test."""
    name = f"vbatch-test-{os.getpid()}-{next(_bucket_numbers)}"
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    return S3Bucket(name, s3_server, client)
