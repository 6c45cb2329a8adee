"""`make demo`: the main job on the embedded default, end to end on loopback.

It starts a STARTTLS upstream (aiosmtpd with a throwaway certificate authority) and a
small DNS server holding the customer's SPF record, writes a config with an SQLite
ledger, registers a customer and its account with the admin CLI, then lets PHP's
mail() pipe a message through `sendmail -t -i` and shows what arrived upstream.
It finishes with two refusals, so you can see what a site sees when mail is refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402

from tests.support.dnsserver import DnsServer  # noqa: E402
from tests.support.shim import ADMIN, SENDMAIL, dump_toml  # noqa: E402
from tests.support.upstream import SmtpUpstream, write_ca  # noqa: E402

PHP_CODE = r"""
$ok = mail("ola@example.org", "Hei fra kontaktskjemaet", "Hei!\nDette er en test.\n.\nHilsen nettsiden\n",
           "From: Kunde AS <post@kunde.example>\r\nBcc: arkiv@kunde.example");
var_dump($ok);
"""


def step(title: str) -> None:
    print(f"\n== {title}")


def run(command: list[str], env: dict[str, str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    shown = " ".join(Path(c).name if c in (SENDMAIL, ADMIN) else c for c in command)
    print(f"$ {shown}")
    proc = subprocess.run(command, input=stdin, capture_output=True, env=env)
    output = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    if output:
        print("  " + output.replace("\n", "\n  "))
    print(f"  (exit {proc.returncode})")
    return proc


def main() -> int:
    ca = trustme.CA()
    zone = {"kunde.example": [{"TXT": "v=spf1 ip4:127.0.0.1 -all"}],
            "annen.example": [{"TXT": "v=spf1 ip4:192.0.2.99 -all"}]}
    with tempfile.TemporaryDirectory() as tmp, SmtpUpstream(ca) as upstream, DnsServer(zone) as dns:
        directory = Path(tmp)
        config = directory / "config.toml"
        config.write_text(dump_toml({
            "upstream": {"host": "127.0.0.1", "port": upstream.port, "ca_file": str(write_ca(ca, directory))},
            "ledger": {"url": f"sqlite:///{directory / 'ledger.db'}"},
            "spf": {"relay_ips": ["127.0.0.1"], "nameservers": [dns.nameserver],
                    "hint": "include:_spf.provider.example"},
            "log": {"syslog": False, "file": str(directory / "mail.log")},
        }))
        env = dict(os.environ, SENDMAIL_SHIM_CONFIG=str(config))
        user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()

        step("The admin sets up the ledger, a customer bound to this Unix user, and its account")
        run([ADMIN, "db", "upgrade"], env)
        run([ADMIN, "customer", "add", "kunde", "--unix-user", user], env)
        run([ADMIN, "account", "add", "post@kunde.example", "--customer", "kunde"], env)
        run([ADMIN, "account", "authenticate", "post@kunde.example"], env)
        run([ADMIN, "account", "add", "post@annen.example", "--customer", "kunde"], env)
        run([ADMIN, "account", "authenticate", "post@annen.example"], env)

        step("The site calls PHP mail(); sendmail_path is 'sendmail -t -i'")
        php = shutil.which("php")
        if php:
            print(f"$ php -d sendmail_path='sendmail -t -i' -r '{PHP_CODE.strip()}'")
            proc = subprocess.run([php, "-d", f"sendmail_path={SENDMAIL} -t -i", "-r", PHP_CODE],
                                  capture_output=True, text=True, env=env)
            print("  " + (proc.stdout + proc.stderr).strip())
        else:
            message = (b"To: ola@example.org\r\nSubject: Hei fra kontaktskjemaet\r\n"
                       b"From: Kunde AS <post@kunde.example>\nBcc: arkiv@kunde.example\r\n\r\nHei!\n")
            run([SENDMAIL, "-t", "-i"], env, message)

        step("What arrived at the upstream (over STARTTLS)")
        for got in upstream.wait_for(1):
            print(f"  MAIL FROM:<{got.mail_from}>  RCPT TO: {', '.join(got.rcpt_tos)}  TLS: {got.tls}")
            print("  " + got.data.decode(errors="replace").replace("\r\n", "\n  ").rstrip())

        step("Refusals: the customer's other domain, whose SPF record does not name the relay; a -X option")
        run([SENDMAIL, "-t", "-i"], env, b"From: post@annen.example\nTo: ola@example.org\n\nhei\n")
        run([SENDMAIL, "-t", "-i", "-X/var/www/shell.php"], env, b"To: ola@example.org\n\nhei\n")

        step("The admin's view: usage of the account, and the decision log")
        run([ADMIN, "usage", "--account", "post@kunde.example"], env)
        print("  " + (directory / "mail.log").read_text().strip().replace("\n", "\n  "))
        return 0 if upstream.received else 1


if __name__ == "__main__":
    sys.exit(main())
