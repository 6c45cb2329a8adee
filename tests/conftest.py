from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.support.shim import Shim
from tests.support.upstream import SmtpUpstream, write_ca


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    return write_ca(ca, tmp_path)


@pytest.fixture
def upstream(ca: trustme.CA) -> Iterator[SmtpUpstream]:
    with SmtpUpstream(ca) as server:
        yield server


@pytest.fixture
def shim(tmp_path: Path, upstream: SmtpUpstream, ca_file: Path) -> Shim:
    return Shim(tmp_path, upstream.port, ca_file)


from tests.support.postgres import postgres_cluster  # noqa: E402,F401 (one real PostgreSQL for the run)
