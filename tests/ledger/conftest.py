from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sendmail_shim.ledger import Ledger
from tests.ledger.common import open_ledger
from tests.support.postgres import PostgresCluster, postgres_cluster  # noqa: F401 (fixture)

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/state/ledger.db"


@pytest.fixture
def pg_url(postgres_cluster: PostgresCluster) -> str:  # noqa: F811
    return postgres_cluster.create_database()


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest) -> str:
    """The same test against SQLite and against a real PostgreSQL."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    """An upgraded ledger with the provider's default limits."""
    with open_ledger(ledger_url) as opened:
        yield opened
