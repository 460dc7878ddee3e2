"""A cluster on one machine, for tests of the path raysal's users take: an S3-compatible server on 127.0.0.1 (moto's
server mode, behind a proxy that can cut it off), a multi-node Ray (a head with ``TRAIN_DRIVER`` and 0 CPUs, worker
nodes with CPUs: `ray.cluster_utils.Cluster`), and a PostgreSQL server for Optuna studies. Each is started and
stopped by the test that uses it; only loopback addresses; every wait is bounded."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

HOST = "127.0.0.1"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout:.0f} s")


class _Proxy:
    """A TCP proxy in front of the S3 server: `cut` refuses and drops connections (an outage) while the server keeps
    its objects (moto's are in memory: stopping it would lose them)."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.open()

    def open(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((HOST, self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:  # closed by `cut`
                return
            try:
                upstream = socket.create_connection((HOST, self.target), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # a pooled keep-alive connection may idle for minutes: never time it out
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:  # one direction ended: end the connection and free both descriptors (a long session opens many)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._conns = [c for c in self._conns if c is not src and c is not dst]

    def cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.cut()


class S3Server:
    """moto's S3 server on loopback with one bucket; `uri(prefix)` is a storage location raysal and Ray read."""

    def __init__(self, bucket: str = "raysal-test") -> None:
        # this interpreter's own server first: a moto_server elsewhere on PATH (another Python's) may not speak to
        # this pyarrow (seen: a system moto 5.2.1 failed every CompleteMultipartUpload)
        here = Path(sys.executable).with_name("moto_server")
        exe = str(here) if here.exists() else shutil.which("moto_server") or "moto_server"
        self.port = free_port()
        self.bucket = bucket
        self._proc = subprocess.Popen([exe, "-H", HOST, "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)  # fmt: skip
        wait_port(self.port)
        self.proxy = _Proxy(self.port)
        import pyarrow.fs

        fs = pyarrow.fs.S3FileSystem(endpoint_override=f"{HOST}:{self.port}", scheme="http",
                                     allow_bucket_creation=True, **_keys())  # fmt: skip
        fs.create_dir(bucket)

    def uri(self, prefix: str = "") -> str:
        """``s3://bucket/prefix?endpoint_override=…&scheme=http`` (through the proxy)."""
        path = f"{self.bucket}/{prefix}".rstrip("/")
        return f"s3://{path}?endpoint_override={HOST}:{self.proxy.port}&scheme=http"

    def new_prefix(self) -> str:
        return self.uri(uuid.uuid4().hex[:8])

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Storage unreachable inside the block (connections refused and dropped)."""
        self.proxy.cut()
        try:
            yield
        finally:
            self.proxy.open()

    def stop(self) -> None:
        self.proxy.close()
        self._proc.terminate()
        try:
            self._proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def _keys() -> dict[str, str]:
    return {"access_key": KEYS["AWS_ACCESS_KEY_ID"], "secret_key": KEYS["AWS_SECRET_ACCESS_KEY"],
            "region": KEYS["AWS_DEFAULT_REGION"]}  # fmt: skip


class RayCluster:
    """A multi-node Ray on this machine: the head has the trial-driver resource and no CPUs (as in cluster.yaml),
    each worker node its own CPUs. Nodes inherit this process's environment (S3 keys, test settings)."""

    def __init__(self, workers: int = 2, cpus: int = 2) -> None:  # workers=0: a cluster scaled to zero
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True,
            # the nodes take this machine's own address, as a local `ray.init` does: Ray's drivers resolve
            # 127.0.0.1 to it, so nodes bound to loopback would be unreachable for them
            head_node_args={"num_cpus": 0, "resources": {"TRAIN_DRIVER": 8}, "include_dashboard": False},
        )
        self.workers = [self.cluster.add_node(num_cpus=cpus) for _ in range(workers)]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def node_of_pid(self, pid: int) -> object | None:
        """The worker node whose raylet is an ancestor of ``pid``."""
        ancestors, p = set(), pid
        for _ in range(64):
            try:
                p = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                break
            ancestors.add(p)
            if p <= 1:
                break
        for node in self.workers:
            raylet = node.all_processes.get("raylet")
            if raylet and raylet[0].process.pid in ancestors:
                return node
        return None

    def remove(self, node: object) -> None:
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def add_worker(self, cpus: int = 2) -> object:
        """A worker node joins (an autoscaler launched it, or a preempted node came back)."""
        node = self.cluster.add_node(num_cpus=cpus)
        self.workers.append(node)
        self.cluster.wait_for_nodes()
        return node

    def announce_node_types(self, types: dict[str, tuple[dict[str, float], int]]) -> None:
        """Tell Ray what the cluster can grow to, as Ray's autoscaler does (its ClusterConfig in the GCS):
        ``{"gpu-worker": ({"CPU": 8, "GPU": 1}, max_count)}``."""
        import ray._raylet
        from ray.core.generated import autoscaler_pb2

        config = autoscaler_pb2.ClusterConfig()
        for name, (resources, max_count) in types.items():
            group = config.node_group_configs.add(name=name, max_count=max_count)
            for key, value in resources.items():
                group.resources[key] = int(value)
        gcs = ray._raylet.GcsClient(address=self.cluster.gcs_address)
        gcs.internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), config.SerializeToString(), True,
                            ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())  # fmt: skip

    def shutdown(self) -> None:
        self.cluster.shutdown()


class Postgres:
    """A PostgreSQL server in a temporary folder on a free loopback port (Debian's package: .ci/run installs it);
    `url` is a SQLAlchemy URL for a fresh database."""

    def __init__(self) -> None:
        import tempfile

        bindir = _pg_bindir()
        # not under pytest's tmp_path: the server runs as the `postgres` user, who cannot enter root's 0700 folders
        root = Path(tempfile.mkdtemp(prefix="raysal-pg-"))
        root.chmod(0o755)
        self.root, self.port = root, free_port()
        self.bindir = bindir
        data = root / "data"
        user = _pg_user()
        run = _as(user)
        root.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(root, user)
        subprocess.run([*run, str(bindir / "initdb"), "-D", str(data), "-U", "raysal", "--auth=trust"], check=True,
                       capture_output=True)  # fmt: skip
        self._log = root / "server.log"
        subprocess.run([*run, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(self._log), "-w", "-t", "60", "-o",
                        f"-h {HOST} -p {self.port} -k {root}", "start"], check=True, capture_output=True)  # fmt: skip
        self._run, self._data = run, data
        self.database = f"optuna_{uuid.uuid4().hex[:6]}"
        subprocess.run([str(bindir / "createdb"), "-h", HOST, "-p", str(self.port), "-U", "raysal", self.database],
                       check=True, capture_output=True)  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://raysal:secret@{HOST}:{self.port}/{self.database}"

    def stop(self) -> None:
        subprocess.run([*self._run, str(self.bindir / "pg_ctl"), "-D", str(self._data), "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


def _pg_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise FileNotFoundError("no PostgreSQL server binaries (apt-get install postgresql; .ci/run does)")


def postgres_available() -> bool:
    try:
        _pg_bindir()
        import psycopg2  # noqa: F401
    except (FileNotFoundError, ImportError):
        return False
    return True


def _pg_user() -> str | None:
    """initdb refuses to run as root: run the server as the `postgres` user the package creates."""
    return "postgres" if os.geteuid() == 0 else None


def _as(user: str | None) -> list[str]:
    if user is None:
        return []
    runuser = shutil.which("runuser") or "runuser"
    return [runuser, "-u", user, "--"]
