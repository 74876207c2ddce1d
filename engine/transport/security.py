"""CurveZMQ: encryption and client authentication for the transport.

A worker given a secret key (``--curve-secret-key worker.key_secret``) and a
directory of authorized client public keys (``--curve-clients DIR``) accepts
connections only from those clients, and all traffic is encrypted. A client
sets ``transport_curve_server_key`` (the worker's public key file) and
``transport_curve_client_key`` (its own secret key file). ``engine keys DIR NAME``
makes a key pair. A client without an authorized key gets nothing run: the
handshake fails before any frame reaches the worker.
"""

from __future__ import annotations

import os
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from engine.exceptions import ImproperlyConfigured

__all__ = ("load_public", "load_secret", "make_keys", "secure_client", "secure_server")


def make_keys(directory: str, name: str) -> tuple[str, str]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` into ``directory``; return their paths."""
    os.makedirs(directory, exist_ok=True)
    return zmq.auth.create_certificates(directory, name)


def load_secret(path: str) -> tuple[bytes, bytes]:
    """Return ``(public, secret)`` from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ImproperlyConfigured(f"cannot read CURVE secret key {path!r}: {exc}") from None
    if not secret:
        raise ImproperlyConfigured(f"{path!r} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public(path: str) -> bytes:
    """Return the public key from a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ImproperlyConfigured(f"cannot read CURVE public key {path!r}: {exc}") from None
    return public


def secure_server(context: zmq.Context, sock: zmq.Socket, secret_key_file: str, clients_dir: str) -> Any:
    """Make ``sock`` a CURVE server that admits only the public keys in ``clients_dir``.

    Returns the authenticator thread (stop it when the socket is closed).
    """
    if not os.path.isdir(clients_dir):
        raise ImproperlyConfigured(f"CURVE clients directory {clients_dir!r} does not exist")
    public, secret = load_secret(secret_key_file)
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=clients_dir)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return authenticator


def curve_server_socket(sock: zmq.Socket, secret_key_file: str) -> None:
    """Make ``sock`` a CURVE server with the keys in ``secret_key_file``, admitted by the authenticator
    :func:`secure_server` already started on the same context (one per context)."""
    public, secret = load_secret(secret_key_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def secure_client(sock: zmq.Socket, server_key_file: str, client_key_file: str) -> None:
    """Make ``sock`` a CURVE client of the server whose public key is in ``server_key_file``."""
    public, secret = load_secret(client_key_file)
    sock.curve_serverkey = load_public(server_key_file)
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def secure_app_client(app: Any, sock: zmq.Socket) -> None:
    """CURVE-encrypt and authenticate a client socket of ``app`` when the app has keys set (else nothing)."""
    server_key = app.conf.transport_curve_server_key
    client_key = app.conf.transport_curve_client_key
    if server_key or client_key:
        if not (server_key and client_key):
            raise ImproperlyConfigured("CURVE needs both transport_curve_server_key and transport_curve_client_key")
        secure_client(sock, server_key, client_key)
