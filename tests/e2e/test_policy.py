"""Accounts and exact rate limits, seen from `sendmail` processes and PHP, on SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from sendmail_shim.ledger import Ledger
from tests.support.postgres import PostgresCluster
from tests.support.shim import SENDMAIL, Shim
from tests.support.upstream import SmtpUpstream

MESSAGE = b"From: post@kunde.example\nTo: ola@x.example\nSubject: s\n\nhei\n"


def burst(shims: list[Shim], count: int, message: bytes = MESSAGE, args: tuple[str, ...] = ("-t", "-i")) -> list[
        tuple[int, str]]:
    """Start `count` sendmail processes at once (spread over the given installations)."""
    procs = [subprocess.Popen([SENDMAIL, *args], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=shims[i % len(shims)].env) for i in range(count)]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(message)
        proc.stdin.close()
    results = []
    for proc in procs:
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode()
        results.append((proc.wait(120), stderr))
    return results


def test_hundred_processes_at_once_get_exactly_25_on_sqlite(shim: Shim, upstream: SmtpUpstream):
    results = burst([shim], 100)
    codes = [code for code, _ in results]
    assert codes.count(0) == 25 and codes.count(69) == 75, codes
    assert len(upstream.wait_for(25)) == 25
    refused = [err for code, err in results if code == 69]
    assert all("post@kunde.example reached 25 messages per 5 minutes (25 used); next message possible at" in e
               for e in refused)
    assert "database is locked" not in "".join(refused)
    usage = {(u.rule.metric, u.rule.window_seconds): u.used for u in shim.ledger.usage("account", "post@kunde.example")}
    assert usage[("messages", 300)] == 25


def test_customer_limit_holds_across_accounts(ca_file: Path, tmp_path: Path, upstream: SmtpUpstream):
    accounts = tuple(f"web{n}@kunde.example" for n in range(4))
    shim = Shim(tmp_path, upstream.port, ca_file, accounts=accounts)
    shim.configure("limits", customer=["10 messages / 1h"])
    messages = [f"From: {a}\nTo: ola@x.example\n\nhei\n".encode() for a in accounts]
    procs = []
    for n in range(40):
        procs.append(subprocess.Popen([SENDMAIL, "-t", "-i"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=shim.env))
        procs[-1].stdin.write(messages[n % 4])  # type: ignore[union-attr]
        procs[-1].stdin.close()  # type: ignore[union-attr]
    codes = [p.wait(120) for p in procs]
    assert codes.count(0) == 10, codes
    assert len(upstream.wait_for(10)) == 10
    errors = [p.stderr.read().decode() for p in procs if p.returncode == 69]  # type: ignore[union-attr]
    assert all("customer kunde (all its accounts together) reached 10 messages per hour" in e for e in errors)


@pytest.fixture
def pg_shims(postgres_cluster: PostgresCluster, tmp_path: Path, upstream: SmtpUpstream, ca_file: Path) -> list[Shim]:
    """Two "servers": separate directories and configs sharing one PostgreSQL ledger."""
    url = postgres_cluster.create_database()
    shims = []
    for name in ("web1", "web2"):
        directory = tmp_path / name
        directory.mkdir()
        shim = Shim(directory, upstream.port, ca_file, accounts=())
        shim.configure("ledger", url=url)
        shims.append(shim)
    ledger = Ledger(url)
    ledger.upgrade()
    ledger.add_customer("kunde")
    ledger.add_account("post@kunde.example", "kunde", authenticated=True)
    return shims


def test_two_servers_sharing_postgresql_get_exactly_25(pg_shims: list[Shim], upstream: SmtpUpstream):
    results = burst(pg_shims, 60)
    codes = [code for code, _ in results]
    assert codes.count(0) == 25 and codes.count(69) == 35, codes
    assert len(upstream.wait_for(25)) == 25
    assert all("reached 25 messages per 5 minutes" in err for code, err in results if code == 69)


def test_postgresql_down_fails_closed(pg_shims: list[Shim], upstream: SmtpUpstream, free_port_url):
    shim = pg_shims[0]
    shim.configure("ledger", url=free_port_url, busy_timeout=2)
    result = shim.sendmail("-t", "-i", input=MESSAGE)
    assert result.code == 69 and "ledger" in result.line
    assert upstream.received == []


@pytest.fixture
def free_port_url(tmp_path: Path) -> str:
    from tests.support.upstream import free_port

    return f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/nothing"


@pytest.mark.parametrize(("setup", "code", "needle"), [
    (lambda led: None, 67, "is not a registered sending account"),
    (lambda led: led.add_account("stranger@kunde.example", "kunde"), 77, "authenticat"),
    (lambda led: (led.add_account("stranger@kunde.example", "kunde", authenticated=True),
                  led.block("stranger@kunde.example", "spam run")), 77, "blocked"),
])
def test_account_refusals_send_and_count_nothing(shim: Shim, upstream: SmtpUpstream, setup, code, needle):
    setup(shim.ledger)
    result = shim.sendmail("-t", "-i", input=MESSAGE.replace(b"post@", b"stranger@"))
    assert result.code == code and needle in result.line, result.line
    assert upstream.received == []
    assert all(u.used == 0 for u in shim.ledger.usage("customer", "kunde"))


def test_bound_caller_cannot_use_another_customers_account_or_domain(shim: Shim, upstream: SmtpUpstream):
    import getpass

    shim.ledger.bind_user("kunde", getpass.getuser())
    shim.ledger.add_customer("annen")
    shim.ledger.add_account("post@annen.example", "annen", authenticated=True)
    other_account = shim.sendmail("-t", "-i", input=MESSAGE.replace(b"post@kunde", b"post@annen"))
    assert other_account.code == 77, other_account.line
    forged_from = shim.sendmail("-f", "post@kunde.example", "-t", "-i",
                                input=MESSAGE.replace(b"From: post@kunde", b"From: ceo@annen"))
    assert forged_from.code == 77 and "annen.example" in forged_from.line
    assert upstream.received == []
    assert shim.sendmail("-t", "-i", input=MESSAGE).code == 0  # its own account still works


def test_unwritable_ledger_is_a_clear_refusal(upstream: SmtpUpstream, ca_file: Path):
    # An unprivileged user who can read the config but not write the ledger (pytest's own
    # temporary directories are private to root, so this one is made readable on purpose).
    directory = Path(tempfile.mkdtemp(prefix="shim-ro-"))
    try:
        directory.chmod(0o755)
        shutil.copy(ca_file, directory / "ca.pem")
        shim = Shim(directory, upstream.port, directory / "ca.pem")
        for path in directory.iterdir():
            path.chmod(0o644)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SENDMAIL, "-t", "-i"],
                              input=MESSAGE, capture_output=True, env=shim.env, timeout=60)
        stderr = proc.stderr.decode()
        assert proc.returncode == 69 and "ledger" in stderr and "Traceback" not in stderr, stderr
        assert upstream.received == []
    finally:
        shutil.rmtree(directory)


def test_message_that_can_never_fit_is_77(shim: Shim, upstream: SmtpUpstream):
    to = ",\n ".join(f"r{i}@x.example" for i in range(251)).encode()
    result = shim.sendmail("-t", "-i", input=b"From: post@kunde.example\nTo: " + to + b"\n\nx\n")
    assert result.code == 77 and "250 recipients" in result.line
    assert upstream.received == []


def test_php_mail_is_false_at_the_limit_and_true_after_the_window(shim: Shim, upstream: SmtpUpstream):
    shim.configure("limits", account=["2 messages / 3s"])
    code = 'var_dump(mail("ola@x.example", "s", "b", "From: post@kunde.example"));'
    outcomes = [shim.php(code).stdout.strip().splitlines()[-1] for _ in range(3)]
    assert outcomes == ["bool(true)", "bool(true)", "bool(false)"]
    time.sleep(3.2)
    assert shim.php(code).stdout.strip().splitlines()[-1] == "bool(true)"
    assert len(upstream.received) == 3
