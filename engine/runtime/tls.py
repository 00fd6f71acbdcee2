"""TLS contexts for DICOM associations (PS3.15 B.1, the Basic TLS Secure Transport
Connection Profile): the client side for remotes (`[remotes.AE] tls`), the server side for
the archive's own TLS port (`tls_port`).

Certificates are PEM files. The server asks peers for a certificate, and requires one that
chains to `tls_ca`, only when `tls_ca` is set (mutual authentication, as IHE ATNA nodes
do); without it any TLS client may associate, as on the plain port.
"""
from __future__ import annotations

import ssl

from stowage.engine.runtime.config import Config, ConfigError, Remote


def client_context(remote: Remote) -> ssl.SSLContext | None:
    """The client TLS context for associations to `remote`, or None when it has no TLS."""
    if not remote.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=remote.tls_ca or None)
    ctx.check_hostname = remote.tls_check_hostname
    if remote.tls_cert:
        ctx.load_cert_chain(remote.tls_cert, remote.tls_key)
    return ctx


def server_context(config: Config) -> ssl.SSLContext | None:
    """The server TLS context for the archive's TLS port, or None when it has none.
    Raises ConfigError, with the file and the reason, if the certificates do not load."""
    if not config.tls_port:
        return None
    return _server_context(config)


def http_context(config: Config) -> ssl.SSLContext | None:
    """The server TLS context for the HTTP port (`http_tls`: the same certificate, key and
    client CA as the DICOM TLS port), or None when it speaks plain HTTP."""
    return _server_context(config) if config.http_port and config.http_tls else None


def _server_context(config: Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"tls_cert/tls_key: cannot load {config.tls_cert} with {config.tls_key}: "
                          f"{getattr(e, 'reason', None) or getattr(e, 'strerror', None) or e}") from None
    if config.tls_ca:
        try:
            ctx.load_verify_locations(cafile=config.tls_ca)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"tls_ca: cannot load {config.tls_ca}: "
                              f"{getattr(e, 'reason', None) or getattr(e, 'strerror', None) or e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
