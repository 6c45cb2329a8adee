"""`make bench`: whole-process times of `sendmail` against msmtp, side by side in one run.

All relay the same message to the same loopback STARTTLS upstream (aiosmtpd with a
trustme certificate), interleaved call by call so that machine noise hits all alike.
`sendmail` runs in-process (no gate) with an SQLite ledger and SPF checked against a DNS
server on loopback, once with the SPF verdict cached in the ledger (the usual case) and
once with the cache off (every call asks DNS). Figures are printed as a table and written
as JSON (build/bench/relay.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402

from sendmail_shim.ledger import Ledger  # noqa: E402
from tests.support.dnsserver import DnsServer  # noqa: E402
from tests.support.shim import dump_toml  # noqa: E402
from tests.support.upstream import SmtpUpstream, write_ca  # noqa: E402

MESSAGE = (
    b"To: ola@x.example\r\nSubject: Bench\r\nFrom: Kunde <post@kunde.example>\r\n\r\n"
    + b"A line of an ordinary contact-form message.\n" * 40
)
# What PHPMailer writes for a small newsletter from a Latin-1 site: 100 named To on one line
# (folded for the upstream) and a Subject in ISO-8859-1 (decoded, then sent as UTF-8).
REPAIRED_MESSAGE = (
    b"To: " + b", ".join(b"Mottaker nummer %d <m%d@x.example>" % (i, i) for i in range(100))
    + b"\nSubject: Gr\xfc\xdfe aus K\xf6ln\nFrom: Kunde <post@kunde.example>\n"
    b"Content-Type: text/plain; charset=ISO-8859-1\n\n" + b"A line of an ordinary newsletter.\n" * 40
)


def installed_sendmail() -> str:
    """A regular (non-editable) install with compiled bytecode, as a package would ship it."""
    venv = ROOT / "build/bench/venv"
    if not (venv / "bin/python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "--force-reinstall", "--no-deps", str(ROOT)],
                   check=True, env=env)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", str(ROOT) + "[postgresql]"], check=True, env=env)
    subprocess.run([str(venv / "bin/python"), "-m", "compileall", "-q", str(venv / "lib")], env=env)
    return str(venv / "bin/sendmail")


def bench_env(config: Path) -> dict[str, str]:
    env = dict(os.environ, SENDMAIL_SHIM_CONFIG=str(config))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def msmtp_config(directory: Path, port: int, ca_file: Path) -> Path:
    path = directory / "msmtprc"
    path.write_text(
        "defaults\ntls on\ntls_starttls on\n"
        f"tls_trust_file {ca_file}\n\naccount default\nhost 127.0.0.1\nport {port}\n"
        "from post@kunde.example\nauth off\n"
    )
    path.chmod(0o600)
    return path


def shim_config(directory: Path, port: int, ca_file: Path, nameserver: str, name: str,
                cache_max_ttl: int) -> Path:
    """A config whose limits the benchmark cannot reach, with the account registered."""
    url = f"sqlite:///{directory / name}.db"  # a ledger each: the SPF cache lives in it
    sections = {
        "upstream": {"host": "127.0.0.1", "port": port, "ca_file": str(ca_file)},
        "ledger": {"url": url},
        "spf": {"relay_ips": ["127.0.0.1"], "nameservers": [nameserver], "cache_max_ttl": cache_max_ttl},
        "limits": {"account": ["1000000 messages / 5m"], "customer": ["1000000 messages / 1h"]},
        "log": {"syslog": False},
    }
    path = directory / f"{name}.toml"
    path.write_text(dump_toml(sections))
    ledger = Ledger(url)
    if not ledger.schema_status().applied:
        ledger.upgrade()
        ledger.add_customer("kunde")
        ledger.add_account("post@kunde.example", "kunde", authenticated=True)
    return path


def timed(command: list[str], env: dict[str, str], message: bytes = MESSAGE) -> float:
    """Wall time of one whole process, from fork to exit, fed the same message."""
    started = time.perf_counter()
    proc = subprocess.run(command, input=message, capture_output=True, env=env)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({proc.returncode}): {proc.stderr.decode().strip()}")
    return elapsed


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p90_ms": round(ordered[int(len(ordered) * 0.9) - 1] * 1000, 1),
        "min_ms": round(ordered[0] * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--out", default=str(ROOT / "build/bench/relay.json"))
    args = parser.parse_args()
    msmtp = shutil.which("msmtp")
    if not msmtp:
        raise SystemExit("msmtp is needed for the comparison (apt-get install msmtp)")
    sendmail = installed_sendmail()
    ca = trustme.CA()
    zone = {"kunde.example": [{"TXT": "v=spf1 ip4:127.0.0.1 -all"}]}
    with tempfile.TemporaryDirectory() as tmp, SmtpUpstream(ca) as upstream, DnsServer(zone) as dns:
        directory = Path(tmp)
        ca_file = write_ca(ca, directory)
        cached = bench_env(shim_config(directory, upstream.port, ca_file, dns.nameserver, "cached", 3600))
        uncached = bench_env(shim_config(directory, upstream.port, ca_file, dns.nameserver, "uncached", 0))
        commands = {
            "msmtp": ([msmtp, "-C", str(msmtp_config(directory, upstream.port, ca_file)), "-t"], cached, MESSAGE),
            "sendmail-shim in-process": ([sendmail, "-t", "-i"], cached, MESSAGE),
            "  same, SPF not cached": ([sendmail, "-t", "-i"], uncached, MESSAGE),
            "  same, 100 To + Latin-1": ([sendmail, "-t", "-i"], cached, REPAIRED_MESSAGE),
        }
        for command, env, message in commands.values():  # warm the page cache and the SPF cache once
            timed(command, env, message)
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.calls):
            for name, (command, env, message) in commands.items():
                samples[name].append(timed(command, env, message))
        delivered = len(upstream.wait_for(len(commands) * (args.calls + 1)))
    results = {name: summary(values) for name, values in samples.items()}
    base = results["msmtp"]["median_ms"]
    print(f"{'command (whole process)':<30}{'median ms':>10}{'p90 ms':>9}{'min ms':>9}{'x msmtp':>9}")
    for name, figures in results.items():
        ratio = figures["median_ms"] / base
        print(f"{name:<30}{figures['median_ms']:>10}{figures['p90_ms']:>9}{figures['min_ms']:>9}{ratio:>9.2f}")
    print(f"({args.calls} calls each, interleaved; {delivered} messages reached the upstream)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"calls": args.calls, "results": results}, indent=2))


if __name__ == "__main__":
    main()
