"""A shared-hosting deployment of the gate, built for one test.

As on a real server: a public config every user can read (no secrets in it),
the ledger, log and relay password owned by the gate's own Unix user with
private modes, the socket 0666 in a root-owned 0755 directory, and the gate
running as its user while sites run ``sendmail`` as theirs. When the tests run
as root (as CI does) the users are real: created with ``useradd`` for the
test run and removed afterwards. Otherwise everything runs as the current user
and the tests that need several users skip.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.native import SANITIZER_ENV, SANITIZER_EXIT, SANITIZER_REPORTS
from tests.support.shim import ADMIN, SENDMAIL, dump_toml, update_section

ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0
RELAY_USER, RELAY_PASSWORD = "relay-user", "s3cret-relay-pw"

# ``sendmail`` as installed (main(): the gate's fast path first), and the full front end alone
# (argv parser and whole config first), to show that both say the same.
LAUNCHER = """\
from sendmail_shim.sendmail import main
main()
"""
FULL_FRONT_END_LAUNCHER = """\
import sys
from sendmail_shim.sendmail import run
code = run(sys.argv[0], sys.argv[1:], sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
sys.stderr.flush()
sys.exit(code)
"""


# ------------------------------------------------------------------ the sendmail clients


@dataclass(frozen=True)
class Client:
    """One ``sendmail`` a site may run: the Python fast path, or a build of the native client."""

    name: str  # "python", "native" or "native-asan"
    binary: Path | None = None  # None: the Python launcher
    env: dict[str, str] = field(default_factory=dict)  # e.g. the sanitizers' options

    @property
    def sanitized(self) -> bool:
        return self.name.endswith("-asan")


PYTHON_CLIENT = Client("python")


# ------------------------------------------------------------------ users


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    @classmethod
    def current(cls) -> User:
        entry = pwd.getpwuid(os.geteuid())
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    def run_options(self) -> dict[str, Any]:
        """subprocess options that run a child as this user, with no other groups."""
        if not IS_ROOT or self.uid == os.geteuid():
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


@dataclass
class Users:
    """The gate's system user and the sites' users: a, b bound to customers, c bound to none."""

    gate: User
    a: User
    b: User
    c: User
    created: list[str] = field(default_factory=list)

    def remove(self) -> None:
        for name in self.created:
            subprocess.run(["userdel", name], capture_output=True, check=False)


def create_users() -> Users:
    if not IS_ROOT:
        me = User.current()
        return Users(me, me, me, me)
    suffix = f"{os.getpid() % 100000}"
    made: list[User] = []
    names: list[str] = []
    for role in ("gate", "a", "b", "c"):
        name = f"shimtest-{role}{suffix}"
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/",
                        "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
        names.append(name)
        entry = pwd.getpwnam(name)
        made.append(User(name, entry.pw_uid, entry.pw_gid))
    gate, a, b, c = made
    return Users(gate, a, b, c, created=names)


# ------------------------------------------------------------------ an interpreter every user can run


@dataclass(frozen=True)
class Interpreter:
    """A Python the unprivileged users can execute, and the path that finds the project."""

    executable: str
    pythonpath: str | None

    def env(self) -> dict[str, str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        return env


def find_interpreter(probe_user: User) -> Interpreter:
    """The test interpreter if ``probe_user`` may run it, else a system python3 of the same version.

    A Python installed under a private home directory cannot be run by
    other users; the project and its dependencies are then put on PYTHONPATH.
    """
    paths = [str(ROOT), *site.getsitepackages()]
    candidates = [Interpreter(sys.executable, None), Interpreter(sys.executable, os.pathsep.join(paths))]
    system = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if system:
        candidates.append(Interpreter(system, os.pathsep.join(paths)))
    wanted = f"{sys.version_info[0]}.{sys.version_info[1]}"
    check = ("import sys, sqlalchemy, sendmail_shim.pipeline; "
             "print('%d.%d' % sys.version_info[:2])")
    for candidate in candidates:
        try:
            result = subprocess.run([candidate.executable, "-c", check], capture_output=True, text=True,
                                    env=candidate.env(), cwd="/", timeout=60, **probe_user.run_options())
        except OSError:
            continue
        if result.returncode == 0 and result.stdout.strip() == wanted:
            return candidate
    raise RuntimeError(f"no Python {wanted} that {probe_user.name} may run can import the project")


# ------------------------------------------------------------------ the ledger


def ledger_steps(users: Users) -> list[tuple[str, ...]]:
    steps = [("db", "upgrade"),
             ("customer", "add", "ka", "--unix-user", users.a.name),
             ("customer", "add", "kb", "--unix-user", users.b.name),
             ("account", "add", "post@a.example", "--customer", "ka", "--authenticated"),
             ("account", "add", "post@b.example", "--customer", "kb", "--authenticated")]
    if not IS_ROOT:  # one user for every role: bound to ka only (a user has one customer)
        return [steps[0], steps[1], ("customer", "add", "kb"), *steps[3:]]
    return steps


def build_ledger_template(users: Users, directory: Path) -> Path:
    """The customers and accounts every test starts from, made once with the admin CLI."""
    ledger = directory / "ledger.db"
    config = directory / "config.toml"
    config.write_text(dump_toml({"upstream": {"host": "127.0.0.1"}, "ledger": {"url": f"sqlite:///{ledger}"},
                                 "spf": {"enabled": False}, "log": {"syslog": False}}))
    env = dict(os.environ, SENDMAIL_SHIM_CONFIG=str(config))
    for step in ledger_steps(users):
        result = run_process([ADMIN, *step], env=env, cwd=str(directory))
        assert result.code == 0, (step, result.stderr)
    return ledger


# ------------------------------------------------------------------ results


@dataclass
class Result:
    code: int
    stdout: bytes
    stderr: str
    max_rss_kb: int = 0

    @property
    def line(self) -> str:
        return self.stderr.strip()


TIME = shutil.which("time", path="/usr/bin:/bin")


def run_process(argv: list[str], *, input: bytes = b"", env: dict[str, str], cwd: str,
                timeout: float = 60, options: dict[str, Any] | None = None,
                measure_rss: bool = False) -> Result:
    """Run to completion; report exit code, output and, when asked, the peak RSS.

    The peak RSS is taken by GNU time: a process forked from the test process
    would report the test process's own size as its peak.
    """
    rss_file = None
    if measure_rss:
        assert TIME, "GNU time (/usr/bin/time) is needed to measure peak RSS"
        rss_file = tempfile.NamedTemporaryFile(prefix="rss-", delete=False)  # noqa: SIM115
        rss_file.close()
        os.chmod(rss_file.name, 0o666)
        argv = [TIME, "-f", "%M", "-o", rss_file.name, *argv]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=cwd, **(options or {}))
    out: dict[str, bytes] = {}

    def feed() -> None:
        try:
            assert proc.stdin is not None
            proc.stdin.write(input)
            proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass

    def drain(name: str) -> None:
        stream = getattr(proc, name)
        out[name] = stream.read()

    threads = [threading.Thread(target=feed), threading.Thread(target=drain, args=("stdout",)),
               threading.Thread(target=drain, args=("stderr",))]
    for thread in threads:
        thread.start()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    for thread in threads:
        thread.join(10)
    rss = 0
    if rss_file is not None:
        text = Path(rss_file.name).read_text()
        os.unlink(rss_file.name)
        rss = int(text.split()[-1])
    return Result(proc.returncode, out.get("stdout", b""), out.get("stderr", b"").decode("utf-8", "replace"),
                  rss)


# ------------------------------------------------------------------ the deployment


class Deployment:
    """Files, config and the gate process of one shared server."""

    def __init__(self, users: Users, interpreter: Interpreter, upstream_port: int, ca_pem: bytes,
                 *, credentials: bool = True, client: Client = PYTHON_CLIENT,
                 native: dict[str, Client] | None = None) -> None:
        self.users, self.python = users, interpreter
        self.client = client
        self.native = native or {}  # every native build, by name, for comparisons
        self.base = Path(tempfile.mkdtemp(prefix="shim-gate-"))
        os.chmod(self.base, 0o755)
        self.etc, self.run_dir = self.base / "etc", self.base / "run"
        self.state, self.secret, self.logs = self.base / "state", self.base / "secret", self.base / "log"
        self.bin = self.base / "bin"
        for public in (self.etc, self.run_dir, self.bin):
            public.mkdir(mode=0o755)
        for private in (self.state, self.secret, self.logs):
            private.mkdir(mode=0o700)
            self.give_to_gate(private)
        self.config_path = self.etc / "config.toml"
        self.socket_path = self.run_dir / "gate.sock"
        self.ledger_path = self.state / "ledger.db"
        self.password_path = self.secret / "relay-password"
        self.log_path = self.logs / "decisions.log"
        ca_file = self.etc / "ca.pem"
        ca_file.write_bytes(ca_pem)
        os.chmod(ca_file, 0o644)
        self.sections: dict[str, dict[str, Any]] = {
            "upstream": {"host": "127.0.0.1", "port": upstream_port, "ca_file": str(ca_file), "timeout": 10},
            "ledger": {"url": f"sqlite:///{self.ledger_path}"},
            "spf": {"enabled": False},
            # The socket is bound as root (as systemd does) and served by the gate's user.
            "gate": {"socket": str(self.socket_path), "request_timeout": 10, "user": users.gate.name},
            "log": {"syslog": False, "file": str(self.log_path)},
        }
        if credentials:
            self.password_path.write_text(RELAY_PASSWORD + "\n")
            os.chmod(self.password_path, 0o600)
            self.give_to_gate(self.password_path)
            self.sections["upstream"].update(username=RELAY_USER, password_file=str(self.password_path))
        self.write_config()
        self._write_launchers()
        self.gate: subprocess.Popen[bytes] | None = None
        self.listening: socket.socket | None = None

    # -------------------------------------------------------------- files

    def give_to_gate(self, path: Path) -> None:
        if IS_ROOT:
            os.chown(path, self.users.gate.uid, self.users.gate.gid)

    def configure(self, section: str, **values: Any) -> None:
        update_section(self.sections, section, values)
        self.write_config()

    def write_config(self, path: Path | None = None, sections: dict[str, dict[str, Any]] | None = None,
                     mode: int = 0o644) -> Path:
        path = path or self.config_path
        path.write_text(dump_toml(sections or self.sections))
        os.chmod(path, mode)
        return path

    def _write_launchers(self) -> None:
        """bin/sendmail is this deployment's client; bin/sendmail-NAME each client by name."""
        for name, text in (("sendmail-python", LAUNCHER), ("sendmail-full", FULL_FRONT_END_LAUNCHER)):
            script = self.bin / name
            script.write_text(f"#!{self.python.executable}\n{text}")
            os.chmod(script, 0o755)
        for client in self.native.values():
            assert client.binary is not None
            shutil.copy(client.binary, self.bin / f"sendmail-{client.name}")
        chosen = self.client.binary or self.bin / "sendmail-python"
        shutil.copy(chosen, self.bin / "sendmail")
        os.chmod(self.bin / "sendmail", 0o755)

    def admin(self, *args: str) -> Result:
        """The admin CLI, as root (or the current user) with the same config."""
        env = dict(os.environ, SENDMAIL_SHIM_CONFIG=str(self.config_path))
        return run_process([ADMIN, *args], env=env, cwd=str(self.base))

    def set_up_ledger(self) -> None:
        """Customers ka (site user a, domain a.example) and kb (user b, b.example)."""
        for step in ledger_steps(self.users):
            result = self.admin(*step)
            assert result.code == 0, (step, result.stderr)

    def install_ledger(self, template: Path) -> None:
        """A copy of a ledger made by ``set_up_ledger``, owned by the gate with mode 0600."""
        shutil.copyfile(template, self.ledger_path)
        os.chmod(self.ledger_path, 0o600)
        self.give_to_gate(self.ledger_path)

    # -------------------------------------------------------------- the gate

    def gate_env(self, **extra: str) -> dict[str, str]:
        return {**self.python.env(), "HOME": "/", "SENDMAIL_SHIM_CONFIG": str(self.config_path), **extra}

    def hold_socket(self) -> socket.socket:
        """Bind the socket as systemd's .socket unit does: root-owned directory, mode 0666."""
        if self.listening is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o666)
            sock.listen(128)
            self.listening = sock
        return self.listening

    def start_gate(self, *, activated: bool = True, wait: bool = True, as_root: bool = False,
                   env: dict[str, str] | None = None, wrap: list[str] | None = None) -> subprocess.Popen[bytes]:
        """Start the gate as its user; with ``activated`` it gets the socket as systemd hands it over.

        ``as_root``: started as root with ``--user``, as the packaged unit starts it (the checks
        that need root first, then it becomes the gate's user). ``wrap``: a command that
        execs the gate's command line, given as its last arguments.
        """
        notify_name = f"shimtest-notify-{secrets.token_hex(6)}"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind("\0" + notify_name)
        gate_env = self.gate_env(NOTIFY_SOCKET="@" + notify_name, **(env or {}))
        command = [self.python.executable, "-m", "sendmail_shim.gate"]
        if as_root:
            command += ["--user", self.users.gate.name]
        pass_fds: tuple[int, ...] = ()
        if activated:
            fd = self.hold_socket().fileno()
            pass_fds = (fd,)
            # systemd's protocol: the socket at fd 3 and LISTEN_PID naming the process itself.
            command = [self.python.executable, "-c",
                       f"import os; os.dup2({fd}, 3); os.environ['LISTEN_FDS'] = '1'; "
                       f"os.environ['LISTEN_PID'] = str(os.getpid()); "
                       f"os.execv({self.python.executable!r}, {command!r})"]
        command = [*(wrap or []), *command]
        self.gate_stderr = open(self.base / "gate.stderr", "wb")  # noqa: SIM115 - closed in stop_gate
        self.gate = subprocess.Popen(command, env=gate_env, cwd="/", pass_fds=pass_fds,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.gate_stderr,
                                     **({} if as_root else self.users.gate.run_options()))
        try:
            if wait:
                self._wait_ready(notify)
        finally:
            notify.close()
        return self.gate

    def _wait_ready(self, notify: socket.socket) -> None:
        assert self.gate is not None
        notify.settimeout(0.2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if b"READY=1" in notify.recv(4096):
                    return
            except TimeoutError:
                pass
            if self.gate.poll() is not None:
                raise RuntimeError(f"the gate exited with {self.gate.returncode}: {self.gate_errors()}")
        raise RuntimeError("the gate did not report READY=1 within 30 s")

    def gate_errors(self) -> str:
        path = self.base / "gate.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_gate(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        code = None
        if self.gate is not None:
            if self.gate.poll() is None:
                self.gate.send_signal(sig)
            code = self.gate.wait(timeout)
            self.gate = None
            self.gate_stderr.close()
        return code

    def close(self) -> None:
        try:
            self.stop_gate(signal.SIGKILL)
        finally:
            if self.listening is not None:
                self.listening.close()
            shutil.rmtree(self.base, ignore_errors=True)

    # -------------------------------------------------------------- sites

    def client_env(self, **extra: str) -> dict[str, str]:
        return {**self.python.env(), **self.client.env, "SENDMAIL_SHIM_CONFIG": str(self.config_path), **extra}

    def sendmail(self, *args: str, input: bytes = b"", user: User | None = None, full: bool = False,
                 env: dict[str, str] | None = None, timeout: float = 60, measure_rss: bool = False,
                 program: str = "sendmail") -> Result:
        """``sendmail`` as a site runs it: as the site's Unix user, with the public config.

        ``program`` picks another client from bin/ (``sendmail-python``, ``sendmail-native``).
        """
        user = user or self.users.a
        launcher = self.bin / ("sendmail-full" if full else program)
        sanitized = not full and (program.endswith("-asan") or (program == "sendmail" and self.client.sanitized))
        env = env or self.client_env()
        if sanitized:
            env = {**SANITIZER_ENV, **env}
        result = run_process([str(launcher), *args], input=input, env=env, cwd=str(self.base), timeout=timeout,
                             options=user.run_options(), measure_rss=measure_rss)
        if sanitized:  # a fault the sanitizers found fails every test that met it
            assert result.code != SANITIZER_EXIT, result.stderr
            assert not any(report in result.stderr for report in SANITIZER_REPORTS), result.stderr
        return result

    def run_as(self, user: User, code: str, timeout: float = 60) -> Result:
        """A Python snippet as ``user``: what a hostile site could try by hand."""
        return run_process([self.python.executable, "-c", code], env=self.client_env(), cwd=str(self.base),
                           timeout=timeout, options=user.run_options())

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines() if self.log_path.exists() else []

    def wait_for_log(self, needle: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_lines():
                if needle in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line with {needle!r}: {self.log_lines()}")


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a mapping: Uid, Groups, Threads, VmHWM, ..."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}


def message(sender: str = "post@a.example", to: str = "ola@x.example", subject: str = "Hei") -> bytes:
    return f"From: {sender}\nTo: {to}\nSubject: {subject}\n\nHello from the site.\n".encode()


__all__ = ["SENDMAIL", "Client", "Deployment", "Interpreter", "Result", "User", "Users", "create_users",
           "build_ledger_template", "find_interpreter", "message", "proc_status", "run_process"]
