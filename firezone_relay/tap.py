"""``twistd firezone-relay``: command-line options and the composition root.

Every flag is also read from an environment variable (the flag in capitals,
dashes as underscores, e.g. ``LISTEN_PORT``; the portal ones are
``FIREZONE_API_URL``, ``FIREZONE_TOKEN`` and ``FIREZONE_NAME``).  Precedence
is flag > environment > default: environment values are prepended to the
command line as synthetic arguments, so a later (real) flag overrides them
and both go through the same validation.  ``--help`` shows only the class
defaults, never the environment, so a token is never echoed.

``makeService`` hands the options to ``firezone_relay.service.build``, the
composition root.  The reactor is imported there, not at module level, so
that ``twistd --reactor=...`` still chooses it.
"""

from __future__ import annotations

import getopt
import os
import sys
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from twisted.logger import Logger
from twisted.python import usage

from firezone_relay.flagcheck import (
    DEFAULT_CONTROL_ENDPOINT,
    MIN_SECRET_LENGTH,
    check_control_endpoint,
    check_otlp,
    check_realm,
    check_rest_secret,
    check_secret,
    check_stream_options,
    choice,
    parse_host_port,
    parse_int,
    parse_ip,
    parse_network,
    parse_rate,
    parse_seconds,
    read_token,
)
from firezone_relay.service import (  # noqa: F401 (moved; still reachable as tap.*)
    SOFTWARE,
    detect_public_ip4,
    make_secret,
    make_xdp_service,
    raise_nofile_limit,
    relay_config,
    service_ports,
)

if TYPE_CHECKING:  # pragma: no cover
    from twisted.application.service import MultiService

log = Logger(namespace="firezone_relay.tap")

DEFAULT_SOCKET_BUFFER = 4 * 1024 * 1024


def _udpio_missing() -> str:
    """Why the batched UDP I/O extension cannot be used, or "" when it can."""
    from firezone_relay.adapters._twisted import import_failure

    return import_failure("firezone_relay.adapters._udpio")


# [long name, short, default, description]
_PARAMETERS: list[list[Any]] = [
    ["public-ip4-addr", None, None, "Public IPv4 address of this relay (default: the primary address of the host)"],
    ["public-ip6-addr", None, None, "Public IPv6 address of this relay (IPv6 is served only when given or discovered)"],
    ["bind-ip4-addr", None, "0.0.0.0", "IPv4 address to bind"],
    ["bind-ip6-addr", None, "::", "IPv6 address to bind"],
    ["listen-port", None, "3478", "UDP port for STUN/TURN"],
    ["lowest-port", None, "49152", "Lowest allocation port"],
    ["highest-port", None, "65535", "Highest allocation port"],
    ["api-url", None, "wss://api.firezone.dev", "Portal websocket URL"],
    ["token", None, None, "Portal token, or the path of a file holding it (portal mode)"],
    ["name", None, None, "Name of this relay shown in the portal"],
    ["rng-seed", None, None, "Seed for the random number generator (deterministic secret and ports; testing only)"],
    ["log-format", None, "human", "Log format: human or json (one JSON object per line on stdout)"],
    ["health-check-addr", None, "0.0.0.0:8080", "host:port of the HTTP health and metrics endpoint"],
    ["auth-secret", None, None, "Credential secret, at least 32 characters (standalone mode only; default: random, logged once)"],
    ["user-allocation-limit", None, None, "Allocations per username, 0 = unlimited (default: 1 with a token, 0 without)"],
    ["max-allocations", None, "0", "Allocations in total, 0 = unlimited"],
    ["unauthenticated-rate", None, "100", "Replies per second per source IP to unauthenticated UDP requests (reflection guard), 0 = unlimited"],
    ["unauthenticated-burst", None, "200", "Burst allowance of --unauthenticated-rate"],
    ["drain-timeout", None, None, "Seconds to wait for allocations to end after SIGTERM (default: no limit)"],
    ["tls-port", None, "5349", "TCP port for TURN over TLS (served when --tls-cert and --tls-key are given)"],
    ["tls-cert", None, None, "PEM certificate chain for TURN over TLS (reloaded on SIGHUP)"],
    ["tls-key", None, None, "PEM private key of --tls-cert (reloaded on SIGHUP)"],
    ["tls-handshake-timeout", None, "10", "Seconds a TLS client has to finish its handshake"],
    ["max-connections", None, "16384", "TCP and TLS client connections in total (0: no TCP/TLS listener)"],
    ["max-connections-per-ip", None, "256", "TCP and TLS client connections per source IP address"],
    ["stream-write-buffer", None, "262144", "Bytes queued for a slow TCP/TLS reader before it is disconnected"],
    ["stream-idle-timeout", None, "60", "Seconds a TCP/TLS connection without an allocation may stay silent"],
    ["socket-buffer", None, str(DEFAULT_SOCKET_BUFFER), "SO_RCVBUF/SO_SNDBUF in bytes, 0 = OS default"],
    ["udp-io", None, "auto", "UDP per-packet I/O: batched (recvmmsg/sendmmsg, C extension), python, or auto (batched when built)"],
    ["ebpf-offloading", None, None, "Interface to attach the XDP ChannelData fast path to (Linux, root; off by default)"],
    ["ebpf-attach-mode", None, "auto", "XDP attach mode: auto (driver, else generic), driver (native) or generic (any interface)"],
    ["ebpf-int4-addr", None, None, "IPv4 source address for IPv6->IPv4 relaying in XDP (default: the interface's)"],
    ["ebpf-int6-addr", None, None, "IPv6 source address for IPv4->IPv6 relaying in XDP (default: the interface's)"],
    ["listen-address-discovery-method", None, None, "Read the public addresses not given from the cloud's metadata service: gce_metadata or aws_ec2_metadata"],
    ["realm", None, "firezone", "REALM of the long-term credentials (both schemes)"],
    ["config", None, None, "TOML file of flags (keys are the flag names; flag > env > file > default); SIGHUP reloads it"],
    ["max-bps", None, "0", "Relayed bytes per second per allocation, each direction on its own (as coturn's max-bps); 0 = no limit"],
    ["control-endpoint", None, DEFAULT_CONTROL_ENDPOINT,
     "host:port of the control endpoint (GET /allocations, POST /disconnect, POST /log_filter; no authentication), or off"],
    ["stream-auth-timeout", None, "30", "Seconds a TCP/TLS connection has to allocate before it is closed, whatever it sends"],
    ["stream-buffer-budget", None, "16777216", "Bytes of partial input all TCP/TLS connections together may hold; beyond it the connection that would pass it is closed"],
    ["max-permissions-per-allocation", None, "256", "Permissions one allocation may hold (508 beyond)"],
    ["max-channels-per-allocation", None, "256", "Channels one allocation may hold, including those in their reserve period (508 beyond)"],
    ["log-level", None, "info", "Log level: trace, debug, info, warn, error or off, or RUST_LOG-style directives "
     "such as warn,relay=debug (RUST_LOG is read when LOG_LEVEL is not set)"],
    ["otlp-grpc-endpoint", None, None, "OTLP/gRPC collector (host:port) to push metrics to, as upstream (pip install 'firezone-relay[otlp]')"],
    ["workers", None, "1", "Relay processes: a number, or auto (the CPUs this process may use); above 1 this process supervises them"],
]
_FLAGS: list[list[Any]] = [
    ["allow-loopback-peers", None, "Allow loopback peers (local testing)"],
]
_REPEATABLE = ("allow-peer", "deny-peer", "rest-auth-secret")

_SPECIAL_ENV = {
    "api-url": "FIREZONE_API_URL",
    "token": "FIREZONE_TOKEN",
    "name": "FIREZONE_NAME",
    "rest-auth-secret": "REST_AUTH_SECRETS",
    "config": "CONFIG_FILE",
}


def env_name(flag: str) -> str:
    """The environment variable read for ``--flag``."""
    return _SPECIAL_ENV.get(flag, flag.upper().replace("-", "_"))


def _with_env(description: str, flag: str) -> str:
    return "%s [env: %s]" % (description, env_name(flag))


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def warn_short_rest_secrets(secrets: Sequence[str]) -> None:
    """SPEC §10: signed replies let anyone test guesses of a short secret offline."""
    short = sum(1 for secret in secrets if len(secret) < MIN_SECRET_LENGTH)
    if short:
        log.warn(
            "{short} of the {count} --rest-auth-secret values are shorter than {minimum} characters: signed replies "
            "let anyone test guesses offline; use e.g. `openssl rand -hex 32`",
            short=short, count=len(secrets), minimum=MIN_SECRET_LENGTH,
        )


def _parse_workers(value: str) -> int:
    from firezone_relay.workers.options import parse_workers

    return parse_workers(value)


#: usage.Options' coerce column: each flag's own check, run as its value is
#: parsed (flag, environment or file; a default in postOptions).  It raises
#: UsageError, not ValueError (which Twisted prefixes with "Parameter type
#: enforcement failed"), so the message is ours.  Checks of two flags: postOptions.
_COERCE: Dict[str, Callable[[str], Any]] = {
    "public-ip4-addr": partial(parse_ip, "public-ip4-addr", version=4),
    "public-ip6-addr": partial(parse_ip, "public-ip6-addr", version=6),
    "bind-ip4-addr": partial(parse_ip, "bind-ip4-addr", version=4),
    "bind-ip6-addr": partial(parse_ip, "bind-ip6-addr", version=6),
    "listen-port": partial(parse_int, "listen-port", low=1, high=65535),
    "lowest-port": partial(parse_int, "lowest-port", low=1024, high=65535),
    "highest-port": partial(parse_int, "highest-port", low=1024, high=65535),
    "rng-seed": partial(parse_int, "rng-seed"),
    "log-format": partial(choice, "log-format", ("human", "json")),
    "health-check-addr": partial(parse_host_port, "health-check-addr"),
    "max-allocations": partial(parse_int, "max-allocations", low=0),
    "unauthenticated-burst": partial(parse_int, "unauthenticated-burst", low=1),
    "unauthenticated-rate": parse_rate,
    "user-allocation-limit": partial(parse_int, "user-allocation-limit", low=0),
    "socket-buffer": partial(parse_int, "socket-buffer", low=0),
    "udp-io": partial(choice, "udp-io", ("auto", "batched", "python")),
    "ebpf-attach-mode": partial(choice, "ebpf-attach-mode", ("auto", "driver", "generic")),
    "ebpf-int4-addr": partial(parse_ip, "ebpf-int4-addr", version=4),
    "ebpf-int6-addr": partial(parse_ip, "ebpf-int6-addr", version=6),
    "drain-timeout": partial(parse_seconds, "drain-timeout", zero=True),
    "realm": check_realm,
    "max-bps": partial(parse_int, "max-bps", low=0),
    # TCP/TLS (SPEC §8); the per-allocation caps (SPEC §5): a channel number is one of 0x4000-0x7FFF.
    "tls-port": partial(parse_int, "tls-port", low=1, high=65535),
    "tls-handshake-timeout": partial(parse_seconds, "tls-handshake-timeout"),
    "stream-idle-timeout": partial(parse_seconds, "stream-idle-timeout"),
    "max-connections": partial(parse_int, "max-connections", low=0),
    "max-connections-per-ip": partial(parse_int, "max-connections-per-ip", low=0),
    "stream-write-buffer": partial(parse_int, "stream-write-buffer", low=1),
    "stream-auth-timeout": partial(parse_seconds, "stream-auth-timeout"),
    "stream-buffer-budget": partial(parse_int, "stream-buffer-budget", low=1),
    "max-permissions-per-allocation": partial(parse_int, "max-permissions-per-allocation", low=1, high=65536),
    "max-channels-per-allocation": partial(parse_int, "max-channels-per-allocation", low=1, high=0x4000),
    "workers": _parse_workers,
}
_DEFAULTS = {entry[0]: entry[2] for entry in _PARAMETERS}


class Options(usage.Options):
    """Options of ``twistd firezone-relay``; ``Options(environ=...)`` in tests."""

    synopsis = "[options] [TOKEN [NAME]]"
    longdesc = (
        "A STUN/TURN relay for Firezone. Without a token it runs standalone: TURN is served at once "
        "with --auth-secret or a generated secret (logged once, with the command that mints "
        "credentials for it). Every flag is also read from the environment variable shown. "
        "TOKEN and NAME may also be given as arguments, as upstream's relay takes them."
    )
    optParameters = [[n, s, d, _with_env(h, n), _COERCE.get(n)] for n, s, d, h in _PARAMETERS]
    optFlags = [[n, s, _with_env(h, n)] for n, s, h in _FLAGS]

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        super().__init__()
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        for flag in _REPEATABLE:
            self[flag] = []
        self._env_counts = {flag: 0 for flag in _REPEATABLE}
        self._file_counts = {flag: 0 for flag in _REPEATABLE}
        self.argv: list[str] = []
        self.config_file: Any = None
        self._positional: Tuple[Optional[str], Optional[str]] = (None, None)

    def opt_allow_peer(self, value: str) -> None:
        """Allow peers in this CIDR, repeatable [env: ALLOW_PEER, comma-separated]"""
        self["allow-peer"].append(value)

    def opt_deny_peer(self, value: str) -> None:
        """Deny peers in this CIDR, repeatable [env: DENY_PEER, comma-separated]"""
        self["deny-peer"].append(value)

    def opt_rest_auth_secret(self, value: str) -> None:
        """Shared secret of coturn-compatible TURN REST credentials (USERNAME <expiry>[:<user>], password base64(HMAC-SHA1(secret, USERNAME))); repeatable, for rotation [env: REST_AUTH_SECRETS, comma-separated]"""
        self["rest-auth-secret"].append(value)

    def opt_version(self) -> None:
        """Print the version and exit"""
        print(SOFTWARE)
        sys.exit(0)

    def _environment_arguments(self) -> list[str]:
        env = self._environ
        args: list[str] = []
        for name, _short, _default, _help in _PARAMETERS:
            var = env_name(name)
            if var in env:
                args += ["--" + name, env[var]]
        for name, _short, _help in _FLAGS:
            var = env_name(name)
            if var in env:
                text = env[var].strip().lower()
                if text in _TRUE:
                    args.append("--" + name)
                elif text not in _FALSE:
                    raise usage.UsageError("%s: %r is not a boolean (true/false)" % (var, env[var]))
        if "LOG_LEVEL" not in env and "RUST_LOG" in env:  # upstream's variable; LOG_LEVEL wins
            args += ["--log-level", env["RUST_LOG"]]
        for name in _REPEATABLE:
            text = env.get(env_name(name), "")
            values = [v.strip() for v in text.split(",") if v.strip()]
            if name == "rest-auth-secret" and text.strip() and len(values) != text.count(",") + 1:
                raise usage.UsageError("%s: an empty secret in the comma-separated list" % env_name(name))
            self._env_counts[name] = len(values)
            for v in values:
                args += ["--" + name, v]
        return args

    def parseArgs(self, token: Optional[str] = None, name: Optional[str] = None) -> None:
        """Upstream's positional ``TOKEN [NAME]``."""
        self._positional = (token, name)

    def _options_first(self, args: list[str]) -> list[str]:
        """``args`` with every option before the positional arguments, so that
        ``firezone-relay TOKEN --listen-port 3479`` works as with upstream's
        parser (twistd's getopt stops at the first argument otherwise)."""
        if "--_shell-completion" in args:
            return args
        try:
            opts, positional = getopt.gnu_getopt(args, self.shortOpt, self.longOpt)
        except getopt.GetoptError as exc:
            raise usage.UsageError(str(exc)) from None
        out: list[str] = []
        for opt, value in opts:
            takes_value = (opt[2:] + "=" in self.longOpt) if opt.startswith("--") else (opt[1:] + ":" in self.shortOpt)
            out += [opt, value] if takes_value else [opt]
        return out + ["--"] + positional if positional else out

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        if options is None:
            options = sys.argv[1:]
        self.argv = list(options)
        try:
            from firezone_relay.config import drop_overridden

            takes_value = [entry[0] for entry in _PARAMETERS] + list(_REPEATABLE)
            env_args = drop_overridden(self._environment_arguments(), self.argv, _COERCE, takes_value)
            file_args = drop_overridden(self._config_file_arguments(self.argv), env_args + self.argv, _COERCE, takes_value)
            try:
                super().parseOptions(self._options_first(file_args + env_args + self.argv))
            except usage.UsageError as exc:
                raise usage.UsageError(self._locate(str(exc), env_args)) from None
        except usage.UsageError as exc:
            if getattr(self, "parent", None) is None:
                raise
            # Under twistd: one line, instead of twistd's whole --help text
            # followed by the message.
            sys.stderr.write("firezone-relay: error: %s (--help lists the options)\n" % (exc,))
            sys.exit(1)

    def _config_file_arguments(self, argv: Sequence[str]) -> list[str]:
        """``--config FILE`` (the command line's, else CONFIG_FILE) as arguments."""
        from firezone_relay.config import ConfigError, FlagSpec, load_config

        path = None
        for i, arg in enumerate(argv):
            if arg == "--config" and i + 1 < len(argv):
                path = argv[i + 1]
            elif arg.startswith("--config="):
                path = arg[len("--config="):]
        if path is None:
            path = self._environ.get(env_name("config")) or None
        if not path:
            return []
        spec = FlagSpec(
            parameters=frozenset(entry[0] for entry in _PARAMETERS),
            flags=frozenset(entry[0] for entry in _FLAGS),
            repeatable=frozenset(_REPEATABLE),
        )
        try:
            self.config_file = load_config(path, spec)
        except ConfigError as exc:
            raise usage.UsageError("--config: %s" % exc) from None
        for name in _REPEATABLE:
            value = self.config_file.values.get(name)
            self._file_counts[name] = len(value) if isinstance(value, list) else 0
        return list(self.config_file.arguments())

    def _locate(self, message: str, env_args: Sequence[str]) -> str:
        """A usage error about a flag whose value came from the environment
        names the variable; from the config file, the file's line and key."""
        from firezone_relay.config import flag_of_error

        names = [entry[0] for entry in _PARAMETERS] + [entry[0] for entry in _FLAGS] + list(_REPEATABLE)
        flag = flag_of_error(message, names)
        if flag is None:
            return message
        given = ("--" + flag, "--%s=" % flag)
        if any(a == given[0] or a.startswith(given[1]) for a in self.argv):
            return message  # the command line's own value
        if given[0] in env_args:
            variable = "RUST_LOG" if flag == "log-level" and "LOG_LEVEL" not in self._environ else env_name(flag)
            return message if variable in message else "%s: %s" % (variable, message)
        if self.config_file is not None and flag in self.config_file.values:
            return "%s: key %r: %s" % (self.config_file.where(flag), flag, message)
        return message

    def postOptions(self) -> None:
        # A repeatable flag given on the command line replaces the
        # environment's list instead of adding to it (flag > env).
        for name in _REPEATABLE:
            from_file, from_env = self._file_counts[name], self._env_counts[name]
            if len(self[name]) > from_file + from_env:
                self[name] = self[name][from_file + from_env :]
            elif from_env:
                self[name] = self[name][from_file:]

        for name, coerce in _COERCE.items():  # the defaults not replaced by a given value
            if isinstance(_DEFAULTS[name], str) and self[name] == _DEFAULTS[name]:
                self[name] = coerce(self[name])

        listen, lowest, highest = self["listen-port"], self["lowest-port"], self["highest-port"]
        if lowest > highest:
            raise usage.UsageError("--lowest-port (%d) must not be above --highest-port (%d)" % (lowest, highest))
        if lowest <= listen <= highest:
            raise usage.UsageError(
                "--listen-port (%d) must not be inside the allocation range %d-%d" % (listen, lowest, highest)
            )

        if self["udp-io"] == "batched" and _udpio_missing():
            raise usage.UsageError(
                "--udp-io batched needs the C extension firezone_relay.adapters._udpio, which is not built (%s); "
                "reinstall with a C compiler and the Python headers, or use --udp-io python" % (_udpio_missing(),)
            )
        if self["ebpf-offloading"] is not None and not self["ebpf-offloading"].strip():
            self["ebpf-offloading"] = None
        check_control_endpoint(self)
        self["rest-auth-secret"] = tuple(check_rest_secret(v) for v in self["rest-auth-secret"])
        if self["max-bps"] and self["ebpf-offloading"]:
            raise usage.UsageError(
                "--max-bps cannot be combined with --ebpf-offloading: the XDP fast path relays without counting bytes"
            )
        self["allow-peer"] = tuple(parse_network("allow-peer", v) for v in self["allow-peer"])
        self["deny-peer"] = tuple(parse_network("deny-peer", v) for v in self["deny-peer"])
        check_stream_options(self)
        check_otlp(self, self._environ)
        from firezone_relay.discovery import check_options as _check_discovery_options

        _check_discovery_options(self, self._environ)

        _apply_positional(self, self._positional, self._environ)
        if self["token"] is not None:
            if not self["token"].strip():
                raise usage.UsageError(
                    "the portal token (TOKEN, --token or FIREZONE_TOKEN) is empty; "
                    "leave it out entirely to run standalone"
                )
            self["token"] = read_token(self["token"])
        if self["auth-secret"] is not None:
            if self["token"]:
                raise usage.UsageError(
                    "--auth-secret is for standalone mode only; in portal mode the relay makes its own secret"
                )
            check_secret(self["auth-secret"])
        if self["user-allocation-limit"] is None:
            self["user-allocation-limit"] = 1 if self["token"] else 0

        self["portal-ca-file"] = None
        if self["token"]:
            from firezone_relay.adapters.portal import CA_FILE_ENV, portal_url

            try:
                portal_url(self["api-url"], self["name"], "192.0.2.1", None, 3478)
            except ValueError as exc:
                raise usage.UsageError(str(exc)) from None
            # Not a flag: a private CA for self-hosted portals and tests.
            ca_file = self._environ.get(CA_FILE_ENV, "").strip()
            if ca_file:
                self["portal-ca-file"] = ca_file

        # twistd: --log-format json becomes twistd's own --logger, so that
        # twistd's start-up lines and redirected stdout are JSON too and
        # nothing is written twice; either format goes through the
        # --log-level filter (see firezone_relay.logs).
        self["log-level"] = _parse_log_level(self["log-level"])
        parent = getattr(self, "parent", None)
        if parent is not None and "logger" in parent:
            from firezone_relay import logs

            logs.use_under_twistd(parent, self["log-level"], self["log-format"] == "json")


def _apply_positional(options: Any, positional: Tuple[Optional[str], Optional[str]], environ: Mapping[str, str]) -> None:
    """``TOKEN [NAME]`` given as arguments: like ``--token`` / ``--name``,
    and like a flag they beat the environment; given both ways → an error."""
    for flag, value in zip(("token", "name"), positional):
        if value is None:
            continue
        current = options[flag]
        if current is not None and current != environ.get(env_name(flag)):
            raise usage.UsageError("%s is given twice: as --%s and as an argument" % (flag.upper(), flag))
        options[flag] = value


def _parse_log_level(value: str) -> Any:
    from firezone_relay.logs import parse_log_level

    try:
        return parse_log_level(value)
    except ValueError as exc:
        raise usage.UsageError(
            "--log-level (LOG_LEVEL, RUST_LOG): %s; use trace, debug, info, warn, error or off, "
            "or directives such as warn,relay=debug" % (exc,)
        ) from None


def makeService(options: Options) -> "MultiService":
    """The relay, wired by ``firezone_relay.service.build`` on twistd's reactor."""
    from twisted.internet import reactor

    from firezone_relay.service import build

    return build(options, reactor)
