"""The address specs of ssh-style forwarding: `-L`, `-R`, `-D`, `--http-proxy`, `--permit`.

    [BIND:]PORT                    a TCP listener (BIND defaults to 127.0.0.1; PORT 0: any free port)
    /path/to/socket                a Unix socket listener (any spec containing "/")
    [BIND:]PORT:HOST:HOSTPORT      -L / -R: listen there, connect to HOST:HOSTPORT
    HOST:PORT                      --permit: a destination `serve` may connect to;
                                   "*" matches any host or any port

IPv6 addresses go in brackets: `[::1]:8080`, `8080:[2001:db8::1]:80`.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

DEFAULT_BIND = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class Listen:
    """Where a listener binds: a TCP host and port, or a Unix socket path."""

    host: str = DEFAULT_BIND
    port: int = 0
    path: Optional[str] = None

    def __str__(self) -> str:
        return self.path if self.path is not None else f"{_bracket(self.host)}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Forward:
    """A listener and the destination each of its connections goes to."""

    listen: Listen
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.listen} -> {_bracket(self.host)}:{self.port}"


def parse_listen(spec: str) -> Listen:
    """`[BIND:]PORT` or a Unix socket path."""
    if "/" in spec:
        return Listen(path=spec)
    parts = _split(spec)
    if len(parts) == 1:
        return Listen(port=_port(parts[0], spec, lowest=0))
    if len(parts) == 2 and parts[0]:
        return Listen(host=parts[0], port=_port(parts[1], spec, lowest=0))
    raise ValueError(f"{spec!r} is not [BIND:]PORT or a socket path")


def parse_forward(spec: str) -> Forward:
    """`[BIND:]PORT:HOST:HOSTPORT`, or `/path/to/socket:HOST:HOSTPORT`."""
    if "/" in spec:
        path, _, rest = spec.rpartition("/")
        name, sep, destination = rest.partition(":")
        if not sep:
            raise ValueError(f"{spec!r} is not SOCKET_PATH:HOST:HOSTPORT")
        host, port = parse_destination(destination)
        return Forward(Listen(path=f"{path}/{name}"), host, port)
    parts = _split(spec)
    if len(parts) not in (3, 4) or not parts[-2]:
        raise ValueError(f"{spec!r} is not [BIND:]PORT:HOST:HOSTPORT")
    listen = parse_listen(":".join(_bracket(p) for p in parts[:-2]))
    return Forward(listen, parts[-2], _port(parts[-1], spec))


def parse_destination(spec: str) -> Tuple[str, int]:
    """`HOST:PORT` (IPv6 in brackets)."""
    parts = _split(spec)
    if len(parts) != 2 or not parts[0]:
        raise ValueError(f"{spec!r} is not HOST:PORT")
    return parts[0], _port(parts[1], spec)


class Permit:
    """Where `serve` may connect, like sshd's PermitOpen. No rules: anywhere."""

    def __init__(self, specs: List[str]) -> None:
        self._rules: List[Tuple[str, str]] = []
        for spec in specs:
            parts = _split(spec)
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise ValueError(f"--permit {spec!r} is not HOST:PORT (either may be *)")
            if parts[1] != "*":
                _port(parts[1], spec)
            self._rules.append((parts[0].lower(), parts[1]))

    def allows(self, host: str, port: int) -> bool:
        """Whether a connection to host:port is permitted."""
        if not self._rules:
            return True
        return any(h in ("*", host.lower()) and p in ("*", str(port)) for h, p in self._rules)

    def __str__(self) -> str:
        return ", ".join(f"{_bracket(h)}:{p}" for h, p in self._rules) or "anywhere"


def _split(spec: str) -> List[str]:
    """Split on colons, keeping bracketed IPv6 addresses whole (without brackets)."""
    parts: List[str] = []
    rest = spec
    while rest:
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                raise ValueError(f"unclosed '[' in {spec!r}")
            parts.append(rest[1:end])
            rest = rest[end + 1:]
            if rest and not rest.startswith(":"):
                raise ValueError(f"expected ':' after ']' in {spec!r}")
            rest = rest[1:]
            if not rest and spec.endswith(":"):
                parts.append("")
        else:
            head, sep, rest = rest.partition(":")
            parts.append(head)
            if sep and not rest:
                parts.append("")
    return parts


def _port(text: str, spec: str, lowest: int = 1) -> int:
    if not text.isdigit() or not lowest <= int(text) < 65536:
        raise ValueError(f"bad port {text!r} in {spec!r} ({lowest}-65535)")
    return int(text)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
