"""The egress rule for real: run as root inside a network namespace of its own (``unshare -n``).

    unshare -n python tests/gate/egress_netns.py SETTINGS.json

It brings up loopback, loads the shipped nftables file (naming the test's gate user
instead of sendmail-shim), starts a relay that trusts every local address (no AUTH at
all) on port 25, and a gate with ``[gate] egress = "restricted"`` started as root with
``--user``. Then: a site's own SMTP connect to the relay, the gate user's, a message
through the gate; the same with the rule removed. The findings go to stdout as JSON.
Nothing here touches the machine's own network: the namespace ends with the process.
"""

from __future__ import annotations

import json
import pwd
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402

from tests.gate.deployment import Deployment, Interpreter, User, Users, message  # noqa: E402
from tests.support.upstream import SmtpUpstream  # noqa: E402

RULE_FILE = ROOT / "packaging" / "nftables" / "egress.nft"
CONNECT = """
import socket
try:
    socket.create_connection(("127.0.0.1", 25), timeout=5).close()
    print("connected")
except OSError as exc:
    print(exc.strerror or type(exc).__name__)
"""


def user(name: str) -> User:
    entry = pwd.getpwnam(name)
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid)


def main() -> None:
    settings = json.loads(Path(sys.argv[1]).read_text())
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    users = Users(*(user(settings["users"][role]) for role in ("gate", "a", "b", "c")))
    rule = Path(settings["workdir"]) / "egress.nft"
    rule.write_text(RULE_FILE.read_text().replace('"sendmail-shim"', f'"{users.gate.name}"'))
    ca = trustme.CA()
    with SmtpUpstream(ca, port=25) as relay:  # first: its start-up check connects as root, whom the rule rejects
        loaded = subprocess.run(["nft", "-f", str(rule)], capture_output=True, text=True)
        found: dict[str, object] = {"nft": loaded.returncode, "nft_error": loaded.stderr.strip()}
        dep = Deployment(users, Interpreter(**settings["interpreter"]), 25, ca.cert_pem.bytes(), credentials=False)
        try:
            dep.install_ledger(Path(settings["ledger_template"]))
            dep.configure("gate", egress="restricted")
            found["site_connect"] = dep.run_as(users.a, CONNECT).stdout.decode().strip()
            found["gate_user_connect"] = dep.run_as(users.gate, CONNECT).stdout.decode().strip()
            dep.start_gate(as_root=True)
            found["started"] = dep.wait_for_log("event=gate-trust-verified")
            sent = dep.sendmail("-t", "-i", input=message(), user=users.a)
            found["sendmail"] = [sent.code, sent.line]
            found["relayed"] = [r.mail_from for r in relay.received]
            found["relayed_as_gate_user"] = any(f"userid {users.a.uid}" in r.data.decode() for r in relay.received)
            dep.stop_gate()
            subprocess.run(["nft", "delete", "table", "inet", "sendmail_shim_egress"], check=True)
            found["site_connect_without_rule"] = dep.run_as(users.a, CONNECT).stdout.decode().strip()
            try:
                dep.start_gate(as_root=True)
                found["without_rule"] = "started"
            except RuntimeError as exc:
                found["without_rule"] = str(exc).split(":")[0]
                found["without_rule_error"] = dep.gate_errors()
        finally:
            dep.close()
    found["host_name"] = socket.gethostname()
    print(json.dumps(found))


if __name__ == "__main__":
    main()
