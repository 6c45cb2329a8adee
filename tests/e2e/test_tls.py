"""STARTTLS is mandatory and verified; nothing crosses the wire in plaintext."""

from __future__ import annotations

import trustme

from sendmail_shim import queue
from tests.support.shim import Shim
from tests.support.upstream import RawServer, SmtpUpstream

MESSAGE = b"From: post@kunde.example\nTo: ola@x.example\nSubject: s\n\nsecret body\n"


def held_back(shim: Shim, result, needle: str) -> None:
    """A TLS problem holds the message in the queue (exit 0), with a loud log line for the admin."""
    assert result.code == 0 and result.stderr == ""
    (entry,) = queue.list_queue(shim.ledger)
    assert needle in (entry.last_error or "")
    (line,) = shim.log_lines()
    assert line.split()[1] == "warning" and "verdict=queued" in line and needle in line


def commands(seen: bytes) -> list[bytes]:
    return [line.split(b" ", 1)[0].strip().upper() for line in seen.splitlines() if line.strip()]


def test_upstream_without_starttls_gets_nothing(shim: Shim):
    with RawServer(ehlo=b"250-raw.test\r\n250 8BITMIME\r\n") as raw:
        shim.configure("upstream", port=raw.port)
        result = shim.sendmail("-t", "-i", input=MESSAGE)
    held_back(shim, result, "does not offer STARTTLS")
    assert commands(bytes(raw.seen)) == [b"EHLO", b"QUIT"]
    assert b"secret" not in raw.seen and b"post@kunde" not in raw.seen


def test_starttls_answered_454_sends_nothing(shim: Shim):
    with RawServer(ehlo=b"250-raw.test\r\n250 STARTTLS\r\n") as raw:
        shim.configure("upstream", port=raw.port)
        result = shim.sendmail("-t", "-i", input=MESSAGE)
    held_back(shim, result, "refused STARTTLS (454")
    assert commands(bytes(raw.seen)) == [b"EHLO", b"STARTTLS", b"QUIT"]


def test_starttls_answered_with_garbage_sends_nothing(shim: Shim):
    with RawServer(ehlo=b"250-raw.test\r\n250 STARTTLS\r\n", starttls=b"250 sure, go on in plaintext\r\n") as raw:
        shim.configure("upstream", port=raw.port)
        result = shim.sendmail("-t", "-i", input=MESSAGE)
    held_back(shim, result, "refused STARTTLS (250")
    assert b"MAIL" not in commands(bytes(raw.seen)) and b"secret" not in raw.seen


def test_untrusted_certificate_is_refused(ca: trustme.CA, shim: Shim):
    with SmtpUpstream(ca, cert_ca=trustme.CA()) as mitm:
        shim.configure("upstream", port=mitm.port)
        result = shim.sendmail("-t", "-i", input=MESSAGE)
        assert mitm.received == []
    held_back(shim, result, "certificate")


def test_certificate_for_another_name_is_refused(shim: Shim, upstream: SmtpUpstream):
    shim.configure("upstream", tls_server_name="relay.other.example")
    result = shim.sendmail("-t", "-i", input=MESSAGE)
    held_back(shim, result, "certificate")
    assert upstream.received == []


def test_system_store_does_not_trust_a_private_ca(shim: Shim, upstream: SmtpUpstream):
    shim.configure("upstream", ca_file=None)
    result = shim.sendmail("-t", "-i", input=MESSAGE)
    held_back(shim, result, "certificate")
    assert upstream.received == []


def test_with_the_queue_off_a_tls_failure_is_69(shim: Shim, upstream: SmtpUpstream):
    shim.configure("queue", enabled=False)
    shim.configure("upstream", tls_server_name="relay.other.example")
    result = shim.sendmail("-t", "-i", input=MESSAGE)
    assert result.code == 69 and "certificate" in result.line
    assert upstream.received == [] and queue.list_queue(shim.ledger) == []


def test_auth_only_after_tls_and_the_password_never_leaks(ca: trustme.CA, shim: Shim, tmp_path):
    secret = "s3cr3t-relay-pass"
    password_file = tmp_path / "relay.pass"
    password_file.write_text(secret + "\n")
    password_file.chmod(0o600)
    with SmtpUpstream(ca, credentials=("webrelay", secret)) as authed:
        shim.configure("upstream", port=authed.port, username="webrelay", password_file=str(password_file))
        result = shim.sendmail("-t", "-i", input=MESSAGE)
        assert result.code == 0, result.line
        (got,) = authed.received
        assert got.authenticated and got.tls
        assert authed.auth_attempts == [("webrelay", secret)]
    assert secret not in result.stderr and secret not in "\n".join(shim.log_lines())
    assert secret not in shim.config_path.read_text()


def test_password_file_readable_by_others_is_a_config_error(ca: trustme.CA, shim: Shim, tmp_path):
    password_file = tmp_path / "relay.pass"
    password_file.write_text("pw\n")
    password_file.chmod(0o644)
    with SmtpUpstream(ca, credentials=("webrelay", "pw")) as authed:
        shim.configure("upstream", port=authed.port, username="webrelay", password_file=str(password_file))
        result = shim.sendmail("-t", "-i", input=MESSAGE)
        assert authed.received == [] and authed.auth_attempts == []
    assert result.code == 78
    assert "upstream.password_file" in result.line and "0600" in result.line


def test_wrong_password_is_69_and_nothing_sent(ca: trustme.CA, shim: Shim, tmp_path):
    password_file = tmp_path / "relay.pass"
    wrong = "Wr0ng-relay-secret-7Qx"  # a word no path or log field holds by chance
    password_file.write_text(wrong + "\n")
    password_file.chmod(0o600)
    with SmtpUpstream(ca, credentials=("webrelay", "right")) as authed:
        shim.configure("upstream", port=authed.port, username="webrelay", password_file=str(password_file))
        result = shim.sendmail("-t", "-i", input=MESSAGE)
        assert authed.received == []
    held_back(shim, result, "credentials")
    assert wrong not in "\n".join(shim.log_lines())


def test_starttls_response_injection_is_discarded(ca: trustme.CA, shim: Shim):
    # Bytes a server (or a man in the middle) sends after "220" in plaintext must not be read
    # as replies inside TLS: had they been, the injected 550 would answer EHLO or MAIL FROM.
    import ssl

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    injected = b"550 5.7.0 injected before TLS\r\n550 5.7.0 injected again\r\n"
    with RawServer(ehlo=b"250-raw.test\r\n250 STARTTLS\r\n", tls=tls, inject=injected) as raw:
        shim.configure("upstream", port=raw.port)
        result = shim.sendmail("-t", "-i", input=MESSAGE)
    assert result.code == 0 and "queued" not in "\n".join(shim.log_lines()), result.line
    assert commands(bytes(raw.seen_in_tls))[:2] == [b"EHLO", b"MAIL"]  # EHLO again, inside TLS
    assert len(raw.messages) == 1 and b"secret body" in raw.messages[0]
    assert b"secret" not in raw.seen  # nothing of the message in plaintext
