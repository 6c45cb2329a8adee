"""One table decides every exit code: sendmail, -bs, the gate and the admin CLI agree."""

from __future__ import annotations

import importlib
import pkgutil

import click
import pytest
from click.testing import CliRunner

import sendmail_shim
from sendmail_shim import exitcodes
from sendmail_shim.cli import cli, describe_failure

# What each family means to a user, as the product contract and the admin guide say.
EXPECTED = {
    "invocation.UsageError": 64,
    "message.MalformedMessage": 65,
    "encoding.CannotEncode": 65,
    "message.EmptyMessage": 66,
    "envelope.MissingSender": 65,
    "envelope.InvalidSender": 67,
    "envelope.NoRecipients": 67,
    "envelope.TooManyRecipients": 77,
    "accounts.UnknownAccount": 67,
    "accounts.AccountBlocked": 77,
    "accounts.UnboundCaller": 77,
    "spf.SpfNotAuthorised": 77,
    "spf.SpfUnavailable": 69,
    "ledger.errors.LimitReached": 69,
    "ledger.errors.LimitNeverFits": 77,
    "ledger.errors.LedgerUnavailable": 69,
    "ledger.errors.LedgerNotInitialised": 78,
    "ledger.errors.UnsupportedLedger": 78,
    "ledger.errors.InvalidInput": 65,
    "ledger.errors.Conflict": 65,
    "ledger.errors.UnknownSubject": 67,
    "relay.UpstreamRefused": 69,
    "relay.UpstreamInsecure": 69,
    "queue.UnknownQueueEntry": 67,
    "config.ConfigError": 78,
    "gate.errors.ExposedSecret": 78,
    "gate.errors.LedgerNotReady": 78,
    "gate.errors.SocketInUse": 69,
    "gate_protocol.PeerTooSlow": 69,
    "gate_protocol.BadFrame": 76,
    "gate_client.GateUnreachable": 69,
}


def all_modules() -> list[str]:
    names = ["sendmail_shim"]
    for info in pkgutil.walk_packages(sendmail_shim.__path__, "sendmail_shim."):
        names.append(info.name)
    return names


def error_classes() -> list[type[BaseException]]:
    found = []
    for name in all_modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, BaseException)
                    and value.__module__ == name and not value.__name__.startswith("_")):
                found.append(value)
    return found


def resolve(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def bare(kind: type[BaseException]) -> BaseException:
    """An instance without running the class's own constructor (most need context)."""
    return kind.__new__(kind)


@pytest.mark.parametrize("path", [name for name, _ in exitcodes.EXIT_CODES])
def test_every_name_in_the_table_is_a_real_error_class(path: str) -> None:
    kind = resolve(path)
    assert isinstance(kind, type) and issubclass(kind, BaseException)


@pytest.mark.parametrize(("path", "code"), sorted(EXPECTED.items()))
def test_each_error_gets_the_code_its_family_means(path: str, code: int) -> None:
    assert exitcodes.exit_code_for(bare(resolve("sendmail_shim." + path))) == code


def test_no_error_class_carries_a_code_of_its_own() -> None:
    classes = error_classes()
    assert len(classes) > 40
    carrying = [f"{k.__module__}.{k.__qualname__}" for k in classes
                if {"exit_code", "smtp_reply"} & set(vars(k))]
    assert carrying == []


def test_every_public_error_of_the_program_has_a_code_other_than_internal() -> None:
    unmapped = [f"{k.__module__}.{k.__qualname__}" for k in error_classes()
                if exitcodes.exit_code_for(bare(k)) == exitcodes.EX_SOFTWARE]
    # Address and DNS errors never leave their stages: they become the stage's own refusal.
    assert unmapped == ["sendmail_shim.addresses.AddressError", "sendmail_shim.dnsclient.DnsError",
                        "sendmail_shim.dnsclient.DnsTemporaryError"]


def test_unknown_errors_are_internal_and_75_is_never_used() -> None:
    assert exitcodes.exit_code_for(RuntimeError("bug")) == 70
    assert 75 not in {code for _, code in exitcodes.EXIT_CODES}


def test_the_admin_cli_takes_its_codes_from_the_same_table(tmp_path: object) -> None:
    from sendmail_shim.ledger import Conflict, InvalidInput, UnknownSubject

    for error, code in ((InvalidInput("x"), 65), (Conflict("x"), 65), (UnknownSubject("x"), 67)):
        assert exitcodes.exit_code_for(error) == code
        assert describe_failure(error) == "x"
    result = CliRunner().invoke(cli, ["frobnicate"])
    assert result.exit_code == exitcodes.exit_code_for(click.UsageError("x")) == 64
    assert describe_failure(RuntimeError("boom")) == "internal error (RuntimeError: boom); please report it"


def test_smtp_replies_follow_the_code_except_permanent_upstream_refusals() -> None:
    from sendmail_shim.ledger import InvalidInput
    from sendmail_shim.relay import UpstreamRefused

    assert exitcodes.smtp_reply_for(UpstreamRefused("550 no"), 69) == (554, "5.0.0")
    assert exitcodes.smtp_reply_for(InvalidInput("x"), 65) == (554, "5.6.0")
