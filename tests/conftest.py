"""Test tiers and shared fixtures.

Three tiers, chosen with `-m`:
  unit         pure and fast: no sockets, no Python subprocesses (`pytest -m unit`, under a minute)
  integration  processes and sockets on loopback (`@pytest.mark.integration`)
  mininet      needs root and Mininet (`@pytest.mark.mininet`)
A test without an `integration` or `mininet` mark is a unit test: it is marked `unit` here, and a
guard makes it fail if it binds or connects a ZeroMQ or TCP socket or starts a Python process, so
a test that needs the network has to say so. `pytest -q -rs` runs all three tiers.

Test files mirror the package they test: tests/<package>/test_<module>.py.
"""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import zmq

from tests.runtime_fixtures import Procs

TIERS = ("unit", "integration", "mininet")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(t) for t in ("integration", "mininet")):
            item.add_marker(pytest.mark.unit)


class UnitTierViolation(AssertionError):
    pass


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise UnitTierViolation(f"a unit test {what}: mark it @pytest.mark.integration (tests/conftest.py)")
    return refuse


@pytest.fixture(autouse=True)
def _unit_tier_guard(request, monkeypatch):
    """Unit tests stay pure: no network endpoints, no Python child processes."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    monkeypatch.setattr(zmq.Socket, "bind", _refuse("bound a ZeroMQ socket"))
    monkeypatch.setattr(zmq.Socket, "connect", _refuse("connected a ZeroMQ socket"))
    monkeypatch.setattr(socket.socket, "bind", _refuse("bound a socket"))
    monkeypatch.setattr(socket.socket, "connect", _refuse("connected a socket"))
    real_popen_init = subprocess.Popen.__init__

    def popen_init(self, args, *a, **kw):
        argv = [args] if isinstance(args, (str, bytes)) else list(args)
        if argv and str(argv[0]) == sys.executable:
            raise UnitTierViolation("a unit test started a Python process: mark it @pytest.mark.integration "
                                    "(tests/conftest.py)")
        real_popen_init(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen_init)
    yield


@pytest.fixture()
def procs():
    """Processes a test starts (tests.runtime_fixtures.Procs), stopped (TERM, then KILL) afterwards
    even when the test fails; none may outlive it."""
    started = Procs()
    try:
        yield started
    finally:
        started.stop_all()
        leftover = [n for n, p in started.procs.items() if p.poll() is None]
        assert not leftover, f"processes still running: {leftover}"
