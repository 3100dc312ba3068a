"""DICOM TLS (PS3.15 Annex B, the BCP 195 TLS Secure Transport Connection Profiles).

Both sides use TLS 1.2 or newer. With TLS 1.2 only the AEAD cipher suites with forward secrecy
that BCP 195 (RFC 9325 section 4.2) recommends are offered; TLS 1.3 suites are all of that kind.
Compression and renegotiation are off.

The SCP's context does not shake hands in the thread that accepts connections (pynetdicom wraps
accepted sockets there, and one silent client would stall every other): the handshake runs in
the connection's own thread, bounded by a time-out (:func:`handshake`, called for pynetdicom's
associations by :func:`anonproxy.pynetdicom_patches.finish_tls_handshake`, and by the admin
endpoint for its own connections).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from anonproxy.config import TlsClientConfig, TlsServerConfig
from anonproxy.errors import ConfigError

# RFC 9325 section 4.2 (BCP 195): ECDHE (and DHE, for peers that lack ECDHE) with AES-GCM, and
# ChaCha20-Poly1305; ECDSA and RSA certificates.
BCP195_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    ]
)


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets shake hands on demand, not when they are wrapped."""

    def wrap_socket(  # type: ignore[override]
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        **kwargs: Any,  # noqa: ANN401 - passed through to SSLContext.wrap_socket
    ) -> ssl.SSLSocket:
        del do_handshake_on_connect
        return super().wrap_socket(
            sock, server_side=server_side, do_handshake_on_connect=False, **kwargs
        )


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _load_cas(context: ssl.SSLContext, path: Path, key: str) -> None:
    try:
        if path.is_dir():
            context.load_verify_locations(capath=str(path))
        else:
            context.load_verify_locations(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        msg = f"{key}.ca_certificates: cannot load {path}: {_reason(exc)}"
        raise ConfigError(msg) from None


def _load_pair(context: ssl.SSLContext, certificate: Path, private_key: Path, key: str) -> None:
    try:
        context.load_cert_chain(str(certificate), str(private_key))
    except (OSError, ssl.SSLError) as exc:
        msg = f"{key}: cannot load certificate {certificate} / key {private_key}: {_reason(exc)}"
        raise ConfigError(msg) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def server_context(config: TlsServerConfig, key: str = "listen.tls") -> ssl.SSLContext:
    """The SCP's context. Without ``require_client_certificate``, a client certificate is
    verified when one is presented and ``ca_certificates`` is given."""
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_pair(context, config.certificate, config.private_key, key)
    if config.ca_certificates is not None:
        _load_cas(context, config.ca_certificates, key)
        context.verify_mode = (
            ssl.CERT_REQUIRED if config.require_client_certificate else ssl.CERT_OPTIONAL
        )
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(config: TlsClientConfig, key: str = "tls") -> ssl.SSLContext:
    """A context to call a destination: its certificate must chain to ``ca_certificates`` (and
    name the destination's host unless ``verify_hostname`` is off)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context)
    _load_cas(context, config.ca_certificates, key)
    context.check_hostname = config.verify_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if config.certificate is not None and config.private_key is not None:
        _load_pair(context, config.certificate, config.private_key, key)
    return context


def handshake(sock: ssl.SSLSocket, timeout: float) -> None:
    """Complete the server-side handshake within *timeout* seconds, then block as before.

    Raises :class:`ssl.SSLError`, :class:`TimeoutError` or :class:`OSError`.
    """
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        sock.do_handshake()
    finally:
        sock.settimeout(previous)


def failure_reason(exc: BaseException) -> str:
    """A short, data-free description of a failed handshake (for the audit trail)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return "handshake time-out"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.library or "TLS error")
    return _reason(exc)


def session_summary(sock: ssl.SSLSocket) -> dict[str, Any]:
    """TLS version, cipher suite and the client certificate's subject common name, if any."""
    cipher = sock.cipher()
    summary: dict[str, Any] = {
        "tls_version": sock.version(),
        "tls_cipher": cipher[0] if cipher else None,
    }
    certificate: Any = sock.getpeercert()
    if certificate:
        common = [
            value
            for rdn in certificate.get("subject", ())
            for name, value in rdn
            if name == "commonName"
        ]
        summary["client_certificate"] = common[0] if common else ""
    return summary
