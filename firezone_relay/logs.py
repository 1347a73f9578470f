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
import string
import sys
import time
from typing import IO, Any, NamedTuple, Optional

from twisted.logger import (
    FileLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    PredicateResult,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime as _formatTime,
)
from zope.interface import implementer

# Keys of legacy (twisted.python.log) events that are rendered into "msg"
# or are not useful as fields.
_SKIP = frozenset(("message", "isError", "format", "why", "failure", "time", "system"))
_RESERVED = frozenset(("ts", "level", "namespace", "msg", "traceback", "system"))
_PLAIN = (str, int, float, bool, type(None))
_formatter = string.Formatter()


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
        #: namespace -> rank of its lowest level logged (``inner``'s answer, kept).
        self._thresholds: dict[str, int] = {}

    def __call__(self, event: LogEvent) -> NamedConstant:
        level = event.get("log_level")
        namespace = event.get("log_namespace")
        if level is None or not namespace:
            event = dict(event)
            event["log_level"] = event.get("log_level") or LogLevel.info
            event["log_namespace"] = event.get("log_namespace") or "log_legacy"
            return self._inner(event)
        rank = _LEVEL_RANK.get(level) if type(level) is type(LogLevel.info) else None
        if rank is None or type(namespace) is not str:
            return self._inner(event)
        thresholds = self._thresholds
        threshold = thresholds.get(namespace)
        if threshold is None:
            if len(thresholds) >= 1024:
                thresholds.clear()
            threshold = thresholds[namespace] = _LEVEL_RANK[self._inner.logLevelForNamespace(namespace)]
        return PredicateResult.no if rank < threshold else PredicateResult.maybe


#: Twisted's levels in their order (debug lowest).
_LEVEL_RANK: dict[NamedConstant, int] = {level: rank for rank, level in enumerate(LogLevel.iterconstants())}

_INFO = LogLevel.info

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
    return _LevelFilter(observer, _LevelPredicate(levels))


@implementer(ILogObserver)
class _LevelFilter:
    """``FilteringLogObserver`` with one predicate, without its generic
    loop over predicates: an event goes on unless the predicate says no."""

    def __init__(self, observer: ILogObserver, predicate: _LevelPredicate) -> None:
        self._observer = observer
        self._predicate = predicate

    def __call__(self, event: LogEvent) -> None:
        if self._predicate(event) is PredicateResult.no:
            return
        if "log_trace" in event:
            event["log_trace"].append((self, self._observer))
        self._observer(event)


class RelayLogger(Logger):
    """``twisted.logger.Logger`` whose ``emit`` checks the level with a dict
    lookup instead of Twisted's sorted list of every level per call; the
    event is built the same way.  For the relay's per-allocation lines."""

    def emit(self, level: NamedConstant, format: Optional[str] = None, **kwargs: object) -> None:
        try:
            known = level in _LEVEL_RANK
        except TypeError:
            known = False
        if not known:
            Logger.emit(self, level, format, **kwargs)  # Twisted's own complaint about the level
            return
        self._emit(level, format, kwargs)

    def info(self, format: Optional[str] = None, **kwargs: object) -> None:
        """``Logger.info``, without its second call (to ``emit``, which
        packs the keyword arguments again): the shell's channel lines are
        info lines (its allocation lines: ``info_event``)."""
        self._emit(_INFO, format, kwargs)

    def info_event(self, format: str, event: dict[str, Any]) -> None:
        """An info line whose fields the caller has put in ``event``, a dict
        it gives up (the logger's keys are added to it)."""
        self._emit(_INFO, format, event)

    def _emit(self, level: NamedConstant, format: Optional[str], event: dict[str, Any]) -> None:
        # Twisted's Logger.emit builds the same keys with event.update(...)
        # (a dict of keyword arguments more per event); the same order.
        event["log_logger"] = self
        event["log_level"] = level
        event["log_namespace"] = self.namespace
        event["log_source"] = self.source
        event["log_format"] = format
        event["log_time"] = time.time()
        if "log_trace" in event:
            event["log_trace"].append((self, self.observer))
        self.observer(event)


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

        observer = faster_text(_SomeApplicationRunner.loggerFactory(_twistd["options"])._getLogObserver())
    if not ILogObserver.providedBy(observer):  # a legacy observer (syslog)
        observer = LegacyLogObserverWrapper(observer)
    return level_filter(observer, _twistd.get("levels", LogLevels(LogLevel.info, None)))


# --- twistd's text lines, made cheaper -----------------------------------------
#
# twistd's text observer (``textFileLogObserver``) formats every event with
# ``formatEventAsClassicLogText``: a timezone-aware ``datetime`` built per
# event for the time stamp, and ``string.Formatter`` with a call-wrapping
# mapping for the message.  On a busy relay that is a large part of an
# Allocate (its ``allocation created`` line).  ``format_classic`` writes the
# same text: the time stamp text is kept for the current second, and the
# parsed message format is kept per format string for formats whose fields
# are plain names; anything else (a failure, flattened or bytes formats,
# dotted/indexed/called fields, nested format specs, an error while
# formatting) goes to Twisted's own formatter, so the output is identical.

#: The ``"%Y-%m-%dT%H:%M:%S%z"`` text of one whole second: [second, text].
_second: list[Any] = [None, ""]
#: A fraction of a second below which ``datetime.fromtimestamp``'s rounding
#: to microseconds cannot carry into the next second.
_SAFE_FRACTION = 0.999999
#: log_format -> its parsed fields, or None when Twisted must format it.
_parsed: dict[str, Optional[tuple[tuple[str, Optional[str], str, Optional[str]], ...]]] = {}
_PARSED_MAX = 1024


def _classic_time(when: Any) -> str:
    if when is None:
        return "-"
    second = int(when)
    if second == _second[0] and when - second < _SAFE_FRACTION:
        return str(_second[1])
    text = _formatTime(when)
    if when - second < _SAFE_FRACTION:
        _second[0], _second[1] = second, text
    return text


def _parse_format(fmt: str) -> Optional[tuple[tuple[str, Optional[str], str, Optional[str]], ...]]:
    try:
        parts = tuple(_formatter.parse(fmt))
    except ValueError:
        return None
    for _literal, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.isidentifier() or "{" in (spec or "") or conversion not in (None, "r", "s", "a"):
            return None
    return parts  # type: ignore[return-value]


def _format_message(event: LogEvent, fmt: str) -> Optional[str]:
    """The message of ``event`` as Twisted's ``formatWithCall`` renders it,
    or None if this fast path does not handle it."""
    try:
        parts = _parsed[fmt]
    except KeyError:
        if len(_parsed) >= _PARSED_MAX:
            _parsed.clear()
        parts = _parsed[fmt] = _parse_format(fmt)
    if parts is None:
        return None
    out = []
    for literal, name, spec, conversion in parts:
        if literal:
            out.append(literal)
        if name is None:
            continue
        value = event[name]
        if conversion == "r":
            value = repr(value)
        elif conversion == "s":
            value = str(value)
        elif conversion == "a":
            value = ascii(value)
        out.append(format(value, spec or ""))
    return "".join(out)


def format_classic(event: LogEvent) -> Optional[str]:
    """``event`` as twistd's text log line (``formatEventAsClassicLogText``
    with its default time format): the same text, cheaper."""
    fmt = event.get("log_format")
    if "log_failure" in event or "log_flattened" in event or type(fmt) is not str:
        return _twisted_classic(event)
    try:
        text = _format_message(event, fmt)
    except Exception:
        text = None
    if text is None:
        return _twisted_classic(event)
    if not text:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = "%s#%s" % (event.get("log_namespace", "-"), "-" if level is None else level.name)
    elif type(system) is not str:
        return _twisted_classic(event)
    line = "%s [%s] %s\n" % (_classic_time(event.get("log_time")), system, text)
    if "\n" in text:
        line = line[:-1].replace("\n", "\n\t") + "\n"
    return line


def _twisted_classic(event: LogEvent) -> Optional[str]:
    return formatEventAsClassicLogText(event, formatTime=_classic_time)


def faster_text(observer: Any) -> Any:
    """twistd's own text observer (``textFileLogObserver``, to stdout or the
    ``--logfile``) with ``format_classic`` in place of its formatter; the
    same file, flushing and rotation.  Any other observer is returned as is."""
    if isinstance(observer, FileLogObserver) and getattr(observer.formatEvent, "__qualname__", "") == _TEXT_FORMATTER:
        observer.formatEvent = format_classic
    return observer


_TEXT_FORMATTER = "textFileLogObserver.<locals>.formatEvent"
