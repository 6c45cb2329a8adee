"""Account and caller checks: who may send from which account, with which From domain."""

from __future__ import annotations

import os
import pwd

import pytest

from sendmail_shim.accounts import (
    AccountBlocked,
    AccountNotAuthenticated,
    Caller,
    ForeignFromDomain,
    NotCallersAccount,
    UnboundCaller,
    UnknownAccount,
    authorise,
)
from sendmail_shim.exitcodes import exit_code_for
from sendmail_shim.ledger import Conflict, InvalidInput, Ledger, UnknownSubject
from tests.ledger.common import add_account

SITE = Caller(uid=1001, user="web1", pid=4242)
OTHER_SITE = Caller(uid=1002, user="web2")


@pytest.fixture
def two_customers(ledger: Ledger) -> Ledger:
    add_account(ledger, "post@kunde.example", "kunde1", users=["web1"])
    ledger.add_account("shop@kunde-butikk.example", "kunde1", authenticated=True)
    add_account(ledger, "info@annen.example", "kunde2", users=["web2"])
    return ledger


def test_registered_authenticated_account_of_the_callers_customer_passes(two_customers: Ledger) -> None:
    account = authorise(two_customers, "post@kunde.example", "kunde.example", SITE)
    assert (account.address, account.customer_id, account.authenticated) == \
        ("post@kunde.example", "kunde1", True)


def test_from_domain_may_be_any_domain_of_the_same_customer(two_customers: Ledger) -> None:
    account = authorise(two_customers, "post@kunde.example", "kunde-butikk.example", SITE)
    assert account.address == "post@kunde.example"


def test_unknown_sender_is_67_and_says_what_to_do(two_customers: Ledger) -> None:
    with pytest.raises(UnknownAccount) as caught:
        authorise(two_customers, "nobody@kunde.example", "kunde.example", SITE)
    assert exit_code_for(caught.value) == 67
    assert str(caught.value).startswith("nobody@kunde.example is not a registered sending account;")
    assert "register" in str(caught.value)


def test_unauthenticated_account_is_77(two_customers: Ledger) -> None:
    two_customers.add_account("new@kunde.example", "kunde1")
    with pytest.raises(AccountNotAuthenticated) as caught:
        authorise(two_customers, "new@kunde.example", None, SITE)
    assert exit_code_for(caught.value) == 77
    assert "authenticate it in the control panel" in str(caught.value)
    two_customers.authenticate("new@kunde.example")
    assert authorise(two_customers, "new@kunde.example", None, SITE).authenticated


def test_blocked_account_is_77_with_the_reason_until_unblocked(two_customers: Ledger) -> None:
    two_customers.block("post@kunde.example", "spam run from a contact form")
    with pytest.raises(AccountBlocked) as caught:
        authorise(two_customers, "post@kunde.example", "kunde.example", SITE)
    assert exit_code_for(caught.value) == 77
    assert str(caught.value) == (
        "post@kunde.example is blocked from sending (spam run from a contact form); "
        "contact your hosting provider to have the block lifted")
    two_customers.unblock("post@kunde.example", "form fixed")
    assert not authorise(two_customers, "post@kunde.example", "kunde.example", SITE).blocked


def test_another_customers_account_is_77(two_customers: Ledger) -> None:
    with pytest.raises(NotCallersAccount) as caught:
        authorise(two_customers, "info@annen.example", "annen.example", SITE)
    assert exit_code_for(caught.value) == 77
    assert "info@annen.example is not an account of the customer that the Unix user web1" in \
        str(caught.value)


def test_another_customers_blocked_account_reveals_nothing_about_it(two_customers: Ledger) -> None:
    two_customers.block("info@annen.example", "secret reason")
    with pytest.raises(NotCallersAccount) as caught:
        authorise(two_customers, "info@annen.example", None, SITE)
    assert "secret reason" not in str(caught.value)


def test_from_domain_of_another_customer_is_77(two_customers: Ledger) -> None:
    with pytest.raises(ForeignFromDomain) as caught:
        authorise(two_customers, "post@kunde.example", "annen.example", SITE)
    assert exit_code_for(caught.value) == 77
    assert str(caught.value) == (
        "the From address's domain annen.example is not one of the sender's domains "
        "(kunde-butikk.example, kunde.example); use an address of your own domain in From")


def test_from_domain_nobody_owns_is_77(two_customers: Ledger) -> None:
    with pytest.raises(ForeignFromDomain):
        authorise(two_customers, "post@kunde.example", "bank.example", SITE)


def test_unbound_caller_is_allowed_in_process_but_not_by_the_gate(two_customers: Ledger) -> None:
    stranger = Caller(uid=3000, user="www-data")
    assert authorise(two_customers, "info@annen.example", None, stranger).customer_id == "kunde2"
    with pytest.raises(UnboundCaller) as caught:
        authorise(two_customers, "info@annen.example", None, stranger, require_binding=True)
    assert exit_code_for(caught.value) == 77
    assert "www-data is not linked to any customer" in str(caught.value)


def test_caller_without_a_user_name_counts_as_unbound(two_customers: Ledger) -> None:
    nameless = Caller(uid=65000, user=None)
    with pytest.raises(UnboundCaller, match="uid 65000"):
        authorise(two_customers, "post@kunde.example", None, nameless, require_binding=True)


def test_bound_caller_passes_with_require_binding(two_customers: Ledger) -> None:
    assert authorise(two_customers, "info@annen.example", "annen.example", OTHER_SITE,
                     require_binding=True).customer_id == "kunde2"


def test_account_names_match_without_regard_to_case(two_customers: Ledger) -> None:
    assert authorise(two_customers, "Post@KUNDE.Example", "KUNDE.example", SITE).address == \
        "post@kunde.example"


def test_current_caller_is_this_process() -> None:
    caller = Caller.current()
    assert caller.uid == os.getuid() and caller.pid == os.getpid()
    assert caller.user == pwd.getpwuid(os.getuid()).pw_name


def test_a_domain_belongs_to_one_customer_only(two_customers: Ledger) -> None:
    with pytest.raises(Conflict) as caught:
        two_customers.add_account("sales@annen.example", "kunde1")
    assert exit_code_for(caught.value) == 65
    assert "the domain annen.example belongs to customer kunde2" in str(caught.value)
    assert two_customers.customer_domains("kunde1") == {"kunde.example", "kunde-butikk.example"}


def test_removing_the_last_account_frees_its_domain(two_customers: Ledger) -> None:
    two_customers.remove_account("info@annen.example")
    assert two_customers.customer_domains("kunde2") == set()
    assert two_customers.add_account("info@annen.example", "kunde1").customer_id == "kunde1"


def test_a_unix_user_belongs_to_one_customer_only(two_customers: Ledger) -> None:
    with pytest.raises(Conflict, match="web1 is bound to customer kunde1"):
        two_customers.bind_user("kunde2", "web1")
    assert two_customers.unbind_user("web1") == "kunde1"
    two_customers.bind_user("kunde2", "web1")
    assert two_customers.customer_of_user("web1") == "kunde2"


def test_adding_twice_is_harmless_but_moving_an_account_is_refused(two_customers: Ledger) -> None:
    assert two_customers.add_account("post@kunde.example", "kunde1").authenticated
    with pytest.raises(Conflict, match="already an account of customer kunde1"):
        two_customers.add_account("post@kunde.example", "kunde2")


@pytest.mark.parametrize("address", ["no-at-sign", "@kunde.example", "a b@kunde.example",
                                     "post@kunde", "post@-bad-.example", "a..b@kunde.example"])
def test_invalid_addresses_are_65(ledger: Ledger, address: str) -> None:
    ledger.add_customer("kunde1")
    with pytest.raises(InvalidInput) as caught:
        ledger.add_account(address, "kunde1")
    assert exit_code_for(caught.value) == 65


def test_internationalised_domains_are_stored_as_a_labels(ledger: Ledger) -> None:
    account = add_account(ledger, "post@bjørn.example", "kunde1")
    assert account.address == "post@xn--bjrn-hra.example"
    assert ledger.find_account("post@xn--bjrn-hra.example") == account


def test_unknown_customer_or_account_in_admin_operations_is_67(ledger: Ledger) -> None:
    with pytest.raises(UnknownSubject) as caught:
        ledger.add_account("post@kunde.example", "nope")
    assert exit_code_for(caught.value) == 67
    with pytest.raises(UnknownSubject, match="not a registered account"):
        ledger.block("ghost@kunde.example", "x")


def test_admin_actions_are_audited_with_the_actor(ledger: Ledger) -> None:
    ledger.add_customer("kunde1", ["web1"], actor="alice")
    ledger.add_account("post@kunde.example", "kunde1", actor="alice")
    ledger.block("post@kunde.example", "abuse report", actor="bob")
    entries = ledger.audit_log(10)
    assert [(e.actor, e.action, e.subject) for e in entries] == [
        ("bob", "account block", "post@kunde.example"),
        ("alice", "account add", "post@kunde.example"),
        ("alice", "customer bind", "kunde1"),
        ("alice", "customer add", "kunde1"),
    ]
    assert entries[0].detail == "abuse report"
