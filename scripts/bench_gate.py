"""Benchmark: ``sendmail`` through the gate against msmtp, on one loopback STARTTLS upstream.

Usage: python scripts/bench_gate.py OUTPUT.json [--calls N] [--burst N] [--parallel N] [--callers N]
       [--uploads N]

Side by side in one run, every client relaying the same message to the same
aiosmtpd upstream (STARTTLS, certificate verified):

* msmtp as shipped, and msmtp "stall-free": the same binary with a tiny
  LD_PRELOAD library (built here with gcc) that sets TCP_NODELAY on its TCP
  sockets, which removes the Nagle/delayed-ACK stalls against this upstream;
* ``sendmail`` through the gate: the native client (native/, built here with
  the package's flags, as /usr/sbin/sendmail is), the Python fast path as
  the package's front end runs it (the system's python3 with -IS, when it is
  of this version), and the console script of the development install;
* ``sendmail`` in-process (no gate), for reference.

Figures: the median time per call (whole process, calls interleaved across
the clients), messages per second for ``--burst`` calls ``--parallel`` at a
time, the client's peak RSS (GNU time), the gate's peak RSS after
``--callers`` callers at once, and its peak RSS (``VmHWM``) after ``--uploads``
uploads of 10 MB from one customer in parallel with ``--callers`` small callers
(the goal: 150 MB). A table goes to stdout, the figures and the
goals to OUTPUT.json. ``--profile FILE`` runs each of the gate's connections
under cProfile and writes the merged profile (pstats) there, to show where the
gate's share goes (the figures of such a run are slower than without it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import native  # noqa: E402
from tests.support.shim import ADMIN, SENDMAIL, dump_toml  # noqa: E402
from tests.support.upstream import SmtpUpstream, write_ca  # noqa: E402

NODELAY_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

/* socket(2) as usual, then TCP_NODELAY on every TCP socket: no Nagle stalls. */
int socket(int domain, int type, int protocol) {
    static int (*real_socket)(int, int, int);
    if (!real_socket)
        real_socket = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
    int fd = real_socket(domain, type, protocol);
    int base_type = type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0 && (domain == AF_INET || domain == AF_INET6) && base_type == SOCK_STREAM) {
        int on = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    }
    return fd;
}
"""

LAUNCHER = """\
import sys
from sendmail_shim.sendmail import main
main()
"""
# The gate with each connection (and each batch of the recorder) under cProfile, the profiles
# merged into one pstats file at exit: what the gate's share of a call is spent on (cProfile
# alone sees only the main thread, which only accepts).
PROFILED_GATE = """\
import atexit, cProfile, pstats, sys, threading
from sendmail_shim.gate import connection, recorder, service
profiles, lock = [], threading.Lock()
def profiled(work):
    def run(*args):
        profile = cProfile.Profile()
        profile.enable()
        try:
            return work(*args)
        finally:
            profile.disable()
            with lock:
                profiles.append(profile)
    return run
def dump(path=sys.argv.pop(1)):
    if profiles:
        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            stats.add(profile)
        stats.dump_stats(path)
connection.Connection.serve = profiled(connection.Connection.serve)
recorder.record_together = profiled(recorder.record_together)  # the recorder's work, after the answers
atexit.register(dump)
service.main()
"""
MESSAGE = (b"From: Kunde <post@a.example>\nTo: ola@x.example\nSubject: Kontaktskjema\n\n"
           + b"Hei,\n\nDette er en melding fra kontaktskjemaet.\n" * 20)
GENEROUS = ["1000000 messages / 5m", "1000000 recipients / 5m"]
NATIVE = "sendmail native via gate"  # the client the goals are set for
# The product's goals for the gate path (PRODUCT.md, "Performance").
GOAL_PER_CALL_VS_STALL_FREE = 0.6
GOAL_PER_CALL_VS_MSMTP = 0.1
GOAL_THROUGHPUT_VS_STALL_FREE = 1.5
GOAL_CLIENT_MB = 2
GOAL_GATE_MB = 150
BIG_MESSAGE_BYTES = 10_000_000  # "16 x 10 MB uploads in parallel plus 50 small callers"


def big_message(number: int) -> bytes:
    """A 10 MB message as a site's upload form writes it: a base64 attachment, LF line ends."""
    import base64

    head = (b"From: Kunde <post@a.example>\nTo: ola@x.example\nSubject: Vedlegg %d\nMIME-Version: 1.0\n"
            b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n" % number)
    body = base64.encodebytes(os.urandom((BIG_MESSAGE_BYTES - len(head)) * 3 // 4 - 1024))
    return head + body


@dataclass
class Client:
    name: str
    argv: list[str]
    env: dict[str, str]
    times: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def call(self, message: bytes = MESSAGE) -> float:
        started = time.perf_counter()
        proc = subprocess.run(self.argv, input=message, capture_output=True, env=self.env, timeout=300)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            self.failures.append(f"exit {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}")
        return elapsed


GATE_USER = "nobody"  # the gate's own user when the benchmark runs as root (serve refuses root)


class Bench:
    def __init__(self, workdir: Path, upstream: SmtpUpstream, ca_file: Path, profile: Path | None = None) -> None:
        self.dir, self.upstream, self.ca_file = workdir, upstream, ca_file
        self.profile = profile
        self.base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        # Byte-code caching on, as an installed package has it, without writing into the source tree.
        self.base_env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
        self.gate: subprocess.Popen[bytes] | None = None

    # -------------------------------------------------------------- set-up

    def config(self, name: str, gate: bool) -> Path:
        sections: dict[str, dict[str, Any]] = {
            "upstream": {"host": "127.0.0.1", "port": self.upstream.port, "ca_file": str(self.ca_file)},
            "ledger": {"url": f"sqlite:///{self.dir / (name + '.db')}"},
            "spf": {"enabled": False},
            "limits": {"account": GENEROUS, "customer": GENEROUS},
            "log": {"syslog": False, "file": str(self.dir / (name + '.log'))},
        }
        if gate:
            # The upstream here takes mail without AUTH: one customer on one machine.
            sections["gate"] = {"socket": str(self.socket), "max_connections_per_uid": 96,
                                "trust": "single-tenant"}
            if os.geteuid() == 0:  # as packaged: sendmail checks the peer against [gate] user
                sections["gate"]["user"] = GATE_USER
        path = self.dir / name
        path.write_text(dump_toml(sections))
        return path

    @property
    def socket(self) -> Path:
        return self.dir / "run" / "gate.sock"

    def set_up_ledger(self, config: Path, owner: str | None = None) -> None:
        import pwd

        me = pwd.getpwuid(os.geteuid()).pw_name
        env = dict(self.base_env, SENDMAIL_SHIM_CONFIG=str(config))
        upgrade = ["db", "upgrade", *(["--owner", owner] if owner else [])]
        for step in (upgrade, ["customer", "add", "bench", "--unix-user", me],
                     ["account", "add", "post@a.example", "--customer", "bench", "--authenticated"]):
            subprocess.run([ADMIN, *step], env=env, check=True, capture_output=True)

    def start_gate(self, config: Path) -> int:
        """The gate as packaged: started as root, it becomes a user of its own (here: nobody)."""
        run = self.dir / "run"
        run.mkdir(mode=0o755, exist_ok=True)
        command = [sys.executable, "-m", "sendmail_shim.gate"]
        env = dict(self.base_env, SENDMAIL_SHIM_CONFIG=str(config))
        if os.geteuid() == 0:
            import pwd

            from tests.gate.deployment import User, find_interpreter

            entry = pwd.getpwnam(GATE_USER)
            self.dir.chmod(0o755)
            os.chown(run, entry.pw_uid, -1)
            # A Python the gate's user can still import from once it has given up root.
            python = find_interpreter(User(GATE_USER, entry.pw_uid, entry.pw_gid))
            command = [python.executable, "-m", "sendmail_shim.gate", "--user", GATE_USER]
            env.update({k: v for k, v in python.env().items() if k == "PYTHONPATH"})
        if self.profile:  # the same gate, under cProfile
            command = [command[0], "-c", PROFILED_GATE, str(self.profile), *command[3:]]
        self.gate = subprocess.Popen(command, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.gate.poll() is not None or time.monotonic() > deadline:
                errors = self.gate.stderr.read().decode(errors="replace") if self.gate.stderr else ""
                raise RuntimeError(f"the gate did not start: {errors}")
            time.sleep(0.02)
        return self.gate.pid

    def stop_gate(self) -> None:
        if self.gate is not None and self.gate.poll() is None:
            self.gate.send_signal(signal.SIGTERM)
            self.gate.wait(60)

    def msmtp_config(self) -> Path:
        path = self.dir / "msmtprc"
        path.write_text(
            "defaults\ntls on\ntls_starttls on\n"
            f"tls_trust_file {self.ca_file}\n"
            f"account bench\nhost 127.0.0.1\nport {self.upstream.port}\nfrom post@a.example\nauth off\n"
            "account default : bench\n")
        path.chmod(0o600)
        return path

    def build_nodelay(self) -> Path | None:
        gcc = shutil.which("gcc") or shutil.which("cc")
        if not gcc:
            return None
        source, library = self.dir / "nodelay.c", self.dir / "nodelay.so"
        source.write_text(NODELAY_C)
        subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"], check=True)
        return library

    def build_native(self, front_end: Path) -> Path:
        """The native client with the package's flags (dpkg-buildflags, hardening=+all) where dpkg has them."""
        flags = {}
        if shutil.which("dpkg-buildflags"):
            env = dict(os.environ, DEB_BUILD_MAINT_OPTIONS="hardening=+all")
            for name in ("CFLAGS", "CPPFLAGS", "LDFLAGS"):
                flags[name] = subprocess.run(["dpkg-buildflags", "--get", name], capture_output=True, text=True,
                                             env=env, check=True).stdout.strip()
        return native.build(self.dir / "native", front_end, flags=flags)

    def launcher(self, name: str, interpreter: str, text: str) -> Path:
        path = self.dir / "bin" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"#!{interpreter}\n{text}")
        path.chmod(0o755)
        return path

    def clients(self) -> list[Client]:
        gate_config, local_config = self.config("gate.toml", True), self.config("local.toml", False)
        self.set_up_ledger(gate_config, GATE_USER if os.geteuid() == 0 else None)
        self.set_up_ledger(local_config)
        self.start_gate(gate_config)
        gate_env = dict(self.base_env, SENDMAIL_SHIM_CONFIG=str(gate_config))
        msmtp = shutil.which("msmtp")
        found: list[Client] = []
        if msmtp:
            rc = self.msmtp_config()
            found.append(Client("msmtp", [msmtp, "-C", str(rc), "-t"], dict(self.base_env)))
            nodelay = self.build_nodelay()
            if nodelay:
                found.append(Client("msmtp stall-free", [msmtp, "-C", str(rc), "-t"],
                                    dict(self.base_env, LD_PRELOAD=str(nodelay))))
        system = _system_python()
        # As the Debian package's launcher runs it: the system python3, isolated, no site.
        packaged = (self.launcher("sendmail-packaged", f"{system} -IS", _packaged(LAUNCHER)) if system else
                    self.launcher("sendmail-packaged", sys.executable, LAUNCHER))
        found.append(Client(NATIVE, [str(self.build_native(packaged)), "-t", "-i"], gate_env))
        if system:
            found.append(Client("sendmail Python via gate, packaged", [str(packaged), "-t", "-i"], gate_env))
        found.append(Client("sendmail Python via gate, development", [SENDMAIL, "-t", "-i"], gate_env))
        found.append(Client("sendmail in-process", [SENDMAIL, "-t", "-i"],
                            dict(self.base_env, SENDMAIL_SHIM_CONFIG=str(local_config))))
        # For reference: what starting a process (and the interpreter) alone costs, sending nothing.
        true = shutil.which("true", path="/usr/bin:/bin")
        if true:
            found.append(Client("reference: /bin/true", [true], dict(self.base_env)))
        found.append(Client("reference: python -c pass", [sys.executable, "-c", "pass"], dict(self.base_env)))
        if system:
            found.append(Client("reference: system python3 -IS -c pass", [system, "-IS", "-c", "pass"],
                                dict(self.base_env)))
        return found


def _packaged(launcher: str) -> str:
    """A launcher that finds the package as the Debian one does (-I ignores PYTHONPATH)."""
    return f"import sys\nsys.path.append({str(ROOT)!r})\n{launcher}"


def _system_python() -> str | None:
    """The system's python3, when it is a separate interpreter of this version."""
    system = shutil.which("python3", path="/usr/bin")
    if not system or os.path.realpath(system) == os.path.realpath(sys.executable):
        return None
    probe = subprocess.run([system, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True)
    return system if probe.stdout.strip() == f"{sys.version_info[0]}.{sys.version_info[1]}" else None


# ------------------------------------------------------------------ measurements


def per_call(clients: list[Client], calls: int) -> dict[str, float]:
    for client in clients:  # warm caches (byte code, page cache) before timing
        client.call()
    for _ in range(calls):
        for client in clients:  # interleaved, so that load changes hit every client alike
            client.times.append(client.call())
    return {c.name: statistics.median(c.times) * 1000 for c in clients}


def throughput(client: Client, burst: int, parallel: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda _: client.call(), range(burst)))
    return burst / (time.perf_counter() - started)


def client_rss_kb(client: Client, samples: int = 5) -> int | None:
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    if not gnu_time:
        return None
    peaks = []
    for _ in range(samples):
        with tempfile.NamedTemporaryFile() as out:
            measured = Client(client.name, [gnu_time, "-f", "%M", "-o", out.name, *client.argv], client.env)
            measured.call()
            peaks.append(int(Path(out.name).read_text().split()[-1]))
    return max(peaks)


def gate_peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    try:
        import trustme

        ca = trustme.CA()
        with SmtpUpstream(ca) as upstream:
            bench = Bench(workdir, upstream, write_ca(ca, workdir), args.profile)
            try:
                return measure(bench, upstream, args)
            finally:
                bench.stop_gate()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(bench: Bench, upstream: SmtpUpstream, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure in one run: per call, throughput, client memory, then the gate's memory."""
    clients = bench.clients()
    assert bench.gate is not None
    gate_pid = bench.gate.pid
    medians = per_call(clients, args.calls)
    by_name = {c.name: c for c in clients}
    senders = [c for c in clients if not c.name.startswith("reference")]
    rates = {c.name: throughput(c, args.burst, args.parallel) for c in senders
             if "in-process" not in c.name and args.burst}  # --burst 0: per call only (e.g. to profile it)
    rss = {c.name: client_rss_kb(c) for c in senders}
    baseline_gate_kb = gate_peak_kb(gate_pid)
    callers = by_name[NATIVE]
    if args.callers:
        throughput(callers, args.callers, args.callers)
    gate_kb = gate_peak_kb(gate_pid)
    if args.uploads:
        big_uploads(callers, args.uploads, args.callers)
    uploads_kb = gate_peak_kb(gate_pid)
    failures = {c.name: c.failures[:3] for c in clients if c.failures}
    expected = (sum(len(c.times) + 1 for c in senders) + args.burst * len(rates) + 5 * len(rss) + 2 * args.callers
                + args.uploads)
    received = len(upstream.wait_for(expected, timeout=120))
    figures = report(medians, rates, rss, gate_kb, baseline_gate_kb, failures, expected, received, args)
    figures["gate_peak_rss_kb"][f"after_{args.uploads}_uploads_of_10_MB_and_{args.callers}_callers"] = uploads_kb
    return figures


def big_uploads(client: Client, uploads: int, callers: int) -> None:
    """``uploads`` 10 MB messages from one customer at once, while ``callers`` small ones come in too."""
    messages = [big_message(number) for number in range(uploads)]
    with ThreadPoolExecutor(uploads + callers) as pool:
        big = [pool.submit(client.call, m) for m in messages]
        time.sleep(0.5)  # the big ones are arriving: the small ones must not wait behind them
        small = [pool.submit(client.call) for _ in range(callers)]
        for future in big + small:
            future.result()


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def report(medians: dict[str, float], rates: dict[str, float], rss: dict[str, int | None], gate_kb: int,
           baseline_gate_kb: int, failures: dict[str, list[str]], expected: int, received: int,
           args: argparse.Namespace) -> dict[str, Any]:
    msmtp, stall_free = medians.get("msmtp"), medians.get("msmtp stall-free")
    goals: dict[str, Any] = {}
    for name in [n for n in medians if "via gate" in n]:
        client_kb = rss.get(name)
        goals[name] = {
            "per_call_vs_stall_free": _ratio(medians[name], stall_free),
            "goal_per_call_vs_stall_free": GOAL_PER_CALL_VS_STALL_FREE,
            "per_call_vs_msmtp": _ratio(medians[name], msmtp), "goal_per_call_vs_msmtp": GOAL_PER_CALL_VS_MSMTP,
            "throughput_vs_stall_free": _ratio(rates.get(name), rates.get("msmtp stall-free")),
            "goal_throughput_vs_stall_free": GOAL_THROUGHPUT_VS_STALL_FREE,
            "client_peak_rss_mb": round(client_kb / 1024, 2) if client_kb else None,
            "goal_client_mb": GOAL_CLIENT_MB,
        }
    return {
        "per_call_median_ms": {k: round(v, 1) for k, v in medians.items()},
        "messages_per_second": {k: round(v, 1) for k, v in rates.items()},
        "client_peak_rss_kb": rss,
        "gate_peak_rss_kb": {"idle_after_warm_up": baseline_gate_kb, f"after_{args.callers}_callers": gate_kb},
        "goal_gate_mb": GOAL_GATE_MB,
        "goals": goals,
        "failures": failures,
        "messages_expected": expected, "messages_received": received,
        "settings": {"calls": args.calls, "burst": args.burst, "parallel": args.parallel,
                     "callers": args.callers, "message_bytes": len(MESSAGE)},
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": sys.version.split()[0],
                    "implementation": platform.python_implementation(), "platform": platform.platform()},
    }


# The gate's share of a message, stage by stage: (label, module, function), in the order they run.
PROFILE_STAGES = [
    ("the whole connection", "connection.py", "serve"),
    ("  read the request (argv, message)", "connection.py", "_read_argv"),
    ("  decide, up to the verdict", "pipeline.py", "decide"),
    ("    account and caller", "pipeline.py", "_authorise"),
    ("    reservation (one commit)", "rates.py", "reserve"),
    ("    SMTP transaction on a ready connection", "relay.py", "_transaction"),
    ("  answer the client", "connection.py", "_answer"),
    ("after the answer, in the recorder: log, settle, record (one commit)", "pipeline.py", "record_together"),
]


def print_profile(path: Path) -> None:
    """Mean milliseconds per message of each stage, from the merged profile of the gate's connections."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    found = {(file.rsplit("/", 1)[-1], name): (calls, cumulative)
             for (file, _, name), (_, calls, _, cumulative, _) in stats.items()}
    print(f"the gate's share, per message, under cProfile (slower than without): {path}")
    for label, module, function in PROFILE_STAGES:
        calls, cumulative = found.get((module, function), (0, 0.0))
        print(f"  {label:<58} {cumulative * 1000 / calls if calls else 0:7.2f} ms")


def print_table(figures: dict[str, Any]) -> None:
    medians, rates, rss = (figures["per_call_median_ms"], figures["messages_per_second"],
                           figures["client_peak_rss_kb"])
    print(f"{'client':<48} {'median ms/call':>14} {'msg/s':>8} {'peak RSS MB':>12}")
    for name, median in medians.items():
        rate = rates.get(name)
        kb = rss.get(name)
        print(f"{name:<48} {median:>14.1f} {rate if rate is not None else '-':>8} "
              f"{round(kb / 1024, 1) if kb else '-':>12}")
    gate = figures["gate_peak_rss_kb"]
    print("gate peak RSS (VmHWM): " + ", ".join(f"{k.replace('_', ' ')} {round(v / 1024, 1)} MB"
                                               for k, v in gate.items()) + f" (goal <= {GOAL_GATE_MB} MB)")
    for name, goal in figures["goals"].items():
        print(f"{name}: per call x{goal['per_call_vs_stall_free']} stall-free msmtp "
              f"(goal <= {GOAL_PER_CALL_VS_STALL_FREE}), x{goal['per_call_vs_msmtp']} msmtp "
              f"(goal <= {GOAL_PER_CALL_VS_MSMTP}); throughput x{goal['throughput_vs_stall_free']} stall-free "
              f"(goal >= {GOAL_THROUGHPUT_VS_STALL_FREE}); {goal['client_peak_rss_mb']} MB (goal <= {GOAL_CLIENT_MB})")
    print(f"messages received {figures['messages_received']} of {figures['messages_expected']}")
    if figures["failures"]:
        print("failures:", json.dumps(figures["failures"], indent=2))


def main(argv: list[str] | None = None, out: Callable[[dict[str, Any]], None] = print_table) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="where to write the figures as JSON")
    parser.add_argument("--calls", type=int, default=30, help="timed calls per client (default 30)")
    parser.add_argument("--burst", type=int, default=200, help="calls in the throughput run (default 200)")
    parser.add_argument("--parallel", type=int, default=8, help="calls at a time in it (default 8)")
    parser.add_argument("--callers", type=int, default=50, help="callers at once for the gate's RSS")
    parser.add_argument("--uploads", type=int, default=16, help="10 MB uploads at once, with --callers small "
                        "callers, for the gate's peak RSS (default 16)")
    parser.add_argument("--profile", type=Path, help="run the gate under cProfile and write its profile here "
                        "(with --burst 0 --callers 0: one call at a time only)")
    args = parser.parse_args(argv)
    figures = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(figures, indent=2) + "\n")
    out(figures)
    if args.profile:
        print_profile(args.profile)
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
