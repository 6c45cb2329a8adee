"""The test suite never reaches a live installation: proven with a decoy gate on the default socket."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from tests.support.private_root import DEFAULT_PLACES, private_root, running_under

needs_namespaces = pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root (CI runs as root)")

CONNECT_TO_DEFAULT = ("import socket; s = socket.socket(socket.AF_UNIX); "
                      "s.connect('/run/sendmail-shim/gate.sock'); s.sendall(b'a test message'); s.close()")


def _outside_state() -> dict[str, object]:
    """What the machine's own default places look like from outside any private root."""
    found: dict[str, object] = {}
    for place in DEFAULT_PLACES:
        try:
            info = os.stat(place)
            found[place] = (info.st_ino, info.st_mtime_ns, sorted(os.listdir(place)))
        except OSError as exc:
            found[place] = exc.errno
    return found


def test_make_test_runs_with_a_decoy_gate_on_the_default_socket() -> None:
    if running_under() != "decoy":
        pytest.skip("make test runs the suite under scripts/private-root --decoy; this run is not")
    info = os.stat("/run/sendmail-shim/gate.sock")
    assert stat.S_ISSOCK(info.st_mode)
    with open("/etc/sendmail-shim/config.toml") as decoy_config:
        assert 'socket = "/run/sendmail-shim/gate.sock"' in decoy_config.read()
    # The decoy is not talked to here: any connection, this test's too, would fail the run.


@needs_namespaces
def test_the_decoy_fails_a_run_that_reaches_the_default_socket() -> None:
    before = _outside_state()
    caught = subprocess.run([*private_root(decoy=True), sys.executable, "-c", CONNECT_TO_DEFAULT],
                            capture_output=True, text=True, timeout=60)
    assert caught.returncode == 1
    assert ("private-root: FAILED: something connected to the default socket /run/sendmail-shim/gate.sock "
            "(1 connection(s)); a test used the live installation's defaults") in caught.stderr
    assert "a test message" in caught.stderr
    clean = subprocess.run([*private_root(decoy=True), sys.executable, "-c", "print('nothing')"],
                           capture_output=True, text=True, timeout=60)
    assert (clean.returncode, clean.stdout, clean.stderr) == (0, "nothing\n", "")
    assert _outside_state() == before  # the machine's own places were never created or changed


@needs_namespaces
def test_a_private_root_hides_and_protects_the_machines_own_places() -> None:
    before = _outside_state()
    script = (f"import os; [open(os.path.join(p, 'written-by-a-test'), 'w').write('x') for p in {DEFAULT_PLACES!r}]; "
              "print(sorted(os.listdir('/etc/sendmail-shim')))")
    inside = subprocess.run([*private_root(), sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout == "['written-by-a-test']\n"  # empty before: nothing of the machine's own shows
    assert _outside_state() == before
