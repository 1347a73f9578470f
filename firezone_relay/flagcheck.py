"""The checks of ``twistd firezone-relay``'s flag values (``firezone_relay.tap``).

Each raises ``usage.UsageError`` with the one line shown to the operator.  The
checks of one value make up tap's coerce column (``tap._COERCE``) and run as
the value is parsed; ``read_token``, the secret checks and the checks of
several flags together (``check_stream_options``, ``check_control_endpoint``,
``check_otlp``) run in ``tap.Options.postOptions``.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Mapping, Optional, Sequence, Tuple

from twisted.python import usage

DEFAULT_CONTROL_ENDPOINT = "127.0.0.1:9999"  # upstream's


def read_token(value: str) -> str:
    """The token itself, or the stripped content of the file ``value`` names.

    A value that looks like a path (starts with ``/`` or ``./``) must be a
    readable file; any other value is a file if one exists by that name, and
    the token itself otherwise.
    """
    looks_like_path = value.startswith("/") or value.startswith("./")
    if looks_like_path or os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise usage.UsageError(
                "--token names a file that cannot be read: %s" % (exc.strerror if isinstance(exc, OSError) else exc)
            ) from None
        if not token:
            raise usage.UsageError("--token names an empty file")
        return token
    return value


def parse_ip(flag: str, value: str, version: int) -> str:
    try:
        ip = ipaddress.ip_address(value.strip("[]") if version == 6 else value)
    except ValueError:
        raise usage.UsageError("--%s: %r is not an IPv%d address" % (flag, value, version)) from None
    if ip.version != version:
        raise usage.UsageError("--%s: %r is an IPv%d address, expected IPv%d" % (flag, value, ip.version, version))
    return ip.compressed


def parse_int(flag: str, value: Any, low: Optional[int] = None, high: Optional[int] = None) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise usage.UsageError("--%s: %r is not an integer" % (flag, value)) from None
    if low is not None and number < low:
        if low == 0:
            raise usage.UsageError("--%s must not be negative (got %d)" % (flag, number))
        if high is None:
            raise usage.UsageError("--%s must be at least %d (got %d)" % (flag, low, number))
        raise usage.UsageError("--%s must be between %d and %d (got %d)" % (flag, low, high, number))
    if high is not None and number > high:
        raise usage.UsageError("--%s must be between %s and %d (got %d)" % (flag, low, high, number))
    return number


def parse_network(flag: str, value: str) -> str:
    try:
        return ipaddress.ip_network(value.strip(), strict=False).compressed
    except ValueError:
        raise usage.UsageError("--%s: %r is not a CIDR (e.g. 203.0.113.0/24 or 2001:db8::/32)" % (flag, value)) from None


def parse_host_port(flag: str, value: str) -> Tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise usage.UsageError("--%s: %r is not host:port" % (flag, value))
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise usage.UsageError("--%s: %r is not host:port with an IP address as host" % (flag, value)) from None
    return host, parse_int(flag, port_text, 0, 65535)


#: SPEC §3: signed error replies let anyone test guesses of the secret
#: offline, so a given secret must not be guessable.  The generated one is 64.
#: Shorter REST secrets are accepted (deployments have them) but warned about.
MIN_SECRET_LENGTH = 32


def check_secret(value: str) -> str:
    if not value:
        raise usage.UsageError("--auth-secret must not be empty")
    if len(value) < MIN_SECRET_LENGTH:
        raise usage.UsageError(
            "--auth-secret must be at least %d characters (got %d): signed replies let anyone test guesses "
            "offline; use e.g. the output of `openssl rand -hex 32`" % (MIN_SECRET_LENGTH, len(value))
        )
    if len(value) > 256:
        raise usage.UsageError("--auth-secret must be at most 256 characters")
    if not all(33 <= ord(c) <= 126 for c in value) or ":" in value:
        raise usage.UsageError("--auth-secret must be printable ASCII without spaces or ':'")
    return value


def parse_seconds(flag: str, value: Any, zero: bool = False) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise usage.UsageError("--%s: %r is not a number of seconds" % (flag, value)) from None
    if not (0 <= seconds if zero else 0 < seconds) or seconds == float("inf"):
        raise usage.UsageError("--%s must be a %s number of seconds" % (flag, "non-negative" if zero else "positive"))
    return seconds


def choice(flag: str, choices: Sequence[str], value: str) -> str:
    if value not in choices:
        listed = ", ".join(choices[:-1]) + " or " + choices[-1]
        raise usage.UsageError("--%s must be %s (got %r)" % (flag, listed, value))
    return value


def parse_rate(value: str) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = -1.0
    if not 0 <= rate < float("inf"):
        raise usage.UsageError("--unauthenticated-rate must be a number >= 0 (got %r)" % (value,))
    return rate


def check_stream_options(options: Any) -> None:
    """TCP/TLS flags (SPEC §8) beyond each one's own check (``tap._COERCE``); the
    certificate is loaded once here so that a bad file stops the start with a
    clear message."""
    tls_port = options["tls-port"]
    if tls_port == options["listen-port"]:
        raise usage.UsageError("--tls-port (%d) must differ from --listen-port, which serves TCP" % tls_port)
    for flag in ("tls-cert", "tls-key"):
        if options[flag] is not None and not options[flag].strip():
            options[flag] = None
    if (options["tls-cert"] is None) != (options["tls-key"] is None):
        raise usage.UsageError("--tls-cert and --tls-key go together")
    if options["tls-cert"] is not None:
        from firezone_relay.adapters.tls import describe_tls_error, make_tls_context

        try:
            make_tls_context(options["tls-cert"], options["tls-key"])
        except OSError as exc:  # ssl.SSLError included
            raise usage.UsageError("--tls-cert/--tls-key cannot be used: %s" % describe_tls_error(exc)) from None


def check_rest_secret(value: str) -> str:
    if not value:
        raise usage.UsageError("--rest-auth-secret must not be empty")
    if len(value) > 1024 or not all(32 <= ord(c) <= 126 for c in value):
        raise usage.UsageError("--rest-auth-secret must be printable ASCII of at most 1024 characters")
    return value


def check_realm(value: str) -> str:
    value = value.strip()
    if not value or len(value) > 127 or not all(33 <= ord(c) <= 126 and c != '"' for c in value):
        raise usage.UsageError("--realm must be 1 to 127 printable ASCII characters without spaces or quotes (got %r)" % (value,))
    return value

def check_control_endpoint(options: Any) -> None:
    """``--control-endpoint``: ``off``, or host:port.  The default address is
    optional (a bind failure is logged); one the operator gave is required."""
    value = str(options["control-endpoint"]).strip()
    if value.lower() in ("off", "none", "disabled", ""):
        options["control-endpoint"] = None
        return
    options["control-endpoint-required"] = value != DEFAULT_CONTROL_ENDPOINT
    options["control-endpoint"] = parse_host_port("control-endpoint", value)
    if options["control-endpoint"] == options["health-check-addr"] and options["control-endpoint"][1] != 0:
        raise usage.UsageError(
            "--control-endpoint and --health-check-addr are both %s:%d; give them different ports"
            % options["control-endpoint"]
        )


def check_otlp(options: Any, environ: Mapping[str, str]) -> None:
    """``--otlp-grpc-endpoint`` (SPEC §7): a URL, the SDK installed, its variables sane."""
    value = options["otlp-grpc-endpoint"]
    if value is None or not value.strip():
        options["otlp-grpc-endpoint"] = None
        return
    from firezone_relay.adapters.otlpconfig import check_environment, missing_sdk, parse_endpoint

    try:
        options["otlp-grpc-endpoint"] = parse_endpoint(value)
        check_environment(environ)
    except ValueError as exc:
        raise usage.UsageError(str(exc)) from None
    missing = missing_sdk()
    if missing:
        raise usage.UsageError(
            "--otlp-grpc-endpoint needs the OpenTelemetry SDK and its OTLP/gRPC exporter, which are not installed "
            "(%s); install them with: pip install 'firezone-relay[otlp]'" % (missing,)
        )
