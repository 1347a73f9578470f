"""The OTLP exporter's configuration, checked when the options are parsed
(``tap``): ``--otlp-grpc-endpoint`` (``parse_endpoint``), the SDK and
exporter present (``missing_sdk``) and the ``OTEL_*`` variables the SDK
would otherwise only warn about or fail on at the first export
(``check_environment``).  ``otlp`` runs the exporter with them.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable, Iterator, Mapping, Tuple
from urllib.parse import urlsplit

from firezone_relay.adapters._twisted import import_failure

TEMPORALITY_ENV = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"
_TEMPORALITIES = ("cumulative", "delta", "lowmemory")
_MILLISECOND_ENV = ("OTEL_METRIC_EXPORT_INTERVAL", "OTEL_METRIC_EXPORT_TIMEOUT")
#: The exporter's files (TLS), each for all signals and for metrics only.
_FILE_ENV = tuple(
    "OTEL_EXPORTER_OTLP_%s%s" % (scope, kind)
    for kind in ("CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY")
    for scope in ("", "METRICS_")
)
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def parse_endpoint(value: str) -> str:
    """``http://host:port`` (or ``https://``) for an ``--otlp-grpc-endpoint``.

    Upstream takes ``host:port`` and prepends ``http://``; an explicit
    ``http://`` or ``https://`` (TLS) is accepted too.  Anything else, or a
    value with a path, credentials, query or without a port, is a
    ``ValueError`` with a message for the operator.
    """
    text = value.strip()

    def bad(why: str) -> ValueError:
        return ValueError(
            "--otlp-grpc-endpoint: %r is not a URL (%s); expected host:port such as 127.0.0.1:4317 or "
            "otel-collector:4317, optionally after http:// or https://" % (value, why)
        )

    if not text:
        raise bad("empty")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise bad("it contains spaces or control characters")
    url = text if "://" in text else "http://" + text
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise bad(str(exc)) from None
    if parts.scheme not in ("http", "https"):
        raise bad("scheme %r; only http and https" % parts.scheme)
    host = parts.hostname or ""
    if not host:
        raise bad("no host")
    if parts.username is not None or parts.password is not None:
        raise bad("credentials are not accepted here; use OTEL_EXPORTER_OTLP_HEADERS")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad("a path, query or fragment")
    if port is None or port == 0:
        raise bad("no port")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad("bad IPv6 address") from None
        host = "[%s]" % host
    elif not _HOST.match(host):
        raise bad("bad host name")
    return "%s://%s:%d" % (parts.scheme, host, port)


def missing_sdk() -> str:
    """Why the OpenTelemetry SDK and OTLP exporter cannot be used, or ""."""
    return import_failure("opentelemetry.exporter.otlp.proto.grpc.metric_exporter", "opentelemetry.sdk.metrics")


def temporality_preference(environ: Mapping[str, str]) -> str:
    """``cumulative``, ``delta`` or ``lowmemory`` (the default, upstream's)."""
    text = environ.get(TEMPORALITY_ENV, "").strip().lower()
    if not text:
        return "lowmemory"
    if text not in _TEMPORALITIES:
        raise ValueError("%s must be cumulative, delta or lowmemory (got %r)" % (TEMPORALITY_ENV, environ[TEMPORALITY_ENV]))
    return text


def _given(environ: Mapping[str, str], names: Iterable[str]) -> Iterator[Tuple[str, str]]:
    """``(name, value stripped)`` of each of ``names`` set to more than blanks."""
    for name in names:
        text = environ.get(name, "").strip()
        if text:
            yield name, text


def _check_positive(environ: Mapping[str, str], names: Iterable[str], unit: str) -> None:
    """Each of ``names`` that is set must be a positive, finite number (of ``unit``)."""
    for name, text in _given(environ, names):
        try:
            value = float(text)
        except ValueError:
            raise ValueError("%s: %r is not a number of %s" % (name, environ[name], unit)) from None
        if not 0 < value < float("inf"):
            raise ValueError("%s must be a positive number of %s (got %r)" % (name, unit, environ[name]))


def check_environment(environ: Mapping[str, str]) -> None:
    """The SDK's variables we depend on, checked at start-up (the SDK itself
    would only log a warning and use its default)."""
    temporality_preference(environ)
    _check_positive(environ, _MILLISECOND_ENV, "milliseconds")
    # The exporter's own variables: the SDK raises on these deep inside the
    # exporter (a traceback at start-up) or only fails at the first export.
    _check_positive(environ, ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT"), "seconds")
    for name, text in _given(environ, ("OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION")):
        if text.lower() not in ("gzip", "deflate", "none"):
            raise ValueError("%s must be gzip, deflate or none (got %r)" % (name, environ[name]))
    for name, path in _given(environ, _FILE_ENV):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise ValueError("%s: %r cannot be read: %s" % (name, path, exc.strerror or exc)) from None
