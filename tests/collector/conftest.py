"""A PostgreSQL cluster per test session (initdb costs seconds), a fresh database per test."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


peers_postgres = _load("edgeos_test_peers_postgres", _HERE.parent / "peers" / "postgres.py")
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster():
    pg = peers_postgres.Postgres()
    pg.start()
    yield pg
    pg.close()


@pytest.fixture
def pg(pg_cluster):
    """(cluster, dsn of a new empty database)."""
    name = f"t{next(_counter)}"
    return pg_cluster, pg_cluster.create_database(name)


sync_peers = _load("edgeos_test_sync_peers", _HERE.parent / "sync" / "conftest.py")
Broker = sync_peers.Broker
free_port = sync_peers.free_port


@pytest.fixture
def mosquitto(tmp_path):
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def make_mosquitto(tmp_path):
    made = []

    def make(**kw):
        b = Broker(tmp_path / f"broker{len(made)}", **kw)
        b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


peers_nats = _load("edgeos_test_peers_nats", _HERE.parent / "peers" / "nats.py")


@pytest.fixture
def nats_cluster(tmp_path):
    with peers_nats.NatsCluster(tmp_path / "nats") as c:
        yield c
