"""CURVE: authorized clients are served; strangers and plain-text peers get nothing; agent stays up."""
from __future__ import annotations

import stat
import subprocess
import sys

import pytest
import torch
import zmq

from nodes import protocol as P
from nodes.agent import AgentConfig, serve_in_thread
from nodes.local import free_port
from nodes.security import load_keys, make_keys
from nodes.transport import AgentClient, NodeTimeout


@pytest.fixture
def secured(tmp_path):
    keys = make_keys(tmp_path / "keys")
    stranger = make_keys(tmp_path / "stranger")
    a, th = serve_in_thread(AgentConfig(f"tcp://127.0.0.1:{free_port()}", 1 << 20, keys_dir=str(keys)))
    try:
        yield a, load_keys(keys), load_keys(stranger)
    finally:
        a.stop()
        th.join(5)
        assert not th.is_alive()


def test_keys_layout_and_permissions(tmp_path):
    out = make_keys(tmp_path / "k")
    for f in ("server.key", "server.key_secret", "client.key", "client.key_secret", "authorized/client.key"):
        assert (out / f).exists(), f
    assert stat.S_IMODE((out / "server.key_secret").stat().st_mode) == 0o600
    from coel_model.errors import ConfigError
    with pytest.raises(ConfigError, match="already exist"):
        make_keys(out)


@pytest.mark.integration
def test_authorized_client_is_served(secured):
    a, keys, _ = secured
    c = AgentClient(a.cfg.endpoint, keys)
    try:
        assert c.call(P.MsgType.PROBE, {"echo": 5}, {"p": torch.arange(4)}, timeout_s=5).body["echo"] == 5
    finally:
        c.close()


def _assert_served(a, keys):
    c = AgentClient(a.cfg.endpoint, keys)
    try:
        assert c.call(P.MsgType.STATUS, timeout_s=5).type == P.MsgType.STATUS
    finally:
        c.close()


@pytest.mark.integration
def test_stranger_key_is_rejected_and_agent_stays_up(secured):
    a, keys, stranger = secured
    # the stranger knows the server's public key but its own client key is not authorized
    c = AgentClient(a.cfg.endpoint, stranger, server_public=keys.server_public)
    try:
        with pytest.raises(NodeTimeout):
            c.call(P.MsgType.STATUS, timeout_s=0.7)
    finally:
        c.close()
    assert a.counters["received"] == 0
    _assert_served(a, keys)


@pytest.mark.integration
def test_plain_text_peer_is_rejected_and_agent_stays_up(secured):
    a, keys, _ = secured
    c = AgentClient(a.cfg.endpoint, None)
    try:
        with pytest.raises(NodeTimeout):
            c.call(P.MsgType.STATUS, timeout_s=0.7)
    finally:
        c.close()
    # a raw socket throwing bytes at the port does not get through either
    import socket
    host, port = a.cfg.endpoint[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.sendall(b"\xff" * 64 + b"GET / HTTP/1.0\r\n\r\n")
    assert a.counters["received"] == 0
    _assert_served(a, keys)


@pytest.mark.integration
def test_coel_keys_command(tmp_path):
    out = make_keys(tmp_path / "cli-keys")
    old = (out / "server.key").read_bytes()
    r = subprocess.run([sys.executable, "-m", "coel", "keys", "--out", str(out), "--force"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "wrote server and client" in r.stdout
    assert (out / "server.key").read_bytes() != old and (out / "authorized" / "client.key").exists()
