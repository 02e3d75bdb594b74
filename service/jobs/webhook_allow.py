"""`--webhook-allow`: which hosts and ports a job's webhook may call (the SSRF guard of webhooks).

A pattern is `HOST`, `HOST:PORT` or `HOST:*`, comma-separated in the setting:

- HOST is a name with shell-style `*` wildcards (`hooks.example.com`, `*.example.com`: `*` matches any
  run of characters, dots included, so `*.example.com` allows `a.b.example.com` but not `example.com`);
  an IPv4 address, `*` allowed (`10.0.*`, `127.0.0.1`); an IPv6 address in brackets, exact (`[::1]`);
  or `*` alone: any host (every address the service can reach: only for a trusted network).
- A name pattern matches names only, an IPv4 pattern IPv4 addresses only: `10.*` never lets through a
  name such as `10.attacker.example`.
- No port: the URL's scheme's default port only (80 for http, 443 for https); `:PORT` that port; `:*`
  any port.

Matching is on the URL's host as written, never on what it resolves to (allow names whose DNS you
trust). Names are compared lower-case, without a trailing dot, international names in their `xn--`
form. A URL host that looks numeric but is not a dotted-quad IPv4 address (`2130706433`, `0x7f.1`,
`127.1`: other spellings of 127.0.0.1 to a resolver) is refused, so every IPv4 address has one
spelling for the patterns to match.

`parse_allow` is the setting's converter (service/converters.py); `AllowList` matches URLs' hosts.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

ANY_PORT = -1
DEFAULT_PORTS = {"http": 80, "https": 443}

_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_NAME_PATTERN = re.compile(r"[a-z0-9_*-]+(?:\.[a-z0-9_*-]+)*")
_IPV4_PATTERN = re.compile(r"[0-9*]+(?:\.[0-9*]+)*")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


@dataclass(frozen=True)
class HostPattern:
    """One parsed pattern. `kind` is "any", "name", "ipv4" or "ipv6"; `port` is a number, ANY_PORT, or
    None (the scheme's default port)."""

    kind: str
    host: str
    port: int | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.kind == "ipv6" else self.host
        if self.port is None:
            return host
        return f"{host}:{'*' if self.port == ANY_PORT else self.port}"

    def allows(self, kind: str, host: str, port: int, default_port: int) -> bool:
        """Whether a URL's host (as `url_host` classified it) and port fit this pattern."""
        if self.port is None and port != default_port:
            return False
        if self.port not in (None, ANY_PORT) and port != self.port:
            return False
        if self.kind == "any":
            return True
        if self.kind != kind:
            return False
        if kind == "ipv6":
            return ipaddress.IPv6Address(self.host) == ipaddress.IPv6Address(host)
        return fnmatch.fnmatchcase(host, self.host)


def parse_pattern(text: str) -> HostPattern:
    """One `host[:port]` pattern, or ValueError saying what to write instead."""
    original = text.strip()
    text = original.lower()
    if "://" in text or "/" in text or "@" in text:
        raise ValueError(f"{original!r}: write a host[:port] pattern, without a scheme, user or path "
                         "(e.g. hooks.example.com:8443)")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{original!r}: an IPv6 address needs its closing bracket (e.g. [::1]:9000)")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{original!r}: write [IPv6]:PORT (e.g. [::1]:9000)")
        port_text: str | None = rest[1:] if rest else None
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{original!r}: not an IPv6 address in brackets (wildcards are not taken there)") from None
        if address.scope_id:
            raise ValueError(f"{original!r}: an IPv6 address with a zone (%…) cannot be allowed")
        return HostPattern("ipv6", address.compressed, _pattern_port(port_text, original))
    if text.count(":") > 1:
        raise ValueError(f"{original!r}: put an IPv6 address in brackets (e.g. [::1] or [::1]:9000)")
    host, sep, port_part = text.partition(":")
    port = _pattern_port(port_part if sep else None, original)
    host = host.removesuffix(".")
    if host == "*":
        return HostPattern("any", "*", port)
    if _IPV4_PATTERN.fullmatch(host) and any(c.isdigit() for c in host):
        if "*" not in host:
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{original!r}: not an IPv4 address (write four numbers 0-255, or use *)") from None
        return HostPattern("ipv4", host, port)
    if not host:
        raise ValueError(f"{original!r}: no host (write e.g. hooks.example.com or *.example.com:8443)")
    if not _NAME_PATTERN.fullmatch(host):
        raise ValueError(f"{original!r}: a host name has only letters, digits, '-', '_', '.' and the wildcard '*' "
                         "(write international names in their xn-- form)")
    return HostPattern("name", host, port)


def _pattern_port(text: str | None, original: str) -> int | None:
    if text is None:
        return None
    if text == "*":
        return ANY_PORT
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{original!r}: the port must be a number from 1 to 65535, or * for any port")
    return int(text)


def parse_allow(s: str) -> tuple[str, ...]:
    """The `--webhook-allow` converter: comma-separated patterns, each checked, kept in their normal
    form (lower-case, IPv6 compressed), duplicates dropped."""
    patterns = [str(parse_pattern(part)) for part in s.split(",") if part.strip()]
    if not patterns:
        raise ValueError("no host patterns given (e.g. hooks.example.com,*.internal.example:8443)")
    return tuple(dict.fromkeys(patterns))


def url_host(raw_host: str) -> tuple[str, str]:
    """(kind, host) of a URL's host as yarl gives it (`URL.raw_host`: IDNA-encoded, IPv6 without its
    brackets): kind "ipv4", "ipv6" or "name". ValueError for a host no pattern should ever match."""
    host = raw_host.lower()
    if ":" in host:
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("not a valid IPv6 address") from None
        if address.scope_id:
            raise ValueError("an IPv6 address with a zone (%…) is not allowed")
        return "ipv6", address.compressed
    host = host.removesuffix(".")
    if not _NAME.fullmatch(host):
        raise ValueError("not a valid host name")
    if _NUMERIC_LABEL.fullmatch(host.rpartition(".")[2]):
        try:
            return "ipv4", str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError("write an IPv4 address as four decimal numbers 0-255 (e.g. 192.0.2.7)") from None
    return "name", host


class AllowList:
    """The parsed `--webhook-allow` patterns; empty: nothing is allowed."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(parse_pattern(p) for p in patterns)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def allows(self, kind: str, host: str, port: int, default_port: int) -> bool:
        return any(p.allows(kind, host, port, default_port) for p in self.patterns)
