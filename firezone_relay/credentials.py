"""Mint TURN credentials for a relay secret (the Firezone scheme, SPEC §3).

    firezone-relay-credentials --secret S [--ttl 3600 | --expiry UNIX] [--salt SALT] [--json]

prints ``username=<expiry>:<salt>`` and ``password=<...>`` lines, or one JSON
object.  Also runnable as ``python -m firezone_relay.credentials``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from typing import NoReturn, Optional, Sequence

from firezone_relay.core.auth import make_credentials

DEFAULT_TTL = 3600


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, "%s: error: %s\n" % (self.prog, message))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="firezone-relay-credentials",
        description="Mint a TURN username and password for a firezone-relay secret.",
    )
    p.add_argument("--secret", required=True, help="the relay's auth secret (logged at start-up in standalone mode)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--ttl", type=int, help="seconds from now until the credentials expire (default %d)" % DEFAULT_TTL)
    when.add_argument("--expiry", type=int, help="absolute expiry as a unix timestamp")
    p.add_argument("--salt", help="salt part of the username (default: 16 random URL-safe characters)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of key=value lines")
    return p


def random_salt() -> str:
    """16 random URL-safe characters."""
    return secrets.token_urlsafe(12)


def main(argv: Optional[Sequence[str]] = None, now: Optional[float] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("--secret must not be empty")
    if args.expiry is not None:
        expiry = args.expiry
    else:
        ttl = DEFAULT_TTL if args.ttl is None else args.ttl
        if ttl <= 0:
            parser.error("--ttl must be positive")
        expiry = int(time.time() if now is None else now) + ttl
    if expiry < 0:
        parser.error("--expiry must not be negative")
    salt = random_salt() if args.salt is None else args.salt
    if not salt or ":" in salt:
        parser.error("--salt must be non-empty and must not contain ':'")
    username, password = make_credentials(args.secret, expiry, salt)
    if args.json:
        print(json.dumps({"username": username, "password": password, "expiry": expiry}))
    else:
        print("username=%s" % username)
        print("password=%s" % password)
    return 0


if __name__ == "__main__":
    sys.exit(main())
