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
from typing import IO, Any, Optional

from twisted.logger import FileLogObserver, ILogObserver, LogEvent, formatEvent

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
    return FileLogObserver(sys.stdout if out is None else out, format_json)
