"""CURVE keys and authentication for every CoEL socket.

Layout made by `coel keys --out DIR`:
    DIR/server.key, DIR/server.key_secret   the keypair every serving socket (agents, controller) uses
    DIR/client.key, DIR/client.key_secret   the keypair the controller and coordinators connect with
    DIR/authorized/client.key               public keys a server accepts (add more files to admit more)
A server only completes the CURVE handshake with clients whose public key is in `authorized/`
(ZAP via zmq.auth.ThreadAuthenticator, one per context); unknown keys and plain-text peers never
get a message through, and the server keeps running.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from coel_model.errors import ConfigError


@dataclass(frozen=True)
class KeyDir:
    """Resolved keys of one key directory (bytes as z85)."""
    server_public: bytes
    server_secret: bytes | None
    client_public: bytes
    client_secret: bytes | None
    authorized_dir: Path


def make_keys(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Create the server and client keypairs plus the authorized/ directory."""
    out = Path(out_dir)
    if (out / "server.key").exists() and not overwrite:
        raise ConfigError(f"{out}: keys already exist (server.key); use --force to replace them")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        for suffix in (".key", ".key_secret"):
            (out / f"{name}{suffix}").unlink(missing_ok=True)
        zmq.auth.create_certificates(out, name)
    (out / "server.key_secret").chmod(0o600)
    (out / "client.key_secret").chmod(0o600)
    auth = out / "authorized"
    auth.mkdir(exist_ok=True)
    shutil.copy(out / "client.key", auth / "client.key")
    return out


def _load_pair(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read CURVE certificate ({exc})") from None


def load_keys(key_dir: str | Path) -> KeyDir:
    d = Path(key_dir)
    if not d.is_dir():
        raise ConfigError(f"{d}: key directory not found (create one with `coel keys --out {d}`)")
    spub, ssec = _load_pair(d / "server.key_secret") if (d / "server.key_secret").exists() \
        else _load_pair(d / "server.key")
    cpub, csec = _load_pair(d / "client.key_secret") if (d / "client.key_secret").exists() \
        else _load_pair(d / "client.key")
    return KeyDir(spub, ssec, cpub, csec, d / "authorized")


def start_authenticator(ctx: zmq.Context, keys: KeyDir) -> ThreadAuthenticator:
    """Context-wide ZAP handler accepting only the public keys in keys.authorized_dir."""
    if not keys.authorized_dir.is_dir():
        raise ConfigError(f"{keys.authorized_dir}: no authorized/ directory of client public keys")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized_dir))
    return auth


def secure_server(sock: zmq.Socket, keys: KeyDir | None) -> None:
    """Make `sock` (before bind) a CURVE server; no-op when keys is None."""
    if keys is None:
        return
    if keys.server_secret is None:
        raise ConfigError("this key directory has no server.key_secret; servers need it")
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.curve_server = True


def secure_client(sock: zmq.Socket, keys: KeyDir | None, server_public: bytes | None = None) -> None:
    """Make `sock` (before connect) a CURVE client of a server with keys.server_public."""
    if keys is None:
        return
    if keys.client_secret is None:
        raise ConfigError("this key directory has no client.key_secret; clients need it")
    sock.curve_secretkey = keys.client_secret
    sock.curve_publickey = keys.client_public
    sock.curve_serverkey = server_public or keys.server_public
