"""The listening socket: where it may be, the one systemd hands over, and telling systemd."""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from .. import trust
from ..config import GateConfig
from .errors import ActivationError, SocketInUse, UnsafeSocketPlace

SOMAXCONN_FILE = "/proc/sys/net/core/somaxconn"
SD_LISTEN_FDS_START = 3


# ------------------------------------------------------------------ the listening socket


class Listener:
    """The listening socket, bound here or handed over by systemd."""

    def __init__(self, sock: socket.socket, where: str, *, inherited: bool, backlog: int | None = None) -> None:
        self.sock, self.where, self.inherited, self.backlog = sock, where, inherited, backlog
        self._inode = None if inherited else os.stat(where).st_ino

    def close(self) -> None:
        self.sock.close()
        inode, self._inode = self._inode, None
        if inode is not None:
            # Only our own socket file: a successor may already have bound a new one.
            with contextlib.suppress(OSError):
                if os.stat(self.where).st_ino == inode:
                    os.unlink(self.where)


def open_listener(config: GateConfig, inherited: socket.socket | None = None) -> Listener:
    if inherited is not None:
        return Listener(inherited, config.socket or "(systemd socket)", inherited=True)
    if not config.socket:
        raise UnsafeSocketPlace("[gate] socket is not set; set it (e.g. /run/sendmail-shim/gate.sock)")
    backlog = listen_backlog(config.backlog)
    return Listener(_bind(config.socket, backlog), config.socket, inherited=False, backlog=backlog)


def listen_backlog(wanted: int) -> int:
    """``[gate] backlog``, capped by the kernel's ``somaxconn`` as listen(2) would silently do."""
    try:
        with open(SOMAXCONN_FILE, encoding="ascii") as handle:
            return min(wanted, int(handle.read()))
    except (OSError, ValueError):
        return wanted


def inherited_socket() -> socket.socket | None:
    """The socket systemd passed (sd_listen_fds protocol), if it is meant for us."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0") or "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ActivationError("the socket systemd passed is not a UNIX stream socket; "
                              "use ListenStream=/run/sendmail-shim/gate.sock in the .socket unit")
    sock.set_inheritable(False)
    return sock


def _bind(path: str, backlog: int) -> socket.socket:
    check_socket_directory(os.path.dirname(path))
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)  # every local user may submit; the kernel tells us who they are
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise UnsafeSocketPlace(f"cannot listen on {path} ({exc.strerror}); check the directory") from None
    return sock


def check_socket_directory(directory: str) -> None:
    """Create the socket's directory if need be; refuse one that other users could change."""
    if not os.path.isdir(directory):
        _create_socket_directory(directory)
    problem = socket_place_problem(directory, os.geteuid(), _gate_user_name())
    if problem is not None:
        raise UnsafeSocketPlace(problem)


def socket_place_problem(directory: str, gate_uid: int, gate_user: str) -> str | None:
    """What lets others replace a socket in ``directory`` (None: nothing).

    Whoever can rename a directory on the way can put a socket of their own
    in the gate's place: each must belong to root or the gate, and none may
    be writable by others unless it has the sticky bit (as /tmp does). The
    socket's own directory may not be writable by others at all.
    """
    info = os.stat(directory)
    if info.st_uid not in (0, gate_uid) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{directory} can be written by users other than root and the gate, so they could "
                f"replace the socket; run: chown {gate_user} {directory} && chmod 755 {directory}")
    for parent in _parents(directory):
        found = os.stat(parent)
        writable = found.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not found.st_mode & stat.S_ISVTX
        if found.st_uid not in (0, gate_uid) or writable:
            return (f"{parent}, above the socket's directory {directory}, can be changed by other users "
                    f"(owner uid {found.st_uid}, mode {stat.S_IMODE(found.st_mode):04o}), so they could replace "
                    f"the socket's directory; choose a socket under a directory only root can change, "
                    f"such as /run/sendmail-shim")
    return None


def _parents(directory: str) -> list[str]:
    found, path = [], os.path.abspath(directory)
    while path != "/":
        path = os.path.dirname(path)
        found.append(path)
    return found


def _create_socket_directory(directory: str) -> None:
    try:
        os.mkdir(directory, 0o755)
    except OSError as exc:
        user = _gate_user_name()
        raise UnsafeSocketPlace(
            f"cannot create {directory} ({exc.strerror}); create it owned by the gate's user, mode 0755 "
            f"(run: install -d -o {user} -m 0755 {directory}), or use the packaged systemd units: "
            f"sendmail-shim-gate.socket creates it"
        ) from None


def _gate_user_name() -> str:
    return trust.Identity.of_uid(os.geteuid()).name


def _remove_stale_socket(path: str) -> None:
    found = clear_stale_socket(path)
    if found == "not a socket":
        raise UnsafeSocketPlace(f"{path} exists and is not a socket; remove it or choose another path")
    if found == "in use":
        raise SocketInUse(f"another gate is already listening on {path}; stop it first")


def clear_stale_socket(path: str) -> str | None:
    """Remove the socket a dead process left at ``path``; None once the path is free.

    Else what stands there: "not a socket", or "in use" (a live process accepts on it).
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(info.st_mode):
        return "not a socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # left behind by a process that died
        return None
    finally:
        probe.close()
    return "in use"


def notify_systemd_ready() -> None:
    notify_systemd(b"READY=1")


def notify_systemd(state: bytes) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(state, target)
    except OSError:
        pass  # systemd's readiness is a courtesy; the socket is already listening
