"""JSON log lines for ``--log-format json``.

One JSON object per line (NDJSON, no RFC 7464 record separator, so ``jq`` and
line-based shippers read it)::

    {"ts": "2026-11-22T03:04:05.678Z", "level": "info", "namespace": "...",
     "msg": "rendered message", <structured fields>, "traceback": "..."}

How it is wired under twistd: ``--log-format json`` on the plugin sets
twistd's own ``--logger`` option to ``firezone_relay.logs.json_observer``
(see ``tap.Options.postOptions``).  twistd then uses *this* observer instead
of its text observer for everything, its own start-up lines and the
redirected stdout/stderr included, so nothing is logged twice and every
stdout line is JSON.  An explicit ``--logger`` given to twistd wins.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any, NamedTuple, Optional

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import implementer

# Keys of legacy (twisted.python.log) events that are rendered into "msg"
# or are not useful as fields.
_SKIP = frozenset(("message", "isError", "format", "why", "failure", "time", "system"))
_RESERVED = frozenset(("ts", "level", "namespace", "msg", "traceback", "system"))
_PLAIN = (str, int, float, bool, type(None))


def _jsonable(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


def _timestamp(seconds: float) -> str:
    whole = int(seconds)
    millis = int((seconds - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + ".%03dZ" % millis


def format_json(event: LogEvent) -> str:
    """One event as a JSON line (with the trailing newline)."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "ts": _timestamp(event.get("log_time") or time.time()),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "log_legacy"),
    }
    try:
        msg = formatEvent(event)
    except Exception:  # formatEvent already guards; belt and braces
        msg = repr(event.get("log_format"))
    if not msg and "message" in event:
        msg = " ".join(str(m) for m in event["message"])
    record["msg"] = msg
    system = event.get("log_system", event.get("system"))
    if system and system != "-":
        record["system"] = system
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIP or key in _RESERVED:
            continue
        if _jsonable(value):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
        if event.get("isError") and record["level"] == "info":
            record["level"] = "error"
    elif event.get("isError"):
        record["level"] = "error"
    return json.dumps(record, default=str) + "\n"


def json_observer(out: Optional[IO[str]] = None) -> ILogObserver:
    """An observer writing ``format_json`` lines to ``out`` (default: stdout).

    twistd calls this with no argument before it redirects stdout into the
    log, so ``sys.stdout`` is looked up here, at call time, and is the real
    stream.
    """
    if out is not None:
        return FileLogObserver(out, format_json)
    # twistd's --logger factory: filtered by --log-level (see use_under_twistd).
    return level_filter(FileLogObserver(sys.stdout, format_json), _twistd.get("levels", LogLevels(LogLevel.info, None)))


# --- log level (--log-level, LOG_LEVEL, RUST_LOG) ----------------------------

#: A ``twisted.logger.LogLevel`` constant (``constantly`` ships no types).
NamedConstant = Any

#: Level words of upstream's tracing filter (and Twisted's own), to Twisted's levels.
#: tracing has no "critical"; "off" keeps only critical lines (a fatal exit's reason).
_LEVEL_WORDS = {
    "trace": LogLevel.debug,
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
    "off": LogLevel.critical,
    "5": LogLevel.debug,
    "4": LogLevel.debug,
    "3": LogLevel.info,
    "2": LogLevel.warn,
    "1": LogLevel.error,
    "0": LogLevel.critical,
}
#: tracing targets that mean this relay (upstream's binary logs under
#: ``relay`` and ``firezone_relay``): they set the level of our namespace.
_RELAY_TARGETS = frozenset(("relay", "firezone_relay", "firezone-relay", "relay_proto", "wire"))
RELAY_NAMESPACE = "firezone_relay"


class LogLevels(NamedTuple):
    """A parsed ``--log-level``: the global level and the relay's own."""

    default: NamedConstant
    relay: Optional[NamedConstant]


def parse_log_level(text: str) -> LogLevels:
    """Parse a level word or ``RUST_LOG``-style directives.

    ``info``, ``debug``…, or comma-separated directives such as
    ``warn,relay=debug``: a directive without ``=`` is the global level (the
    last one wins), ``relay=…`` / ``firezone_relay=…`` (and their ``::``
    children, and ``wire``) set the level of the relay's own log lines, any
    other target (``snownet=debug``) is ignored.  An empty value is
    ``info``.  Raises ``ValueError`` naming the bad part.
    """
    default: NamedConstant = LogLevel.info
    relay: Optional[NamedConstant] = None
    for directive in (part.strip() for part in text.split(",")):
        if not directive:
            continue
        target, sep, word = directive.rpartition("=")
        level = _LEVEL_WORDS.get(word.strip().lower())
        if not sep:
            if level is not None:
                default = level
            elif word.split("::")[0] in _RELAY_TARGETS:  # a bare target: everything
                relay = LogLevel.debug
            else:
                raise ValueError("%r is not a log level" % (directive,))
            continue
        if level is None:
            raise ValueError("%r: %r is not a log level" % (directive, word))
        target = target.strip().split("[")[0].split("::")[0]
        if target in _RELAY_TARGETS:
            relay = level if relay is None else _lower(relay, level)
    return LogLevels(default, relay)


def _lower(a: NamedConstant, b: NamedConstant) -> NamedConstant:
    order = list(LogLevel.iterconstants())
    return a if order.index(a) <= order.index(b) else b


@implementer(ILogFilterPredicate)
class _LevelPredicate:
    """``LogLevelFilterPredicate`` for ``LogLevels``; an event without a
    level counts as info and one without a namespace as a legacy event under
    the global level (Twisted's predicate drops both)."""

    def __init__(self, levels: LogLevels) -> None:
        self.set(levels)
        _predicates.append(self)

    def set(self, levels: LogLevels) -> None:
        inner = LogLevelFilterPredicate(defaultLogLevel=levels.default)
        if levels.relay is not None:
            inner.setLogLevelForNamespace(RELAY_NAMESPACE, levels.relay)
        self._inner = inner

    def __call__(self, event: LogEvent) -> NamedConstant:
        if event.get("log_level") is None or not event.get("log_namespace"):
            event = dict(event)
            event["log_level"] = event.get("log_level") or LogLevel.info
            event["log_namespace"] = event.get("log_namespace") or "log_legacy"
        return self._inner(event)


#: Every level filter made (one under twistd), so that a change at run time
#: (the control endpoint's /log_filter, a SIGHUP reload) reaches each.
_predicates: list[_LevelPredicate] = []


def apply_log_levels(levels: LogLevels) -> None:
    """Change the level of every running filter at once."""
    for predicate in _predicates:
        predicate.set(levels)


def set_log_level(text: str) -> str:
    """Parse ``text`` like ``--log-level`` and apply it; ``ValueError`` if bad."""
    apply_log_levels(parse_log_level(text))
    return text.strip() or "info"


def level_filter(observer: ILogObserver, levels: LogLevels) -> ILogObserver:
    """``observer`` behind a filter that passes only events at ``levels``."""
    return FilteringLogObserver(observer, [_LevelPredicate(levels)])


#: Filled in by ``use_under_twistd`` (from ``tap.Options.postOptions``) and
#: read by ``twistd_observer`` when twistd builds its log observer.
_twistd: dict[str, Any] = {}


def use_under_twistd(twistd_options: Any, levels: LogLevels, json_format: bool) -> None:
    """Route twistd's log observer through the level filter.

    twistd resolves its ``--logger`` option (a dotted name) after the
    plugin's options are parsed, and calls it once to make the observer for
    everything it logs.  With ``--log-format json`` (and no ``--logger``) that
    is ``json_observer``, which filters itself; otherwise
    ``twistd_observer``, which builds what twistd would have used (an
    explicit ``--logger``, or twistd's own text file, stdout or syslog
    observer) and puts the filter in front of it.
    """
    _twistd.clear()
    _twistd.update(levels=levels, options=twistd_options, inner=twistd_options["logger"])
    if json_format and twistd_options["logger"] is None:
        twistd_options["logger"] = "firezone_relay.logs.json_observer"
    else:
        twistd_options["logger"] = "firezone_relay.logs.twistd_observer"


def twistd_observer() -> ILogObserver:
    """twistd's ``--logger`` factory when the relay filters by level."""
    from twisted.python.reflect import namedAny

    inner_name = _twistd.get("inner")
    if inner_name is not None:
        observer = namedAny(inner_name)()
    else:
        from twisted.scripts.twistd import _SomeApplicationRunner  # type: ignore[attr-defined]

        observer = _SomeApplicationRunner.loggerFactory(_twistd["options"])._getLogObserver()
    if not ILogObserver.providedBy(observer):  # a legacy observer (syslog)
        observer = LegacyLogObserverWrapper(observer)
    return level_filter(observer, _twistd.get("levels", LogLevels(LogLevel.info, None)))
