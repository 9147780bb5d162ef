"""host:port strings, checked once at the edge."""

from __future__ import annotations

from constmig.errors import ConfigError


def parse_addr(text: str) -> tuple[str, int]:
    """'127.0.0.1:7001' -> ('127.0.0.1', 7001); '[::1]:7001' works too."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"bad address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:7001")
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"bad port in address {text!r}") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"port out of range in address {text!r}")
    return host, p
