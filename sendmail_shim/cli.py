"""``sendmail-shim``: the admin CLI, a thin layer over the ledger library.

Every command takes ``--json`` and then prints exactly one JSON document on
stdout (an error too: ``{"ok": false, "error": ..., "exit_code": ...}``).
Exit codes come from ``exitcodes``, the table ``sendmail`` and the gate use:
0 ok, 64 usage, 65 bad data, 67 unknown account or customer, 69 ledger
unavailable, 78 configuration or schema.

One click group per area (db, customer, account, usage, limits, override, log,
config); the spf, queue, serve and metrics areas are added beside them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .exitcodes import EX_CONFIG, EX_NOPERM, EX_OK, EX_SOFTWARE, EX_UNAVAILABLE, exit_code_for
from .limits import Rule

if TYPE_CHECKING:
    from .config import Config
    from .ledger import AccountEntry, AuditEntry, Customer, Decision, Ledger, Notice, Override, RuleUsage

PROG = "sendmail-shim"


# --------------------------------------------------------------------------- plumbing


class AdminGroup(click.Group):
    """Turns every failure into one line and its exit code from the ``exitcodes`` table."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(argv, PROG, complete_var,
                                  standalone_mode=False, **extra)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line and a code
            fail(describe_failure(exc), exit_code_for(exc), "--json" in argv)
        code = result if isinstance(result, int) else EX_OK
        if standalone_mode:
            sys.exit(code)
        return code


def describe_failure(exc: Exception) -> str:
    """The line to show: the error's own, click's wording for usage, a plea for a bug."""
    if isinstance(exc, click.exceptions.UsageError):
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx else ""
        return exc.format_message() + hint
    if isinstance(exc, click.exceptions.ClickException):
        return exc.format_message()
    if isinstance(exc, click.exceptions.Abort):
        return "aborted"
    if exit_code_for(exc) == EX_SOFTWARE:
        return f"internal error ({type(exc).__name__}: {exc}); please report it"
    return str(exc)


def fail(message: str, code: int, as_json: bool) -> NoReturn:
    click.echo(f"{PROG}: {message}", err=True)
    if as_json:
        click.echo(json.dumps({"ok": False, "error": message, "exit_code": code}))
    sys.exit(code)


class State:
    """Per-invocation state: the config and the ledger, loaded on first use."""

    def __init__(self, config_path: str | None, actor: str | None) -> None:
        self.config_path = config_path
        self.actor = actor or _default_actor()
        self._config: Config | None = None
        self._ledger: Ledger | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            from .config import load

            self._config = load(self.config_path)
        return self._config

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            from .ledger import Ledger

            self._ledger = Ledger.from_config(self.config)
        return self._ledger

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()


def _default_actor() -> str:
    from .accounts import Caller

    name = Caller.current().label
    sudo_user = os.environ.get("SUDO_USER")
    return f"{sudo_user} (via sudo)" if sudo_user and name == "root" else name


pass_state = click.make_pass_decorator(State)


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON document on stdout.")(function)


def show(as_json: bool, document: Any, text: str | Sequence[str]) -> None:
    if as_json:
        click.echo(json.dumps(document, indent=2, sort_keys=False))
    else:
        click.echo(text if isinstance(text, str) else "\n".join(text))


def iso(at: float | None) -> str | None:
    """Every time in a ``--json`` document: ISO 8601 UTC (the ledger's one formatter), or None."""
    from .ledger import iso_utc

    return iso_utc(at)


def example(*lines: str) -> str:
    """An epilog: the help of every command ends with an example."""
    return "\b\nExample:\n" + "\n".join(f"  {line}" for line in lines)


def scope_of(account: str | None, customer: str | None) -> tuple[str, str]:
    if (account is None) == (customer is None):
        raise click.UsageError("give exactly one of --account ADDRESS or --customer ID")
    return ("account", account) if account is not None else ("customer", customer or "")


# --------------------------------------------------------------------------- JSON shapes


def default_sender_uses(account: AccountEntry, customer: Customer | None) -> tuple[bool, list[str]]:
    """Whether the account is its customer's default sender, and for which Unix users' bindings."""
    if customer is None:
        return False, []
    users = [user for user, address in customer.user_default_senders if address == account.address]
    return customer.default_sender == account.address, users


def account_doc(account: AccountEntry, customer: Customer | None = None) -> dict[str, Any]:
    is_default, users = default_sender_uses(account, customer)
    return {"address": account.address, "customer": account.customer_id,
            "authenticated": account.authenticated, "blocked": account.blocked,
            "block_reason": account.block_reason, "blocked_by": account.blocked_by,
            "blocked_at": iso(account.blocked_at),
            "default_sender": is_default,
            "default_sender_unix_users": users}


def customer_doc(customer: Customer) -> dict[str, Any]:
    own = dict(customer.user_default_senders)
    return {"id": customer.id, "unix_users": list(customer.unix_users),
            "domains": list(customer.domains), "accounts": customer.accounts,
            "default_sender": customer.default_sender, "contact": customer.contact,
            "bindings": [{"unix_user": user, "default_sender": own.get(user),
                          "sends_as": own.get(user) or customer.default_sender}
                         for user in customer.unix_users]}


def override_doc(override: Override) -> dict[str, Any]:
    return {"id": override.id, "scope": override.scope, "subject": override.subject,
            "rule": str(override.rule), "metric": override.rule.metric,
            "limit": override.rule.limit, "window_seconds": override.rule.window_seconds,
            "expires_at": iso(override.expires_at), "reason": override.reason,
            "created_at": iso(override.created_at), "created_by": override.created_by}


def usage_doc(usage: RuleUsage) -> dict[str, Any]:
    return {"scope": usage.scope, "subject": usage.subject, "rule": str(usage.rule),
            "metric": usage.metric, "window_seconds": usage.window_seconds,
            "limit": usage.limit, "used": usage.used, "remaining": usage.remaining,
            "next_free_at": iso(usage.next_free_at),
            "override": override_doc(usage.override) if usage.override else None}


def account_line(account: AccountEntry, customer: Customer | None = None) -> str:
    from .ledger import format_utc

    state = "authenticated" if account.authenticated else "not authenticated"
    if account.blocked:
        # An automatic block stands out, with when: the admin did not make it and may not know of it.
        auto = account.blocked_by == "auto" and account.blocked_at is not None
        by = f" AUTOMATICALLY since {format_utc(account.blocked_at or 0)}" if auto else ""
        state += f", BLOCKED{by} ({account.block_reason or 'no reason given'})"
    is_default, users = default_sender_uses(account, customer)
    if is_default:
        state += ", default sender"
    if users:
        state += f", default sender of {', '.join(users)}"
    return f"{account.address}  customer={account.customer_id}  {state}"


def show_account(state: State, found: AccountEntry, as_json: bool) -> None:
    owner = state.ledger.get_customer(found.customer_id)
    show(as_json, account_doc(found, owner), account_line(found, owner))


def override_line(override: Override) -> str:
    from .ledger import format_utc

    return (f"#{override.id} {override.scope} {override.subject}: {override.rule} "
            f"until {format_utc(override.expires_at)} - {override.reason}")


def usage_line(usage: RuleUsage, now: float) -> str:
    from .ledger import format_delay, format_utc

    line = f"  {str(usage.rule):<24} used {usage.used:>6}  remaining {usage.remaining:>6}"
    if usage.next_free_at is not None:
        line += (f"  next free {format_utc(usage.next_free_at)} "
                 f"(in {format_delay(usage.next_free_at - now)})")
    if usage.override is not None:
        line += f"  [override #{usage.override.id}]"
    return line


# --------------------------------------------------------------------------- the CLI


@click.group(cls=AdminGroup, epilog=example("sendmail-shim account list --json"))
@click.option("--config", "config_path", metavar="PATH",
              help="Config file (default: $SENDMAIL_SHIM_CONFIG, "
                   "else /etc/sendmail-shim/config.toml).")
@click.option("--actor", metavar="NAME",
              help="Who is acting, for the audit log (default: your Unix user).")
@click.version_option(package_name="sendmail-shim", prog_name=PROG)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, actor: str | None) -> None:
    """Manage sendmail-shim: customers, accounts, rate limits and the ledger."""
    state = State(config_path, actor)
    ctx.obj = state
    ctx.call_on_close(state.close)


# ----------------------------------------------------------------- db


@cli.group(epilog=example("sendmail-shim db upgrade"))
def db() -> None:
    """Create and upgrade the ledger database."""


@db.command("upgrade", epilog=example("sendmail-shim db upgrade --owner sendmail-shim"))
@click.option("--owner", metavar="USER[:GROUP]",
              help="Give a SQLite ledger file and its directory to this user (e.g. the gate's).")
@json_option
@pass_state
def db_upgrade(state: State, owner: str | None, as_json: bool) -> None:
    """Create the ledger, or bring its schema up to date (safe to repeat).

    A SQLite file is created with mode 0600 in a 0750 directory.
    """
    ledger = state.ledger
    applied = ledger.upgrade()
    if owner:
        _chown_sqlite(ledger, owner)
    status = ledger.schema_status()
    text = [f"applied {name}" for name in applied] or ["the ledger is up to date"]
    show(as_json, {"ok": True, "ledger": ledger.where, "applied": applied,
                   "schema": list(status.applied)}, [*text, f"ledger: {ledger.where}"])


def _chown_sqlite(ledger: Ledger, owner: str) -> None:
    import grp
    import pwd

    from .ledger import InvalidInput

    if ledger.dialect != "sqlite":
        raise click.UsageError("--owner applies to a SQLite ledger only")
    user, _, group = owner.partition(":")
    try:
        entry = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError:
        raise InvalidInput(f"{owner!r} is not a known user (or group)") from None
    path = ledger.where
    for target in (os.path.dirname(os.path.abspath(path)), path, path + "-wal", path + "-shm"):
        if os.path.exists(target):
            os.chown(target, entry.pw_uid, gid)


@db.command("status", epilog=example("sendmail-shim db status --json"))
@json_option
@pass_state
def db_status(state: State, as_json: bool) -> None:
    """Show which schema migrations are applied and which are pending."""
    status = state.ledger.schema_status()
    text = [f"ledger: {state.ledger.where}",
            f"applied: {', '.join(status.applied) or 'none'}",
            f"pending: {', '.join(status.pending) or 'none'}"]
    if status.pending:
        text.append("run: sendmail-shim db upgrade")
    show(as_json, {"ledger": state.ledger.where, "applied": list(status.applied),
                   "pending": list(status.pending), "unknown": list(status.unknown)}, text)


@db.command("prune", epilog=example("sendmail-shim db prune --json"))
@json_option
@pass_state
def db_prune(state: State, as_json: bool) -> None:
    """Delete what retention no longer keeps, and resolve timed-out reservations.

    Sends older than the longest window (plus a day), finished queue messages
    older than [ledger] keep_queue, decisions older than [ledger] keep_decisions
    and recipient outcomes (for [abuse]) older than a day go; the audit log stays. Usage is the same before and after.
    The gate prunes by itself every hour; run this from a timer without one.
    """
    report = state.ledger.prune()
    removed = {"sends": report.sends, "usage_buckets": report.usage_buckets,
               "queue_messages": report.queue_messages, "decisions": report.decisions,
               "spf_verdicts": report.spf_verdicts, "outcomes": report.outcomes}
    kept = {"sends": iso(report.sends_before), "queue_messages": iso(report.queue_before),
            "decisions": iso(report.decisions_before)}
    text = ["removed " + ", ".join(f"{count} {name.replace('_', ' ')}" for name, count in removed.items()),
            f"resolved {report.reservations_resolved} timed-out reservation(s)",
            "kept: " + ", ".join(f"{name.replace('_', ' ')} since {at}" for name, at in kept.items())]
    show(as_json, {"ok": True, "ledger": state.ledger.where, "removed": removed,
                   "reservations_resolved": report.reservations_resolved, "kept_since": kept}, text)


# ----------------------------------------------------------------- customers


@cli.group(epilog=example("sendmail-shim customer list"))
def customer() -> None:
    """Customers and the Unix users their sites run as."""


def allow_missing_user_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--allow-missing-user", is_flag=True,
                        help="Bind a Unix user that does not exist on this server (yet).")(function)


def require_unix_users(names: Sequence[str], allow_missing: bool) -> None:
    """A binding to a user this server does not have is usually a typo: nobody would ever match it."""
    import pwd

    from .ledger import InvalidInput

    for name in names:
        try:
            pwd.getpwnam(name)
        except KeyError:
            if not allow_missing:
                raise InvalidInput(f"there is no Unix user named {name} on this server; check the name, "
                                   f"or bind it ahead of its creation with --allow-missing-user") from None


DEFAULT_SENDER_HELP = ("One of the customer's accounts: its sites send as it when a message names no "
                       "sender (no -f, no From, or a From such as cron's 'root').")
CONTACT_HELP = ("Where notices about the customer's limits and blocks go ([notify]): any address, "
                "usually one the customer reads outside this server.")


@customer.command("add", epilog=example("sendmail-shim customer add kunde1 --unix-user web1"))
@click.argument("customer_id", metavar="ID")
@click.option("--unix-user", "unix_users", multiple=True, metavar="USER",
              help="A Unix user whose sites send for this customer (repeatable); it must exist.")
@allow_missing_user_option
@click.option("--default-sender", metavar="ADDRESS", help=DEFAULT_SENDER_HELP)
@click.option("--contact", metavar="ADDRESS", help=CONTACT_HELP)
@json_option
@pass_state
def customer_add(state: State, customer_id: str, unix_users: tuple[str, ...], allow_missing_user: bool,
                 default_sender: str | None, contact: str | None, as_json: bool) -> None:
    """Add a customer (or keep an existing one) and bind Unix users to it.

    A default sender must already be an account of the customer, so it can be
    given once the customer exists (repeating customer add is safe).
    """
    require_unix_users(unix_users, allow_missing_user)
    found = state.ledger.add_customer(customer_id, unix_users, default_sender=default_sender,
                                      actor=state.actor)
    if contact is not None:
        found = state.ledger.set_contact(customer_id, contact, actor=state.actor)
    show_customer(found, as_json)


def show_customer(found: Customer, as_json: bool) -> None:
    show(as_json, customer_doc(found), _customer_text(found))


def _customer_text(found: Customer) -> str:
    own = dict(found.user_default_senders)
    users = ", ".join(f"{u} (default sender {own[u]})" if u in own else u for u in found.unix_users) or "-"
    domains = ", ".join(found.domains) or "-"
    text = f"{found.id}  unix users: {users}  domains: {domains}  accounts: {found.accounts}"
    text += f"  default sender: {found.default_sender}" if found.default_sender else ""
    return text + (f"  contact: {found.contact}" if found.contact else "")


@customer.command("set", epilog=example("sendmail-shim customer set kunde1 --default-sender post@kunde.example"))
@click.argument("customer_id", metavar="ID")
@click.option("--default-sender", metavar="ADDRESS", help=DEFAULT_SENDER_HELP)
@click.option("--no-default-sender", is_flag=True, help="Clear the default sender.")
@click.option("--unix-user", metavar="USER",
              help="Set it for this one binding of the customer instead (it wins over the customer's).")
@click.option("--contact", metavar="ADDRESS", help=CONTACT_HELP)
@click.option("--no-contact", is_flag=True, help="Clear the contact address (notices then go to [notify] admin only).")
@json_option
@pass_state
def customer_set(state: State, customer_id: str, default_sender: str | None, no_default_sender: bool,
                 unix_user: str | None, contact: str | None, no_contact: bool, as_json: bool) -> None:
    """Change a customer's default sender (or, with --unix-user, one Unix-user binding's) or its contact.

    A binding's own default sender wins over the customer's, for a customer with
    several sites: customer set kunde1 --unix-user web2 --default-sender shop@kunde.example.
    The contact gets the notices: customer set kunde1 --contact drift@kunde.example
    """
    sender_change = default_sender is not None or no_default_sender
    contact_change = contact is not None or no_contact
    if (default_sender is not None and no_default_sender) or (contact is not None and no_contact):
        raise click.UsageError("give an address or its --no- option, not both")
    if not (sender_change or contact_change):
        raise click.UsageError("give exactly one of --default-sender ADDRESS or --no-default-sender, "
                               "or one of --contact ADDRESS or --no-contact")
    if contact_change and unix_user is not None:
        raise click.UsageError("--contact is the customer's, not a Unix-user binding's; drop --unix-user")
    found = None
    if sender_change:
        found = state.ledger.set_default_sender(customer_id, default_sender, unix_user=unix_user,
                                                actor=state.actor)
    if contact_change:
        found = state.ledger.set_contact(customer_id, contact, actor=state.actor)
    assert found is not None
    show_customer(found, as_json)


@customer.command("show", epilog=example("sendmail-shim customer show kunde1 --json"))
@click.argument("customer_id", metavar="ID")
@json_option
@pass_state
def customer_show(state: State, customer_id: str, as_json: bool) -> None:
    """Show one customer: Unix users, domains, accounts and default senders."""
    found = state.ledger.get_customer(customer_id)
    show_customer(found, as_json)


@customer.command("bind", epilog=example("sendmail-shim customer bind kunde1 web2"))
@click.argument("customer_id", metavar="ID")
@click.argument("unix_user", metavar="USER")
@allow_missing_user_option
@json_option
@pass_state
def customer_bind(state: State, customer_id: str, unix_user: str, allow_missing_user: bool, as_json: bool) -> None:
    """Bind a Unix user to a customer: its sites may send only from that customer's accounts."""
    require_unix_users([unix_user], allow_missing_user)
    found = state.ledger.bind_user(customer_id, unix_user, actor=state.actor)
    show_customer(found, as_json)


@customer.command("unbind", epilog=example("sendmail-shim customer unbind web2"))
@click.argument("unix_user", metavar="USER")
@json_option
@pass_state
def customer_unbind(state: State, unix_user: str, as_json: bool) -> None:
    """Remove a Unix user's binding to its customer."""
    customer_id = state.ledger.unbind_user(unix_user, actor=state.actor)
    show(as_json, {"ok": True, "unix_user": unix_user, "customer": customer_id},
         f"{unix_user} is no longer bound to {customer_id}")


@customer.command("list", epilog=example("sendmail-shim customer list --json"))
@json_option
@pass_state
def customer_list(state: State, as_json: bool) -> None:
    """List customers with their Unix users, domains and number of accounts."""
    customers = state.ledger.list_customers()
    show(as_json, [customer_doc(c) for c in customers],
         [_customer_text(c) for c in customers] or ["no customers"])


# ----------------------------------------------------------------- accounts


@cli.group(epilog=example("sendmail-shim account list --customer kunde1"))
def account() -> None:
    """Sending accounts: register, authenticate, block."""


@account.command("add", epilog=example(
    "sendmail-shim account add post@kunde.example --customer kunde1"))
@click.argument("address")
@click.option("--customer", "customer_id", required=True, metavar="ID", help="The owning customer.")
@click.option("--authenticated", is_flag=True, help="Mark it authenticated at once.")
@json_option
@pass_state
def account_add(state: State, address: str, customer_id: str, authenticated: bool,
                as_json: bool) -> None:
    """Register a sending account of a customer.

    Its domain becomes one of the customer's domains; a domain belongs to one customer only.
    """
    found = state.ledger.add_account(address, customer_id, authenticated=authenticated,
                                     actor=state.actor)
    show_account(state, found, as_json)


@account.command("authenticate", epilog=example(
    "sendmail-shim account authenticate post@kunde.example"))
@click.argument("address")
@click.option("--revoke", is_flag=True, help="Withdraw the authentication instead.")
@json_option
@pass_state
def account_authenticate(state: State, address: str, revoke: bool, as_json: bool) -> None:
    """Mark an account authenticated for sending from web hosting (or revoke it)."""
    found = state.ledger.authenticate(address, not revoke, actor=state.actor)
    show_account(state, found, as_json)


@account.command("block", epilog=example(
    'sendmail-shim account block post@kunde.example --reason "spam run from the contact form"'))
@click.argument("address")
@click.option("--reason", help="Why; shown to the site and kept in the audit log.")
@json_option
@pass_state
def account_block(state: State, address: str, reason: str | None, as_json: bool) -> None:
    """Block an account: nothing is sent from it until it is unblocked."""
    found = state.ledger.block(address, reason, actor=state.actor)
    show_account(state, found, as_json)


@account.command("unblock", epilog=example(
    'sendmail-shim account unblock post@kunde.example --reason "site cleaned"'))
@click.argument("address")
@click.option("--reason", help="Why; kept in the audit log.")
@json_option
@pass_state
def account_unblock(state: State, address: str, reason: str | None, as_json: bool) -> None:
    """Lift an account's block, by an admin or automatic ([abuse]).

    What the account did before now no longer counts towards an automatic block.
    """
    found = state.ledger.unblock(address, reason, actor=state.actor)
    show_account(state, found, as_json)


@account.command("remove", epilog=example("sendmail-shim account remove post@kunde.example"))
@click.argument("address")
@json_option
@pass_state
def account_remove(state: State, address: str, as_json: bool) -> None:
    """Remove an account. Its sends stay in the ledger and count again if it is re-added."""
    found = state.ledger.remove_account(address, actor=state.actor)
    show(as_json, {"ok": True, "removed": account_doc(found)}, f"removed {found.address}")


@account.command("list", epilog=example("sendmail-shim account list --customer kunde1 --json"))
@click.option("--customer", "customer_id", metavar="ID", help="Only this customer's accounts.")
@json_option
@pass_state
def account_list(state: State, customer_id: str | None, as_json: bool) -> None:
    """List accounts with their customer and state.

    A block says who made it: blocked_by is "admin" (account block) or "auto" (the [abuse]
    rules, with a reason starting "auto:"), and blocked_at when (ISO 8601 UTC in --json).
    """
    accounts = state.ledger.list_accounts(customer_id)
    owners = {c.id: c for c in state.ledger.list_customers(customer_id)}
    show(as_json, [account_doc(a, owners.get(a.customer_id)) for a in accounts],
         [account_line(a, owners.get(a.customer_id)) for a in accounts] or ["no accounts"])


# ----------------------------------------------------------------- usage


@cli.group(invoke_without_command=True,
           epilog=example("sendmail-shim usage --account post@kunde.example"))
@click.option("--account", "account_address", metavar="ADDRESS", help="An account's usage.")
@click.option("--customer", "customer_id", metavar="ID", help="A customer's usage.")
@json_option
@click.pass_context
def usage(ctx: click.Context, account_address: str | None, customer_id: str | None,
          as_json: bool) -> None:
    """Show usage against every rate-limit rule.

    For an account: its own rules and its customer's. --json lists every rule
    with scope, metric, window_seconds, limit, used, remaining and next_free_at
    (ISO 8601 UTC; null while some remain).
    """
    if ctx.invoked_subcommand is not None:
        return
    state: State = ctx.obj
    scope, subject = scope_of(account_address, customer_id)
    ledger = state.ledger
    now = time.time()
    rules = ledger.usage(scope, subject, now)
    subject = rules[0].subject if rules else subject
    if scope == "account":
        found = ledger.find_account(subject)
        if found is not None:
            rules += ledger.usage("customer", found.customer_id, now)
    text = []
    for part in ("account", "customer"):
        shown = [u for u in rules if u.scope == part]
        if shown:
            text += [f"{part} {shown[0].subject}", *[usage_line(u, now) for u in shown]]
    show(as_json, {"scope": scope, "subject": subject, "rules": [usage_doc(u) for u in rules]},
         text or [f"{scope} {subject}: no rules configured"])


@usage.command("reset", epilog=example(
    'sendmail-shim usage reset --account post@kunde.example --reason "false alarm"'))
@click.option("--account", "account_address", metavar="ADDRESS")
@click.option("--customer", "customer_id", metavar="ID")
@click.option("--reason", required=True, help="Why; kept in the audit log.")
@json_option
@pass_state
def usage_reset(state: State, account_address: str | None, customer_id: str | None,
                reason: str, as_json: bool) -> None:
    """Forgive all usage so far. The sends stay in the ledger; an audited marker is added."""
    scope, subject = scope_of(account_address, customer_id)
    marker = state.ledger.reset_usage(scope, subject, reason=reason, actor=state.actor)
    show(as_json, {"ok": True, "id": marker.id, "scope": scope, "subject": marker.subject,
                   "at": iso(marker.at), "reason": marker.reason, "by": marker.created_by},
         f"usage of {scope} {marker.subject} reset ({marker.reason})")


# ----------------------------------------------------------------- limits and overrides


@cli.group(epilog=example("sendmail-shim limits show"))
def limits() -> None:
    """The configured rate limits."""


@limits.command("show", epilog=example("sendmail-shim limits show --json"))
@click.option("--account", "account_address", metavar="ADDRESS",
              help="Only overrides of this account.")
@click.option("--customer", "customer_id", metavar="ID", help="Only overrides of this customer.")
@json_option
@pass_state
def limits_show(state: State, account_address: str | None, customer_id: str | None,
                as_json: bool) -> None:
    """Print the configured rules and the overrides in force, with expiry and reason."""
    config = state.config
    scope, subject = (None, None)
    if account_address is not None or customer_id is not None:
        scope, subject = scope_of(account_address, customer_id)
    overrides = state.ledger.list_overrides(scope, subject)
    text = ["account rules (each sending account):",
            *[f"  {rule}" for rule in config.limits.account],
            "customer rules (all of a customer's accounts together):",
            *[f"  {rule}" for rule in config.limits.customer],
            "overrides:", *([f"  {override_line(o)}" for o in overrides] or ["  none"])]
    show(as_json, {"account": [_rule_doc(r) for r in config.limits.account],
                   "customer": [_rule_doc(r) for r in config.limits.customer],
                   "overrides": [override_doc(o) for o in overrides]}, text)


def _rule_doc(rule: Rule) -> dict[str, Any]:
    return {"rule": str(rule), "metric": rule.metric, "limit": rule.limit,
            "window_seconds": rule.window_seconds}


@cli.group(epilog=example("sendmail-shim override list"))
def override() -> None:
    """Temporary per-account or per-customer limits, each with an expiry and a reason."""


@override.command("set", epilog=example(
    'sendmail-shim override set --account post@kunde.example --rule "100 messages / 5m" '
    '--expires 7d --reason "newsletter move"'))
@click.option("--account", "account_address", metavar="ADDRESS")
@click.option("--customer", "customer_id", metavar="ID")
@click.option("--rule", "rule_text", required=True, metavar="RULE",
              help='Like the config: "100 messages / 5m". Replaces the rule with the same window.')
@click.option("--expires", required=True, metavar="WHEN",
              help="A duration from now (7d, 12h) or a UTC time (2026-06-01T12:00).")
@click.option("--reason", required=True,
              help="Why; shown by limits show and kept in the audit log.")
@json_option
@pass_state
def override_set(state: State, account_address: str | None, customer_id: str | None,
                 rule_text: str, expires: str, reason: str, as_json: bool) -> None:
    """Set an override: it replaces the configured rule with the same metric and window,
    or adds a rule, until it expires."""
    from .ledger import InvalidInput, parse_expiry
    from .limits import RuleSyntaxError, parse_rule

    scope, subject = scope_of(account_address, customer_id)
    try:
        rule = parse_rule(rule_text)
    except RuleSyntaxError as exc:
        raise InvalidInput(str(exc)) from None
    expires_at = parse_expiry(expires, time.time())
    made = state.ledger.set_override(scope, subject, rule, expires_at=expires_at, reason=reason,
                                     actor=state.actor)
    show(as_json, override_doc(made), override_line(made))


@override.command("list", epilog=example("sendmail-shim override list --customer kunde1 --json"))
@click.option("--account", "account_address", metavar="ADDRESS")
@click.option("--customer", "customer_id", metavar="ID")
@click.option("--all", "include_expired", is_flag=True, help="Include expired overrides.")
@json_option
@pass_state
def override_list(state: State, account_address: str | None, customer_id: str | None,
                  include_expired: bool, as_json: bool) -> None:
    """List overrides in force (or all of them)."""
    scope, subject = (None, None)
    if account_address is not None or customer_id is not None:
        scope, subject = scope_of(account_address, customer_id)
    found = state.ledger.list_overrides(scope, subject, include_expired=include_expired)
    show(as_json, [override_doc(o) for o in found],
         [override_line(o) for o in found] or ["no overrides"])


@override.command("rm", epilog=example("sendmail-shim override rm 3"))
@click.argument("override_id", metavar="ID", type=int)
@json_option
@pass_state
def override_rm(state: State, override_id: int, as_json: bool) -> None:
    """Remove an override at once (the configured rule applies again)."""
    gone = state.ledger.remove_override(override_id, actor=state.actor)
    show(as_json, {"ok": True, "removed": override_doc(gone)}, f"removed {override_line(gone)}")


# ----------------------------------------------------------------- log


@cli.command("log", epilog=example("sendmail-shim log --account post@kunde.example --limit 20"))
@click.option("--account", "account_address", metavar="ADDRESS", help="Only this account.")
@click.option("--customer", "customer_id", metavar="ID", help="Only this customer.")
@click.option("--limit", "count", type=click.IntRange(1, 10000), default=50, show_default=True,
              help="How many entries.")
@click.option("--audit", is_flag=True, help="Show admin actions instead of sending decisions.")
@click.option("--notices", is_flag=True, help="Show the notices sent ([notify]) instead of sending decisions.")
@json_option
@pass_state
def log(state: State, account_address: str | None, customer_id: str | None, count: int,
        audit: bool, notices: bool, as_json: bool) -> None:
    """Recent decisions (sent, queued, refused and why), newest first; or the audit log, or the notices."""
    ledger = state.ledger
    if audit and notices:
        raise click.UsageError("give --audit or --notices, not both")
    if notices:
        sent = ledger.notices(count, subject=account_address or customer_id)
        show(as_json, [notice_doc(n) for n in sent], [notice_line(n) for n in sent] or ["no notices"])
        return
    if audit:
        entries = ledger.audit_log(count, subject=account_address or customer_id)
        show(as_json, [audit_doc(e) for e in entries],
             [audit_line(e) for e in entries] or ["no entries"])
        return
    decisions = ledger.recent_decisions(count, account=account_address, customer=customer_id)
    show(as_json, [decision_doc(d) for d in decisions],
         [decision_line(d) for d in decisions] or ["no decisions"])


def decision_doc(decision: Decision) -> dict[str, Any]:
    return {"id": decision.id, "at": iso(decision.at), "verdict": decision.verdict,
            "code": decision.code, "account": decision.account, "customer": decision.customer,
            "uid": decision.uid, "user": decision.user, "recipients": decision.recipients,
            "reason": decision.reason, "message_id": decision.message_id,
            "stage": decision.stage, "reference": decision.reference, "extra": decision.extra}


def decision_line(decision: Decision) -> str:
    from .ledger import format_utc

    line = (f"{format_utc(decision.at)}  {decision.verdict or '-'} ({decision.code})  "
            f"{decision.account or '-'}  customer={decision.customer or '-'}  "
            f"uid={decision.uid}  recipients={decision.recipients}")
    return line + (f"  {decision.reason}" if decision.reason else "")


def audit_doc(entry: AuditEntry) -> dict[str, Any]:
    return {"id": entry.id, "at": iso(entry.at), "actor": entry.actor, "action": entry.action,
            "subject": entry.subject, "detail": entry.detail}


def audit_line(entry: AuditEntry) -> str:
    from .ledger import format_utc

    line = f"{format_utc(entry.at)}  {entry.actor or '-'}  {entry.action} {entry.subject}"
    return line + (f"  {entry.detail}" if entry.detail else "")


def notice_doc(notice: Notice) -> dict[str, Any]:
    return {"id": notice.id, "at": iso(notice.at), "kind": notice.kind, "scope": notice.scope,
            "subject": notice.subject, "rule": notice.rule, "window_start": iso(notice.window_start),
            "recipients": notice.recipients.split(",") if notice.recipients else [],
            "message_id": notice.message_id}


def notice_line(notice: Notice) -> str:
    from .ledger import format_utc

    to = notice.recipients.replace(",", ", ") if notice.recipients else "no one (no contact, no admin)"
    return f"{format_utc(notice.at)}  {notice.kind:<5}  {notice.scope} {notice.subject}  {notice.rule}  to {to}"


# ----------------------------------------------------------------- report

SCRIPT_NOTE = ("scripts: X-PHP-Originating-Script (UID:file, PHP's mail.add_x_header), else the command "
               "line of the program that ran sendmail")


def _report_time(text: str, now: float, option: str) -> float:
    from .ledger import InvalidInput, parse_since

    try:
        return parse_since(text, now)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@cli.command("report", epilog=example("sendmail-shim report --since 24h --by script"))
@click.option("--since", "since_text", default="24h", show_default=True, metavar="WHEN",
              help="Start: a duration before now (24h, 7d, 30m) or an ISO 8601 time (UTC unless it says).")
@click.option("--until", "until_text", metavar="WHEN", help="End, in the same forms; default now.")
@click.option("--by", "by", type=click.Choice(["account", "customer", "script", "uid"]), default="account",
              show_default=True, help="What each line is.")
@json_option
@pass_state
def report(state: State, since_text: str, until_text: str | None, by: str, as_json: bool) -> None:
    """Sent, queued, refused (by reason) and bounced mail, recipients and the top scripts, per group.

    Groups with the most mail (sent and queued) come first. Bounced counts the recipients the queue
    gave up on in the range. The script is the X-PHP-Originating-Script header when PHP adds it
    (mail.add_x_header = On), else the program that ran sendmail (see the admin guide).
    """
    now = time.time()
    since = _report_time(since_text, now, "--since")
    until = _report_time(until_text, now, "--until") if until_text else now
    if since >= until:
        raise click.BadParameter("the start must be before the end", param_hint="--since")
    found = state.ledger.report(by, since, until)
    show(as_json, report_doc(found), report_lines(found))


def report_doc(found: Any) -> dict[str, Any]:
    from .ledger.report import by_reason

    groups = [{"key": g.key, "sent": g.sent, "queued": g.queued,
               "refused": {"total": g.refused, "by_reason": by_reason(g)}, "bounced": g.bounced,
               "recipients": g.recipients, "users": sorted(g.users),
               "top_scripts": [{"script": name, "messages": n} for name, n in g.top_scripts]}
              for g in found.groups]
    return {"by": found.by, "since": iso(found.since), "until": iso(found.until), "groups": groups}


def report_lines(found: Any) -> list[str]:
    from .ledger import format_utc
    from .ledger.report import by_reason

    lines = [f"{found.by} report, {format_utc(found.since)} to {format_utc(found.until)}"]
    if not found.groups:
        return [*lines, "no mail in this time"]
    keys = [str(g.key) if g.key is not None else "(none)" for g in found.groups]
    width = max(len(found.by), *(len(k) for k in keys))
    heads = ("SENT", "QUEUED", "REFUSED", "BOUNCED", "RECIPIENTS")
    lines.append(f"{found.by.upper():<{width}}  " + "  ".join(f"{h:>7}" for h in heads) + "  USERS")
    for key, g in zip(keys, found.groups, strict=True):
        counts = (g.sent, g.queued, g.refused, g.bounced, g.recipients)
        users = ", ".join(sorted(g.users)) or "-"
        lines.append(f"{key:<{width}}  " + "  ".join(f"{n:>{max(7, len(h))}}" for n, h in zip(counts, heads,
                                                                                              strict=True))
                     + f"  {users}")
        if g.refused:
            lines.append("    refused: " + ", ".join(f"{reason} {n}" for reason, n in by_reason(g).items()))
        if g.top_scripts and found.by != "script":
            lines.append("    scripts: " + ", ".join(f"{name} ({n})" for name, n in g.top_scripts))
    return [*lines, "", SCRIPT_NOTE]


# ----------------------------------------------------------------- config


@cli.group(epilog=example("sendmail-shim config check"))
def config() -> None:
    """The configuration file."""


@config.command("check", epilog=example(
    "SENDMAIL_SHIM_CONFIG=/etc/sendmail-shim/config.toml sendmail-shim config check"))
@json_option
@pass_state
def config_check(state: State, as_json: bool) -> None:
    """Validate the config file; check that the ledger is current and [gate] user can write [log] file.

    With [gate] socket set, it also asks the running gate (as root or the gate's user)
    whether it runs this file as it is now, and notes on stderr when it does not (the
    file changed and was not reloaded, or a change needs a restart). That note does not
    change the exit code, so `config check && systemctl reload sendmail-shim-gate` works.
    """
    from .ledger import LedgerError

    loaded = state.config
    problems = _file_problems(loaded)
    code = EX_CONFIG if problems else EX_OK
    try:
        status = state.ledger.schema_status()
        if status.pending or status.unknown:
            problems.append(f"the ledger {state.ledger.where} is not current; "
                            f"run: sendmail-shim db upgrade")
            code = code or EX_CONFIG
    except LedgerError as exc:
        problems.append(str(exc))
        code = code or exit_code_for(exc)
    summary = _config_summary(loaded)
    gate = _running_gate(loaded)
    text = [f"{loaded.path}: {'ok' if not problems else 'problems found'}",
            *[f"  {key}: {value}" for key, value in summary.items()],
            *([f"  running gate: {gate['found']}"] if gate else [])]
    show(as_json, {"ok": not problems, "config": loaded.path, "summary": summary,
                   "problems": problems, "gate": gate}, text)
    for problem in problems:
        click.echo(f"{PROG}: {problem}", err=True)
    if gate and gate["differs"]:
        # A note, not a failure: `config check && systemctl reload sendmail-shim-gate` must keep working.
        click.echo(f"{PROG}: note: {gate['found']}; {gate['fix']}", err=True)
    if code:
        raise SystemExit(code)


def _config_summary(loaded: Config) -> dict[str, Any]:
    from .ledger import Ledger

    return {
        "upstream": f"{loaded.upstream.host}:{loaded.upstream.port}",
        "ledger": Ledger(loaded.ledger.url).where,
        "spf": ("relay IPs " + ", ".join(loaded.spf.relay_ips)
                if loaded.spf.enabled else "disabled"),
        "account_limits": [str(r) for r in loaded.limits.account],
        "customer_limits": [str(r) for r in loaded.limits.customer],
        "gate": loaded.gate.socket or "off (in-process)",
        "metrics": loaded.metrics.listen or "off",
        "abuse": _abuse_summary(loaded),
        "notify": _notify_summary(loaded),
    }


def _abuse_summary(loaded: Config) -> str:
    from .limits import describe_window

    cfg = loaded.abuse
    if not cfg.enabled:
        return "off (no automatic blocks)"
    return (f"block at a share of {cfg.failed_share:g} failed or deferred recipients (at least {cfg.failed_min}) "
            f"in {describe_window(cfg.failed_window)}, or more than {cfg.limit_refusals} refusals by the limits "
            f"in {describe_window(cfg.limit_window)}")


def _notify_summary(loaded: Config) -> str:
    notify = loaded.notify
    if notify is None:
        return "off"
    admin = f", admin {', '.join(notify.admin)}" if notify.admin else ""
    templates = f", templates from {notify.templates}" if notify.templates else ""
    return f"from {notify.sender}{admin}, warn at {notify.warn_at:g}, language {notify.language}{templates}"


def _running_gate(loaded: Config) -> dict[str, Any] | None:
    """Whether the gate on ``[gate] socket`` runs this file as it is now (None: no gate configured)."""
    from . import gate_client

    if not loaded.gate.socket:
        return None
    target = gate_client.GateTarget(loaded.gate.socket, 5.0, gate_user=loaded.gate.user)
    try:
        status = gate_client.ask(target, "status")
    except gate_client.GateClientError as exc:
        return {"running": False, "differs": False, "found": f"not asked ({str(exc).removeprefix('not sent: ')})",
                "fix": None}
    drift = gate_client.config_drift(status)
    if drift is None:
        return {"running": True, "differs": False, "found": f"runs this file as it is now (pid {status.get('pid')})",
                "fix": None}
    return {"running": True, "differs": True, "found": drift[0], "fix": drift[1]}


def _file_problems(loaded: Config) -> list[str]:
    """Files the config names that the services could not use."""
    problems = []
    if loaded.upstream.ca_file and not os.access(loaded.upstream.ca_file, os.R_OK):
        problems.append(f"upstream.ca_file: {loaded.upstream.ca_file} cannot be read")
    if loaded.upstream.password_file:
        from .config import ConfigError, check_private_file

        try:
            check_private_file(loaded.path, "upstream.password_file", loaded.upstream.password_file)
        except ConfigError as exc:
            problems.append(f"{exc.key}: {exc.problem}")
    problem = _log_file_problem(loaded)
    if problem is not None:
        problems.append(problem)
    return problems


def _log_file_problem(loaded: Config) -> str | None:
    """Whether the gate's user ([gate] user, else whoever runs this) can write [log] file."""
    import pwd

    from .config import ConfigError
    from .maillog import require_writable_by
    from .trust import Identity

    try:
        if loaded.gate.user is not None:
            entry = pwd.getpwnam(loaded.gate.user)
            # The gate drops its supplementary groups: only the user's own group counts.
            require_writable_by(loaded, entry.pw_name, entry.pw_uid, [entry.pw_gid])
        else:
            me = Identity.of_uid(os.geteuid()).name
            require_writable_by(loaded, me, os.geteuid(), [os.getegid(), *os.getgroups()])
    except KeyError:
        return f"gate.user: {loaded.gate.user}: no Unix user of that name"
    except ConfigError as exc:
        return f"{exc.key}: {exc.problem}"
    return None


def main() -> None:
    """Console script entry point."""
    cli.main(prog_name=PROG)


# ----------------------------------------------------------------- spf


@cli.group(epilog=example("sendmail-shim spf check kunde.example"))
def spf() -> None:
    """The SPF records of senders' domains."""


@spf.command("check", epilog=example("sendmail-shim spf check kunde.example --ip 192.0.2.25 --json"))
@click.argument("domain")
@click.option("--ip", "ips", multiple=True, metavar="IP",
              help="Relay address to check (repeatable; default: [spf] relay_ips).")
@json_option
@pass_state
def spf_check(state: State, domain: str, ips: tuple[str, ...], as_json: bool) -> None:
    """Evaluate DOMAIN's SPF record for the relay addresses, with a trace of every term.

    Exit 0 when every address gets an accepted result ([spf] accept), 77 when one does not,
    69 when DNS could not answer.
    """
    import ipaddress

    from . import spf as spf_stage
    from .dnsclient import NetworkResolver

    cfg = state.config.spf
    addresses = ips or cfg.relay_ips
    if not addresses:
        raise click.UsageError("no address to check: give --ip or set [spf] relay_ips")
    for ip in addresses:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise click.UsageError(f"{ip!r} is not an IP address") from None
    resolver = NetworkResolver.from_config(cfg.nameservers, cfg.timeout)
    report = spf_stage.report(domain, addresses, resolver=resolver, budget=cfg.timeout)
    show(as_json, report.as_dict(), report.as_text())
    results = set(report.results.values())
    if spf_stage.TEMPERROR in results:
        raise SystemExit(EX_UNAVAILABLE)
    if not results <= (set(cfg.accept) - {spf_stage.TEMPERROR}):
        raise SystemExit(EX_NOPERM)


# ----------------------------------------------------------------- queue


@cli.group(epilog=example("sendmail-shim queue list"))
def queue() -> None:
    """Messages waiting for the upstream."""


def _queue_line(entry: Any) -> str:
    pending = sum(1 for r in entry.recipients if r.state == "pending")
    when = f"next {iso(entry.next_attempt_at)}" if entry.state in ("queued", "uncertain") else entry.state
    if entry.state == "uncertain":
        when = f"uncertain, {when}"
    return (f"{entry.id}  {entry.kind:<7} from {entry.sender or '<>'}  {pending}/{len(entry.recipients)} "
            f"pending  attempts {entry.attempts}  {when}  {entry.last_error or ''}").rstrip()


@queue.command("list", epilog=example("sendmail-shim queue list --json"))
@click.option("--all", "include_done", is_flag=True, help="Include finished messages.")
@json_option
@pass_state
def queue_list(state: State, include_done: bool, as_json: bool) -> None:
    """List queued messages: id, sender, recipients pending, attempts, state or next attempt, last error."""
    from . import queue as queue_stage

    entries = queue_stage.list_queue(state.ledger, include_done=include_done)
    show(as_json, [e.as_dict() for e in entries], [_queue_line(e) for e in entries] or ["the queue is empty"])


@queue.command("show", epilog=example("sendmail-shim queue show q0123456789abcdef0123"))
@click.argument("queue_id", metavar="ID")
@json_option
@pass_state
def queue_show(state: State, queue_id: str, as_json: bool) -> None:
    """One queued message with the state of each recipient."""
    from . import queue as queue_stage

    entry = queue_stage.show(state.ledger, queue_id)
    lines = [_queue_line(entry), f"  message-id {entry.message_id}  {entry.size} bytes  "
             f"queued {iso(entry.created_at)}"]
    lines += [f"  {r.address}: {r.state}" + (f" ({r.code} {r.reply})" if r.code else "") for r in entry.recipients]
    show(as_json, entry.as_dict(), lines)


@queue.command("delete", epilog=example("sendmail-shim queue delete q0123456789abcdef0123"))
@click.argument("queue_id", metavar="ID")
@json_option
@pass_state
def queue_delete(state: State, queue_id: str, as_json: bool) -> None:
    """Drop a queued message without sending it (it stops counting against the limits)."""
    from . import queue as queue_stage

    entry = queue_stage.delete(state.ledger, queue_id)
    show(as_json, {"deleted": entry.id}, f"deleted {entry.id}")


@queue.command("run", epilog=example("sendmail-shim queue run --now"))
@click.option("--now", "ignore_backoff", is_flag=True, help="Try every queued message once, ignoring the backoff.")
@json_option
@pass_state
def queue_run(state: State, ignore_backoff: bool, as_json: bool) -> None:
    """Deliver what is due. Any number of runners may run at once; each message is sent once."""
    from . import queue as queue_stage
    from .relay import Upstream

    config = state.config
    upstream = Upstream(config.upstream, config.path)
    report = queue_stage.Runner(state.ledger, upstream, config.queue, now=ignore_backoff, log=config.log).run()
    show(as_json, report.as_dict(),
         f"{report.messages} message(s) tried: {report.delivered} recipient(s) delivered, "
         f"{report.deferred} deferred, {report.failed} failed, {report.bounces} bounce(s) queued"
         + (f", {report.uncertain} unanswered after the end of data ({report.held} held)" if report.uncertain
            else ""))


# ----------------------------------------------------------------- serve


@cli.command("serve", epilog=example("sendmail-shim serve --user sendmail-shim"))
@click.option("--user", "user", metavar="USER",
              help="Started as root: the user to become once the start checks are done (the gate's user).")
@json_option
@pass_state
def serve(state: State, user: str | None, as_json: bool) -> None:
    """Run the gate: the local service that sendmail hands each message to (see docs/gate.md).

    It listens on [gate] socket, or on the socket systemd passes, and runs until SIGTERM,
    which lets the messages in progress finish first. It starts only when sites cannot
    reach the relay without it: the relay requires AUTH (credentials only the gate's user
    can read), or [gate] egress = "restricted" and the firewall lets only the gate's user
    reach the relay, or [gate] trust = "single-tenant". It refuses to run as root: started
    as root, it needs --user. It will not start when its user cannot append to [log] file.

    SIGHUP (systemctl reload) reads the config file again: messages in progress finish with
    the config they started with, new ones get the new one. A file that does not load, or a
    new upstream that fails the trust checks of the start, is logged and the running config
    kept. [gate] socket, user, backlog, egress, trust, upload_memory, max_uploads_per_uid
    and all of [ledger] need a restart; a reload logs them as such and keeps their running
    values.

    At start the gate logs each message a previous run was relaying when it died as
    event=gate-outcome-unknown (Message-ID, uid, account), once; each counts until
    [ledger] reservation_timeout.
    """
    from .gate import serve as run_gate

    code = run_gate(state.config, user=user)
    show(as_json, {"ok": code == EX_OK, "exit_code": code}, "the gate has stopped")
    raise SystemExit(code)


# ----------------------------------------------------------------- metrics


@cli.group(epilog=example("sendmail-shim metrics show"))
def metrics() -> None:
    """Prometheus metrics from the ledger, for servers without the gate (docs/metrics.md)."""


@metrics.command("show", epilog=example("sendmail-shim metrics show --json"))
@json_option
@pass_state
def metrics_show(state: State, as_json: bool) -> None:
    """Print what the ledger knows as Prometheus text: the queue, the customers closest to a limit
    ([metrics] top_customers of them, the rest as "(other)"), and the decisions of the last hour
    and day. The gate serves its own counters besides on [metrics] listen.
    """
    from .gauges import build_info, ledger_families
    from .metrics import render

    families = [build_info(), *ledger_families(state.ledger, state.config.metrics.top_customers, recent=True)]
    if as_json:
        show(True, {"generated_at": iso(time.time()), "metrics": [f.as_dict() for f in families]}, "")
    else:
        click.echo(render(families), nl=False)


@metrics.command("write", epilog=example("sendmail-shim metrics write --textfile "
                                         "/var/lib/prometheus/node-exporter/sendmail-shim.prom"))
@click.option("--textfile", metavar="PATH", help="Where to write (default: [metrics] textfile); must end in .prom.")
@json_option
@pass_state
def metrics_write(state: State, textfile: str | None, as_json: bool) -> None:
    """Write `metrics show`'s text for node-exporter's textfile collector, atomically.

    The file is written beside its final name and renamed over it, so the collector never
    reads half of it; it is mode 0644. The packaged sendmail-shim-metrics.timer runs this
    every minute once enabled.
    """
    from .gauges import textfile as textfile_text
    from .metrics import write_textfile

    path = textfile or state.config.metrics.textfile
    if path is None:
        raise click.UsageError("no textfile: give --textfile PATH or set [metrics] textfile")
    if not path.endswith(".prom"):
        raise click.UsageError(f"{path}: node-exporter's textfile collector reads only files ending in .prom")
    text = textfile_text(state.ledger, state.config.metrics.top_customers)
    try:
        write_textfile(path, text)
    except OSError as exc:
        raise click.ClickException(f"cannot write {path} ({exc.strerror})") from None
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    show(as_json, {"ok": True, "textfile": path, "series": series, "written_at": iso(time.time())},
         f"wrote {series} series to {path}")


# ----------------------------------------------------------------- doctor


@cli.command("doctor", epilog=example("sendmail-shim doctor --json"))
@click.option("--gate-user", metavar="USER",
              help="The gate's Unix user (default: [gate] user, else sendmail-shim).")
@json_option
@pass_state
def doctor(state: State, gate_user: str | None, as_json: bool) -> None:
    """Check the installation the way a hostile site would: run it as root.

    One line per check: ok, warn or fail, what was found, and the fix. It tries the relay
    as an unprivileged user without AUTH, checks the modes and owners of the ledger, queue,
    password file, log, config and the socket's directories, asks the running gate which
    config it runs, and checks every Unix-user binding, every registered domain's SPF and
    the relay's certificate. Nothing is changed and no mail is sent. Exit 0 unless a check
    fails (78).
    """
    from . import doctor as doctor_stage

    config = state.config
    user = gate_user or config.gate.user or "sendmail-shim"
    checks = doctor_stage.examine(config, user)
    bad = doctor_stage.failed(checks)
    show(as_json, {"ok": not bad, "checked_at": iso(time.time()), "config": config.path, "gate_user": user,
                   "checks": [check.as_dict() for check in checks]}, [check.line for check in checks])
    if bad:
        raise SystemExit(EX_CONFIG)
