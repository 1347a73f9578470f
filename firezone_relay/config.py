"""``--config FILE``: the relay's flags as a TOML file (SPEC §10).

Keys are the flag names (``listen-port = 3479``, ``allow-peer = ["203.0.113.0/24"]``,
``allow-loopback-peers = true``).  A file only supplies values: they are
turned into command-line arguments placed before the environment's, which go
before the real command line, so the precedence is flag > env > file >
default and every value goes through the same validation as a flag.

Errors name the file, the line and the key: ``tomllib`` reports a syntax
error's line itself; for a key with the wrong type or an unknown key the line
is found by scanning the text for the key's assignment (the first one: TOML
forbids defining a key twice).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

#: A file larger than this is refused: a config file is a few KiB.
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(Exception):
    """The file cannot be used; the message names the file, line and key."""


@dataclass(frozen=True)
class FlagSpec:
    """What the file may set: the flag names by kind."""

    parameters: frozenset[str]  # take one value
    flags: frozenset[str]  # booleans
    repeatable: frozenset[str]  # lists of values


@dataclass(frozen=True)
class ConfigFile:
    """A parsed file: its path, its values by flag name and each key's line."""

    path: str
    values: Mapping[str, Any]
    lines: Mapping[str, int]

    def arguments(self) -> list[str]:
        """The values as command-line arguments (``--name value`` pairs)."""
        args: list[str] = []
        for name, value in self.values.items():
            if isinstance(value, bool):
                if value:
                    args.append("--" + name)
            elif isinstance(value, list):
                for item in value:
                    args += ["--" + name, _text(item)]
            else:
                args += ["--" + name, _text(value)]
        return args

    def where(self, name: str) -> str:
        """``FILE:LINE`` of ``name``'s assignment (``FILE`` if unknown)."""
        line = self.lines.get(name)
        return "%s:%d" % (self.path, line) if line else self.path


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


_KEY_LINE = re.compile(r"""^\s*\[*\s*(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*(?:=|\])""")


def _key_lines(text: str) -> dict[str, int]:
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = _KEY_LINE.match(line)
        if match:
            key = next(g for g in match.groups() if g is not None)
            lines.setdefault(key, number)
    return lines


def parse_config(path: str, text: str, spec: FlagSpec) -> ConfigFile:
    """Parse ``text`` (the content of ``path``) against ``spec``."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line L, column C)".
        raise ConfigError("%s: not valid TOML: %s" % (path, exc)) from None
    lines = _key_lines(text)
    known = spec.parameters | spec.flags | spec.repeatable
    values: dict[str, Any] = {}

    def where(key: str) -> str:
        line = lines.get(key)
        return "%s:%d" % (path, line) if line else path

    for key, value in document.items():
        if isinstance(value, dict):
            raise ConfigError("%s: [%s]: tables are not used; write the flags as top-level keys" % (where(key), key))
        if key not in known:
            hint = _closest(key, known)
            raise ConfigError(
                "%s: unknown key %r%s" % (where(key), key, " (did you mean %r?)" % hint if hint else "")
            )
        if key == "config":
            raise ConfigError("%s: 'config' cannot be set inside a config file" % where(key))
        if key in spec.flags:
            if not isinstance(value, bool):
                raise ConfigError("%s: key %r must be true or false, not %s" % (where(key), key, _kind(value)))
        elif key in spec.repeatable:
            items = value if isinstance(value, list) else [value]
            for item in items:
                if not isinstance(item, str):
                    raise ConfigError(
                        "%s: key %r must be a string or a list of strings, not a list with %s"
                        % (where(key), key, _kind(item))
                    )
            value = list(items)
        else:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ConfigError("%s: key %r must be a string or a number, not %s" % (where(key), key, _kind(value)))
        values[key] = value
    return ConfigFile(path, values, lines)


def load_config(path: str, spec: FlagSpec) -> ConfigFile:
    """Read and parse ``path``; ``ConfigError`` with a clear message otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError("%s: cannot be read: %s" % (path, exc.strerror or exc)) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError("%s: larger than %d bytes" % (path, MAX_CONFIG_BYTES))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError("%s:%d: not UTF-8 text" % (path, line)) from None
    return parse_config(path, text, spec)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return "a %s" % type(value).__name__  # dates and times


def _closest(key: str, known: Iterable[str]) -> Optional[str]:
    import difflib

    matches = difflib.get_close_matches(key.replace("_", "-"), sorted(known), n=1, cutoff=0.75)
    return matches[0] if matches else None


def flag_of_error(message: str, names: Sequence[str]) -> Optional[str]:
    """The flag a usage error message is about (it starts with ``--flag``)."""
    match = re.match(r"--([a-z0-9-]+)", message)
    if match and match.group(1) in names:
        return match.group(1)
    return None


def drop_overridden(args: Sequence[str], later: Sequence[str], drop: Iterable[str], takes_value: Iterable[str]) -> list[str]:
    """``args`` (``--name [value]`` from the file or the environment) without
    the flags named in ``drop`` that ``later`` arguments give again (flag >
    env > file): a value that is replaced is never parsed, so a bad one there
    cannot stop the start or be reported under the wrong source.
    ``takes_value``: the names followed by a value."""
    given = {a[2:].split("=", 1)[0] for a in later if a.startswith("--")}
    drop, takes_value = set(drop) & given, set(takes_value)
    out: list[str] = []
    i = 0
    while i < len(args):
        name = args[i][2:]
        width = 2 if name in takes_value else 1
        if name not in drop:
            out += args[i : i + width]
        i += width
    return out
