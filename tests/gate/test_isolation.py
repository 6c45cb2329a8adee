"""A site can reach the gate's socket and nothing else the gate guards."""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterator
from typing import Any

import pytest

from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment, message, proc_status
from tests.support.postgres import cluster_for_gate_user
from tests.support.upstream import SmtpUpstream, free_port

pytestmark = needs_users

# What a hostile site tries by hand; each attempt reports "ok" or how it failed.
PROBE = """
import json, os, socket, sqlite3
results = {}
def attempt(name, action):
    try:
        action()
        results[name] = "ok"
    except Exception as exc:
        results[name] = type(exc).__name__
def connect():
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(%(socket)r)
def sqlite_write():
    db = sqlite3.connect("file:%(ledger)s?mode=rw", uri=True)
    db.execute("DELETE FROM sends")
    db.commit()
def read_queue():
    sqlite3.connect("file:%(ledger)s?mode=ro", uri=True).execute("SELECT data FROM queue_messages").fetchall()
attempt("read ledger", lambda: open(%(ledger)r, "rb").read(1))
attempt("read the queue", read_queue)
attempt("open ledger for writing", lambda: open(%(ledger)r, "r+b"))
attempt("reset limits with sqlite", sqlite_write)
attempt("list the state directory", lambda: os.listdir(%(state)r))
attempt("read the relay password", lambda: open(%(password)r).read())
attempt("read the decision log", lambda: open(%(log)r).read())
attempt("remove the socket", lambda: os.unlink(%(socket)r))
attempt("put a socket of its own there", lambda: os.rename(%(config)r, %(socket)r + ".x"))
attempt("connect to the gate", connect)
print(json.dumps(results))
"""


def _probe(deployment: Deployment) -> dict[str, str]:
    code = PROBE % {"socket": str(deployment.socket_path), "ledger": str(deployment.ledger_path),
                    "state": str(deployment.state), "password": str(deployment.password_path),
                    "log": str(deployment.log_path), "config": str(deployment.config_path)}
    result = deployment.run_as(deployment.users.a, code)
    assert result.code == 0, result.stderr
    found: dict[str, str] = json.loads(result.stdout)
    return found


def test_site_reaches_the_socket_and_nothing_the_gate_guards(gate: Deployment) -> None:
    assert gate.sendmail("-t", "-i", input=message()).code == 0  # the ledger and log now hold data
    results = _probe(gate)
    assert results.pop("connect to the gate") == "ok"
    assert all(outcome != "ok" for outcome in results.values()), results
    assert results["read ledger"] == results["read the relay password"] == "PermissionError"


def test_queued_message_is_kept_where_sites_cannot_read_it(deployment: Deployment) -> None:
    deployment.configure("upstream", port=free_port())  # nothing listens: a temporary failure
    deployment.start_gate()
    result = deployment.sendmail("-t", "-i", input=message(subject="kept for later"))
    assert (result.code, result.line) == (0, "")  # durably queued
    listed = deployment.admin("queue", "list", "--json")
    assert listed.code == 0 and b"post@a.example" in listed.stdout
    results = _probe(deployment)
    assert results["read the queue"] != "ok" and results["read ledger"] == "PermissionError"


def test_files_have_the_owners_and_modes_of_a_shared_server(gate: Deployment) -> None:
    gate_uid = gate.users.gate.uid
    sock, directory = os.stat(gate.socket_path), os.stat(gate.run_dir)
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o666
    assert directory.st_uid == 0 and stat.S_IMODE(directory.st_mode) == 0o755
    for path, mode in ((gate.ledger_path, 0o600), (gate.password_path, 0o600), (gate.state, 0o700)):
        info = os.stat(path)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (gate_uid, mode), path
    assert os.stat(gate.log_path).st_uid == gate_uid


def test_gate_process_runs_as_its_own_user_with_no_other_groups(gate: Deployment) -> None:
    assert gate.gate is not None
    fields = proc_status(gate.gate.pid)
    assert fields["Uid"].split() == [str(gate.users.gate.uid)] * 4
    assert fields["Groups"].split() == []


@pytest.mark.parametrize("target", ["ledger", "password"])
def test_gate_will_not_start_when_a_guarded_file_is_open_to_others(deployment: Deployment, target: str) -> None:
    path = deployment.ledger_path if target == "ledger" else deployment.password_path
    os.chmod(path, 0o644)
    with pytest.raises(RuntimeError, match="exited with 78"):
        deployment.start_gate()
    errors = deployment.gate_errors()
    assert errors.count("\n") == 1 and errors.startswith("sendmail-shim: ")
    assert str(path) in errors and f"chmod 600 {path}" in errors


# ------------------------------------------------------------------ PostgreSQL


@pytest.fixture(scope="module")
def locked_postgres() -> Iterator[dict[str, Any]]:
    """A cluster that asks every local connection for a password, as a shared server's must."""
    with cluster_for_gate_user() as cluster:
        gate_password, admin_password = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
        with cluster.connect() as connection:
            connection.execute(f"CREATE ROLE shimgate LOGIN PASSWORD '{gate_password}'")
            connection.execute("CREATE DATABASE shimgate OWNER shimgate")
            connection.execute(f"ALTER ROLE postgres PASSWORD '{admin_password}'")
            with open(os.path.join(cluster.data, "pg_hba.conf"), "w") as hba:
                hba.write("local all all scram-sha-256\n")
            connection.execute("SELECT pg_reload_conf()")
        url = (f"postgresql+psycopg://shimgate:{gate_password}@/shimgate"
               f"?host={cluster.socket_dir}&port={cluster.port}")
        yield {"url": url, "socket_dir": cluster.socket_dir, "port": cluster.port,
               "password": gate_password}


@pytest.fixture
def pg_deployment(deployment: Deployment, locked_postgres: dict[str, Any]) -> Deployment:
    """The ledger in PostgreSQL; its password only in the gate's private config."""
    private = dict(deployment.sections, ledger={"url": locked_postgres["url"]})
    gate_config = deployment.write_config(deployment.etc / "gate.toml", private, mode=0o600)
    deployment.give_to_gate(gate_config)
    deployment.config_path = gate_config  # the gate and the admin CLI read the private file
    deployment.set_up_ledger()
    return deployment


CONNECT_AS = """
import psycopg
try:
    psycopg.connect(host=%(host)r, port=%(port)d, user=%(user)r, dbname="shimgate",
                    password=%(password)r, connect_timeout=5).close()
    print("connected")
except psycopg.OperationalError as exc:
    print("refused:", str(exc).splitlines()[-1])
"""


def test_site_cannot_use_the_gates_postgresql_credentials(pg_deployment: Deployment,
                                                          locked_postgres: dict[str, Any],
                                                          relay: SmtpUpstream) -> None:
    dep = pg_deployment
    dep.start_gate()
    public = dep.etc / "config.toml"
    sent = dep.sendmail("-t", "-i", input=message(), env=dep.client_env(SENDMAIL_SHIM_CONFIG=str(public)))
    assert (sent.code, sent.line) == (0, "") and len(relay.received) == 1
    usage = dep.admin("usage", "--account", "post@a.example", "--json")
    assert usage.code == 0 and '"used": 1' in usage.stdout.decode()  # the gate charged PostgreSQL

    assert locked_postgres["password"] not in public.read_text()
    read = dep.run_as(dep.users.a, f"open({str(dep.config_path)!r}).read()")
    assert read.code != 0 and "PermissionError" in read.stderr
    for user, password in (("shimgate", None), ("shimgate", "guess"), ("postgres", None)):
        attempt = dep.run_as(dep.users.a, CONNECT_AS % {
            "host": locked_postgres["socket_dir"], "port": locked_postgres["port"], "user": user,
            "password": password})
        assert attempt.code == 0 and attempt.stdout.startswith(b"refused:"), (user, attempt)
    # the same attempt with the real password works: the refusals above are the password's doing
    allowed = dep.run_as(dep.users.a, CONNECT_AS % {
        "host": locked_postgres["socket_dir"], "port": locked_postgres["port"], "user": "shimgate",
        "password": locked_postgres["password"]})
    assert allowed.stdout.strip() == b"connected"


def test_gate_will_not_start_when_its_database_password_is_world_readable(pg_deployment: Deployment) -> None:
    os.chmod(pg_deployment.config_path, 0o644)
    with pytest.raises(RuntimeError, match="exited with 78"):
        pg_deployment.start_gate()
    errors = pg_deployment.gate_errors()
    assert "holds the ledger password" in errors and f"chmod 640 {pg_deployment.config_path}" in errors
