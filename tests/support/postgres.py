"""A throwaway PostgreSQL cluster for tests.

The cluster lives in its own temporary directory and listens only on a UNIX
socket in that directory, on a port of its own, so it never meets another
server. PostgreSQL refuses to run as root: when the tests run as root the
server runs as the ``postgres`` system user (created if missing).

Use from a conftest::

    from tests.support.postgres import postgres_cluster  # noqa: F401 (a fixture for the whole run)

    def test_something(postgres_cluster):
        url = postgres_cluster.create_database()

or directly: ``with PostgresCluster() as cluster: ...``. The binaries are found
on PATH, in ``$PG_BIN``, or in Debian's ``/usr/lib/postgresql/<version>/bin``.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

SERVER_USER = "postgres"
_counter = itertools.count(1)


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server programs are not installed."""


def find_bin_dir() -> str:
    if os.environ.get("PG_BIN"):
        return os.environ["PG_BIN"]
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    if candidates:
        return os.path.dirname(candidates[-1])
    raise PostgresUnavailable("initdb not found (install postgresql or set PG_BIN)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server_account() -> pwd.struct_passwd | None:
    """The user to run the server as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
            check=True, capture_output=True,
        )
        return pwd.getpwnam(SERVER_USER)


class PostgresCluster:
    """initdb + pg_ctl in a temporary directory; ``url()`` gives SQLAlchemy URLs."""

    def __init__(self, *, settings: dict[str, str] | None = None) -> None:
        self.bin_dir = find_bin_dir()
        self.account = _server_account()
        self.base = tempfile.mkdtemp(prefix="sendmail-shim-pg-")
        self.data = os.path.join(self.base, "data")
        self.socket_dir = os.path.join(self.base, "socket")
        self.log = os.path.join(self.base, "server.log")
        self.port = _free_port()
        self.superuser = "postgres"
        self.settings = {
            "listen_addresses": "''",
            "max_connections": "200",
            "shared_buffers": "32MB",
            # Durability is not under test here; speed is welcome.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **(settings or {}),
        }
        self.running = False
        os.mkdir(self.socket_dir)
        if self.account is not None:
            for path in (self.base, self.socket_dir):
                os.chown(path, self.account.pw_uid, self.account.pw_gid)
        self._run("initdb", "-D", self.data, "-U", self.superuser, "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync")
        atexit.register(self.destroy)

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        extra: dict[str, Any] = {}
        if self.account is not None:
            extra = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        result = subprocess.run(
            [os.path.join(self.bin_dir, program), *args], cwd=self.base, env=env,
            capture_output=True, text=True, timeout=120, **extra,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{program} failed ({result.returncode}): {result.stderr}{result.stdout}"
                               + self._log_tail())
        return result

    def _log_tail(self) -> str:
        try:
            with open(self.log) as handle:
                return "\nserver log:\n" + handle.read()[-3000:]
        except OSError:
            return ""

    def start(self) -> PostgresCluster:
        options = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60",
                  "-o", f"-k {self.socket_dir} -p {self.port} {options}", "start")
        self.running = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate`` is a crash as far as clients can tell)."""
        if self.running:
            self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)
            self.running = False

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    def url(self, database: str = "postgres") -> str:
        return (f"postgresql+psycopg://{self.superuser}@/{database}"
                f"?host={self.socket_dir}&port={self.port}")

    @staticmethod
    def database_of(url: str) -> str:
        """The database name in a URL made by ``url()``."""
        return url.split("@/", 1)[1].split("?", 1)[0]

    def connect(self, database: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(host=self.socket_dir, port=self.port, user=self.superuser,
                               dbname=database, autocommit=True)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        name = name or f"test_{os.getpid()}_{next(_counter)}"
        with self.connect() as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def postgres_cluster_or_fail() -> Iterator[PostgresCluster]:
    import pytest

    try:
        cluster = PostgresCluster()
    except PostgresUnavailable as exc:  # a real server is part of the suite, never skipped
        pytest.fail(f"PostgreSQL is not installed ({exc}); `make setup` installs it")
    with cluster:
        yield cluster


@contextlib.contextmanager
def cluster_for_gate_user() -> Iterator[PostgresCluster]:
    """A running cluster whose socket directory the gate's own Unix user can reach."""
    clusters = postgres_cluster_or_fail()
    cluster = next(clusters)
    try:
        os.chmod(cluster.base, 0o711)
        yield cluster
    finally:
        clusters.close()  # stops the cluster


def _fixture() -> Any:
    import pytest

    @pytest.fixture(scope="session")
    def postgres_cluster() -> Iterator[PostgresCluster]:
        """One running cluster for the whole test run."""
        yield from postgres_cluster_or_fail()

    return postgres_cluster


with contextlib.suppress(ImportError):  # the benchmark script may run without pytest
    postgres_cluster = _fixture()
