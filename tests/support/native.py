"""The native ``sendmail`` client, built from native/ the way the packages build it.

Each build names its Python front end (the program it hands every other call to) at
build time, as the package does with /usr/lib/sendmail-shim/sendmail; the tests give
their own. The sanitizer build adds AddressSanitizer and UBSan, which stop the program
with SANITIZER_EXIT on the first fault.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "native"
SANITIZER_EXIT = 99
# Every fault is fatal and visible: a leak, an overflow, undefined behaviour.
SANITIZER_ENV = {
    "ASAN_OPTIONS": f"exitcode={SANITIZER_EXIT}:detect_leaks=1:abort_on_error=0:strict_string_checks=1",
    "UBSAN_OPTIONS": f"exitcode={SANITIZER_EXIT}:print_stacktrace=1:halt_on_error=1",
}
SANITIZER_REPORTS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer")


def have_compiler() -> bool:
    return bool(shutil.which("make") and (shutil.which("cc") or shutil.which("gcc")))


def build(out: Path, front_end: Path, *, sanitize: bool = False, flags: dict[str, str] | None = None) -> Path:
    """``make -C native`` into ``out``; the path of the program. ``flags``: CFLAGS, LDFLAGS and the like."""
    args = ["make", "-s", "-C", str(SOURCE), f"O={out}", f"FRONT_END={front_end}"]
    args += [f"{name}={value}" for name, value in (flags or {}).items()]
    if sanitize:
        args.append("SANITIZE=1")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"building the native client failed:\n{proc.stdout}{proc.stderr}")
    return out / "sendmail"
