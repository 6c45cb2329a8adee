"""Sender, Resent-From and Resent-Sender follow the From rule; Reply-To stays free."""

from __future__ import annotations

import pytest

from tests.support.shim import Shim
from tests.support.upstream import SmtpUpstream

IDENTITY_HEADERS = ["Sender", "Resent-From", "Resent-Sender"]


@pytest.fixture
def two_customers(shim: Shim) -> Shim:
    shim.ledger.add_customer("other")
    shim.ledger.add_account("post@other.example", "other", authenticated=True)
    shim.ledger.add_account("info@kunde2.example", "kunde", authenticated=True)  # kunde's second domain
    return shim


def _message(extra: str) -> bytes:
    return f"From: post@kunde.example\nTo: ola@x.example\n{extra}\nSubject: s\n\nhei\n".encode()


@pytest.mark.parametrize("header", IDENTITY_HEADERS)
def test_identity_header_naming_another_customers_domain_is_77(two_customers: Shim, upstream: SmtpUpstream,
                                                                header: str) -> None:
    result = two_customers.sendmail("-t", "-i", input=_message(f"{header}: Boss <post@other.example>"))
    assert result.code == 77
    assert result.line == (f"sendmail: not sent: the {header} address's domain other.example is not one of the "
                           f"sender's domains (kunde.example, kunde2.example, web1.kunde.example); "
                           f"use an address of your own domain in {header}")
    assert upstream.received == []
    assert "verdict=refused" in two_customers.log_lines()[-1]


@pytest.mark.parametrize("header", IDENTITY_HEADERS)
def test_identity_header_naming_a_domain_nobody_owns_is_77(two_customers: Shim, upstream: SmtpUpstream,
                                                            header: str) -> None:
    result = two_customers.sendmail("-t", "-i", input=_message(f"{header}: a@kunde.example, x@bank.example"))
    assert result.code == 77 and f"the {header} address's domain bank.example" in result.line
    assert upstream.received == []


@pytest.mark.parametrize("header", IDENTITY_HEADERS)
def test_identity_header_of_the_customers_own_domains_is_sent_unchanged(two_customers: Shim,
                                                                         upstream: SmtpUpstream,
                                                                         header: str) -> None:
    value = "Web <info@kunde2.example>"
    result = two_customers.sendmail("-t", "-i", input=_message(f"{header}: {value}"))
    assert (result.code, result.line) == (0, "")
    (got,) = upstream.wait_for(1)
    assert got.headers[header.lower()] == [value]


def test_reply_to_may_name_any_domain(two_customers: Shim, upstream: SmtpUpstream) -> None:
    result = two_customers.sendmail("-t", "-i", input=_message("Reply-To: someone@other.example"))
    assert (result.code, result.line) == (0, "")
    (got,) = upstream.wait_for(1)
    assert got.headers["reply-to"] == ["someone@other.example"]
