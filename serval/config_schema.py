"""What the three daemons' configs share: one error type, reading TOML with the line of
every table and key, and typed readers for the values they hold.

A reader takes the raw value and ``fail(message)`` (which raises) and returns the value
in its typed form; a :class:`Table` binds the readers to one table of a file, so each
mistake is reported as ``ConfigError`` with the file, the line at fault and what to
write instead. The daemons' modules (gateway/config.py, router/config.py,
dns_resolver/config.py) say which keys exist and what they mean.
"""
from __future__ import annotations

import ipaddress
import re
import tomllib


class ConfigError(ValueError):
    """A config refused at start: ``path:line: message`` (or ``path: message``)."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line, self.message = path, line, message
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")


# --- lines -------------------------------------------------------------------------------
_KEY = re.compile(r'^\s*("[^"]*"|[A-Za-z0-9_-]+)\s*=')
_PART = re.compile(r'"([^"]*)"|([^.\s"]+)')


def _parts(header: str) -> list[str]:
    """``routing.health."ssh.svc.example"`` -> ["routing", "health", "ssh.svc.example"]."""
    return [quoted or bare for quoted, bare in _PART.findall(header)]


class Locator:
    """The line of each table and key in TOML text. A path names tables, array-table
    indexes and a key: ``("zone", 0, "service", 1, "name")``; the line of the nearest
    enclosing thing that was written is given for one that was not (a missing key)."""

    def __init__(self, text: str):
        self.lines: dict[tuple, int] = {}
        latest: dict[tuple, int] = {}     # (parent, array table) -> index of its last element
        path: tuple = ()

        def resolve(parts):
            out: tuple = ()
            for part in parts:
                out += (part, latest[(out, part)]) if (out, part) in latest else (part,)
            return out

        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if line.startswith("[["):
                parts = _parts(line[2:line.find("]]")])
                parent = resolve(parts[:-1])
                index = latest.get((parent, parts[-1]), -1) + 1
                latest[(parent, parts[-1])] = index
                path = parent + (parts[-1], index)
                self.lines.setdefault(path, n)
            elif line.startswith("["):
                path = resolve(_parts(line[1:line.find("]")]))
                self.lines.setdefault(path, n)
            else:
                m = _KEY.match(raw)
                if m:
                    self.lines.setdefault(path + (m.group(1).strip('"'),), n)

    def line(self, *path) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def read(path: str) -> tuple[dict, Locator]:
    """The TOML file at ``path`` and the lines of what it holds."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(path, int(m.group(1)) if m else None, f"not valid TOML: {exc}") from None
    return data, Locator(text)


def line_of(path: str, *where) -> int | None:
    """The line of ``where`` (as :meth:`Locator.line`) in the file at ``path``, for a check
    made after loading (against this host's links, say); None when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return Locator(f.read()).line(*where)
    except OSError:
        return None


# --- readers: (value, fail, ...) -> the value, or fail(message) --------------------------
def _named(name: str | None, message: str) -> str:
    return f"{name}: {message}" if name else message


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(value, fail, low: int, high: int, name: str | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        fail(_named(name, f"expected a whole number from {low} to {high}, got {value!r}"))
    return value


def number(value, fail, low: float, high: float | None = None, name: str | None = None) -> float:
    if not _is_number(value) or not low <= value or (high is not None and not value <= high):
        span = f"from {low:g} to {high:g}" if high is not None else f"of {low:g} or more"
        fail(_named(name, f"expected a number {span}, got {value!r}"))
    return float(value)


def seconds(value, fail, name: str, *, positive: bool = False, high: float | None = None) -> float:
    """A duration in seconds: 0 or more (``positive``: more than 0; up to ``high``)."""
    if not _is_number(value) or not value >= 0 or (positive and value == 0) \
            or (high is not None and not value <= high):
        fail(f"{name} must be a positive number of seconds" if positive
             else f"{name} must be a number of seconds from 0 to {high:g}" if high is not None
             else f"{name} must be a number of seconds (0 or more)")
    return float(value)


def boolean(value, fail, name: str) -> bool:
    if not isinstance(value, bool):
        fail(f"{name} must be true or false")
    return value


def choice(value, fail, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        words = [f'"{c}"' for c in choices]
        said = f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else words[0]
        fail(f"{name} must be {said}, not {value!r}")
    return value


def ipv4(value, fail) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        fail(f"not an IPv4 address: {value!r}")


def address_port(value, fail, name: str, default_port: int | None = None, ipv6: bool = False) -> tuple[str, int]:
    """``"198.19.3.2:8080"`` -> ("198.19.3.2", 8080). Without ``default_port`` the port
    must be written; with ``ipv6`` also ``"::1"`` and ``"[::1]:53"``."""
    text = str(value).strip()
    host, port = text, None
    bracketed = re.fullmatch(r"\[([^\]]+)\](?::(\d*))?", text) if ipv6 else None
    if bracketed:
        host, port = bracketed.group(1), bracketed.group(2)
    elif text.count(":") == 1 or not ipv6:
        head, sep, tail = text.rpartition(":")
        if sep:
            host, port = head, tail
    if port is None and default_port is None or port is not None and not port.isdigit():
        fail(f"bad port in {text!r}" if default_port is not None
             else f"{name} must be host:port, like \"198.19.3.2:8080\", not {value!r}")
    port = default_port if port is None else int(port)
    if not 0 < port < 65536:
        fail(f"port out of range in {text!r}")
    try:
        host = str(ipaddress.ip_address(host) if ipv6 else ipaddress.IPv4Address(host))
    except ValueError:
        fail(f"not an IP address: {text!r} (write \"198.19.1.1\", \"198.19.1.1:5353\" or \"[::1]:53\")"
             if ipv6 else f"not an IPv4 address: {text!r}")
    return host, port


def ipv4_network(value, fail, name: str) -> str:
    """A network written exactly (no host bits): ``"198.18.0.0/16"``."""
    try:
        return str(ipaddress.IPv4Network(str(value)))
    except ValueError as exc:
        fail(f"{name}: {exc}")


def networks(value, fail) -> list[str]:
    """One network or a list (IPv4 or IPv6; host bits are dropped): ``"198.19.1.0/24"``."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        fail("expected a list of networks like \"198.19.1.0/24\"")
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError:
            fail(f"not a network: {item!r}")
    return out


def listing(value, fail, read, what: str, *, one: bool = False, empty: bool = True, unique: str = "") -> list:
    """A list read item by item by ``read(item)``; ``what`` says what the list holds.
    ``one``: a single string stands for a list of it; ``unique``: a repeated item is
    refused with that message."""
    if one and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or (not empty and not value):
        fail(what)
    out = [read(item) for item in value]
    if unique and len(set(out)) != len(out):
        fail(unique)
    return out


# --- a table and its keys ----------------------------------------------------------------
class Table:
    """One table of a config file: ``values`` read at ``where`` (a :class:`Locator` path),
    ``fail_at(where, message)`` raising. Each reader takes the key and its default."""

    _absent = object()

    def __init__(self, values: dict, where: tuple, fail_at):
        if not isinstance(values, dict):
            fail_at(where, f"[{'.'.join(map(str, where))}] must be a table")
        self.values, self.where, self.fail_at = values, where, fail_at

    def fail(self, key: str | None, message: str):
        self.fail_at(self.where + ((key,) if key else ()), message)

    def failer(self, key: str | None):
        return lambda message: self.fail(key, message)

    def only(self, known, say: str = "") -> None:
        """Refuses a key not in ``known``, at its line (``say``: what follows the name)."""
        for key in self.values:
            if key not in known:
                self.fail(key, f"unknown key {key!r}{say}")

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    def int(self, key: str, default: int, low: int, high: int) -> int:
        return integer(self.values.get(key, default), self.failer(key), low, high, key)

    def number(self, key: str, default: float, low: float, high: float | None = None) -> float:
        return number(self.values.get(key, default), self.failer(key), low, high, key)

    def seconds(self, key: str, default: float, **rule) -> float:
        return seconds(self.values.get(key, default), self.failer(key), key, **rule)

    def bool(self, key: str, default: bool) -> bool:
        return boolean(self.values.get(key, default), self.failer(key), key)

    def choice(self, key: str, default: str, choices) -> str:
        return choice(self.values.get(key, default), self.failer(key), key, choices)

    def str(self, key: str, default: str | None = None) -> str | None:
        value = self.values.get(key, self._absent)
        return default if value is self._absent else str(value)

    def ipv4(self, key: str, default: str | None = None) -> str | None:
        return ipv4(self.values[key], self.failer(key)) if key in self.values else default

    def address_port(self, key: str, default=None, **rule) -> tuple | None:
        if key not in self.values:
            return default
        return address_port(self.values[key], self.failer(key), key, **rule)


def tables(data: dict, name: str, fail) -> list:
    """The elements of the array of tables ``[[name]]`` (``fail(message)`` raises)."""
    items = data.get(name, [])
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        fail(f"write [[{name}]] (an array of tables), not [{name}]")
    return items
