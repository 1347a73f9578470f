"""``firezone-relay-ctl``: the control endpoint from a shell (SPEC §10).

    firezone-relay-ctl allocations [--user NAME] [--json]
    firezone-relay-ctl disconnect (--user NAME | --client IP:PORT) [--json]
    firezone-relay-ctl log-level LEVEL

The endpoint is ``--endpoint``, else ``$CONTROL_ENDPOINT``, else
``127.0.0.1:9999`` (the relay's default).  Exit status: 0 done, 1 the relay
answered with an error (``disconnect`` that matched nothing included), 2 the
command line is wrong, 3 the relay could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional, Sequence, TextIO

DEFAULT_ENDPOINT = "127.0.0.1:9999"
TIMEOUT = 10.0


def _url(endpoint: str, path: str, query: Optional[dict[str, str]] = None) -> str:
    base = endpoint if "://" in endpoint else "http://" + endpoint
    url = base.rstrip("/") + path
    if query:
        url += "?" + urllib.parse.urlencode(query)
    return url


def call(endpoint: str, method: str, path: str, body: Optional[bytes] = None,
         query: Optional[dict[str, str]] = None) -> tuple[int, Any]:
    """``(status, decoded JSON)``; raises OSError when the relay cannot be reached."""
    request = urllib.request.Request(_url(endpoint, path, query), data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return status, {"error": "not a JSON answer: %r" % raw[:200]}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return "%ds" % seconds
    if seconds < 7200:
        return "%dm%02ds" % divmod(seconds, 60)
    return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)


def table(rows: list[dict[str, Any]], out: TextIO) -> None:
    """The allocations as an aligned table, one line each."""
    if not rows:
        out.write("no allocations\n")
        return
    header = ("USER", "CLIENT", "TRANSPORT", "RELAYED", "AGE", "LEFT", "CHANNELS", "PERMISSIONS", "TO PEERS", "TO CLIENT")
    lines = [header]
    for r in rows:
        lines.append(
            (
                r["user"],
                r["client"],
                r["transport"],
                ",".join(r["relayed"]),
                _duration(r["age_seconds"]),
                _duration(r["lifetime_left_seconds"]),
                str(r["channels"]),
                str(r["permissions"]),
                "%s/%d pkts" % (_size(r["bytes_to_peers"]), r["packets_to_peers"]),
                "%s/%d pkts" % (_size(r["bytes_to_client"]), r["packets_to_client"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() + "\n")
    out.write("%d allocation%s\n" % (len(rows), "" if len(rows) == 1 else "s"))


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    parser = argparse.ArgumentParser(prog="firezone-relay-ctl", description="Control a running firezone-relay.")
    parser.add_argument("--endpoint", default=os.environ.get("CONTROL_ENDPOINT") or DEFAULT_ENDPOINT,
                        help="host:port of the relay's --control-endpoint (default: $CONTROL_ENDPOINT or %s)"
                        % DEFAULT_ENDPOINT)
    parser.add_argument("--json", action="store_true", help="print the relay's JSON answer")
    commands = parser.add_subparsers(dest="command", required=True)
    allocations = commands.add_parser("allocations", help="list allocations")
    allocations.add_argument("--user", help="only this USERNAME's")
    disconnect = commands.add_parser("disconnect", help="delete allocations at once")
    who = disconnect.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="every allocation of this USERNAME")
    who.add_argument("--client", help="the allocation of this client address (ip:port, [ipv6]:port)")
    level = commands.add_parser(
        "log-level", help="change the log level: trace, debug, info, warn, error, off, or directives like warn,relay=debug"
    )
    level.add_argument("level")
    args = parser.parse_args(argv)
    if args.endpoint == "off":
        err.write("firezone-relay-ctl: the control endpoint is off (CONTROL_ENDPOINT=off)\n")
        return 2

    try:
        if args.command == "allocations":
            status, answer = call(args.endpoint, "GET", "/allocations", query={"user": args.user} if args.user else None)
        elif args.command == "disconnect":
            body = {"user": args.user} if args.user is not None else {"client": args.client}
            status, answer = call(args.endpoint, "POST", "/disconnect", json.dumps(body).encode("utf-8"))
        else:
            status, answer = call(args.endpoint, "POST", "/log_filter", args.level.encode("utf-8"))
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        err.write("firezone-relay-ctl: cannot reach the relay's control endpoint at %s: %s\n" % (args.endpoint, reason))
        return 3

    if args.json:
        out.write(json.dumps(answer, indent=2) + "\n")
    elif isinstance(answer, dict) and "error" in answer:
        err.write("firezone-relay-ctl: %s\n" % answer["error"])
    elif args.command == "allocations":
        table(answer.get("allocations", []), out)
    elif args.command == "disconnect":
        count = answer.get("disconnected", 0)
        out.write("disconnected %d allocation%s\n" % (count, "" if count == 1 else "s"))
    else:
        out.write("log level: %s\n" % answer.get("log_level"))
    return 0 if status == 200 else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
