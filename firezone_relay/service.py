"""The composition root: ``build(options, reactor)`` wires the relay.

``tap.makeService`` calls it with parsed ``tap.Options``.  Every part gets
what it needs through its constructor: the core (``Relay``), the shell that
owns it (``adapters.shell.Shell``, with the XDP mirror), the UDP and stream
transports (each registers with the shell), the metrics (the shell's
counters and the XDP mirror given to the collector), HTTP health, the
portal, the drain, the control endpoint and the SIGHUP reload.  The reactor
is passed in (twistd's, imported by ``tap.makeService`` only when the
service is made, so that ``twistd --reactor=...`` still chooses it).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import random
import socket
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, NoReturn, Optional, Tuple

from twisted.logger import Logger
from twisted.python import usage

from firezone_relay import __version__
from firezone_relay.randomness import BufferedSystemRandom

if TYPE_CHECKING:  # pragma: no cover
    from twisted.application.service import MultiService

    from firezone_relay.tap import Options

# The start-up lines keep the namespace they always had (log filters name it).
log = Logger(namespace="firezone_relay.tap")

SOFTWARE = "firezone-relay (python) %s" % __version__

#: Route lookup target for public address detection: connect() on a UDP
#: socket only asks the kernel for a route, no packet is sent.
_ROUTE_PROBE_IP4 = ("192.0.2.1", 3478)  # TEST-NET-1; any routable-looking address works


def detect_public_ip4() -> Optional[str]:
    """The source address of the host's default IPv4 route, or ``None``.

    ``connect()`` on a UDP socket makes the kernel pick a route and a source
    address; no packet is sent.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(_ROUTE_PROBE_IP4)
            ip = s.getsockname()[0]
    except OSError:
        return None
    if not isinstance(ip, str) or ip == "0.0.0.0":
        return None
    return ip


def make_secret(auth_secret: Optional[str], rng_seed: Optional[int]) -> Tuple[str, bool]:
    """``(secret, generated)``: the given secret, or 32 random bytes as 64 lowercase hex."""
    if auth_secret is not None:
        return auth_secret, False
    if rng_seed is not None:
        raw = random.Random(rng_seed).getrandbits(256).to_bytes(32, "big")
    else:
        raw = os.urandom(32)
    return raw.hex(), True


def raise_nofile_limit() -> Optional[Tuple[int, int]]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; ``(old, new)`` or ``None``."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def relay_config(options: Mapping[str, Any], secret: str) -> Any:
    """The core's ``RelayConfig`` for these options."""
    from firezone_relay.adapters.host import own_addresses
    from firezone_relay.core.relay import RelayConfig

    return RelayConfig(
        auth_secret=secret,
        public_ip4=options["public-ip4-addr"],
        public_ip6=options["public-ip6-addr"],
        listen_port=options["listen-port"],
        lowest_port=options["lowest-port"],
        highest_port=options["highest-port"],
        user_allocation_limit=options["user-allocation-limit"],
        max_allocations=options["max-allocations"],
        unauthenticated_rate=options["unauthenticated-rate"],
        unauthenticated_burst=options["unauthenticated-burst"],
        allow_loopback_peers=bool(options["allow-loopback-peers"]),
        allow_peers=options["allow-peer"],
        deny_peers=options["deny-peer"],
        software=SOFTWARE,
        rest_secrets=options["rest-auth-secret"],
        realm=options["realm"],
        max_bps=options["max-bps"],
        max_permissions=options["max-permissions-per-allocation"],
        max_channels=options["max-channels-per-allocation"],
        service_ports=service_ports(options),
        own_addresses=own_addresses(
            (options["bind-ip4-addr"], options["bind-ip6-addr"], options["health-check-addr"][0])
            + ((options["control-endpoint"][0],) if options.get("control-endpoint") else ())
        ),
    )


def service_ports(options: Mapping[str, Any]) -> Tuple[int, ...]:
    """The relay's service ports beside --listen-port (UDP/TCP): TLS when
    served, the health/metrics HTTP port and the control endpoint's (SPEC §5)."""
    ports = [options["health-check-addr"][1]]
    if options["tls-cert"] is not None:
        ports.append(options["tls-port"])
    if options.get("control-endpoint"):
        ports.append(options["control-endpoint"][1])
    return tuple(ports)


def make_xdp_service(options: "Options") -> Any:
    """The XDP fast path service for ``--ebpf-offloading``, or None."""
    if not options["ebpf-offloading"]:
        return None
    from firezone_relay.xdp.loader import Settings
    from firezone_relay.xdp.service import XdpService

    settings = Settings(
        listen_port=options["listen-port"],
        lowest_port=options["lowest-port"],
        highest_port=options["highest-port"],
        public4=options["public-ip4-addr"],
        public6=options["public-ip6-addr"],
        int4=options["ebpf-int4-addr"],
        int6=options["ebpf-int6-addr"],
    )
    service = XdpService(options["ebpf-offloading"], options["ebpf-attach-mode"], settings)
    service.setName("xdp")
    return service


def _listen_error(exc: Exception) -> "NoReturn":
    """One line on stderr and exit 1: a port the relay cannot bind at start-up."""
    from twisted.internet.error import CannotListenError

    if isinstance(exc, CannotListenError):
        host = exc.interface or "*"
        where = ("[%s]:%s" if ":" in host else "%s:%s") % (host, exc.port)
        reason = exc.socketError
        text = getattr(reason, "strerror", None) or str(reason)
        sys.stderr.write("firezone-relay: error: cannot listen on %s: %s\n" % (where, text))
    else:
        sys.stderr.write("firezone-relay: error: %s\n" % (exc,))
    sys.stderr.flush()
    raise SystemExit(1)


def _relay_services_class() -> Any:
    from twisted.application.service import MultiService
    from twisted.internet.error import CannotListenError

    class RelayServices(MultiService):
        """The relay's services; a listener that cannot be opened at start-up
        is one line and exit status 1, not twistd's traceback."""

        def privilegedStartService(self) -> None:
            self._or_exit(super().privilegedStartService)

        def startService(self) -> None:
            self._or_exit(super().startService)

        @staticmethod
        def _or_exit(start: Callable[[], None]) -> None:
            try:
                start()
            except CannotListenError as exc:
                _listen_error(exc)

    return RelayServices


def _RelayServices() -> "MultiService":
    return _relay_services_class()()  # type: ignore[no-any-return]



def _console_script(name: str) -> str:
    """``name`` as the operator can run it: the path next to this Python
    (a venv's bin/) unless that directory is on PATH."""
    directory = os.path.dirname(sys.executable)
    path = os.path.join(directory, name)
    on_path = directory in os.environ.get("PATH", "").split(os.pathsep)
    return name if on_path or not os.path.exists(path) else path

def build(options: "Options", reactor: Any) -> "MultiService":
    """The relay: core state machine, shell, transports, HTTP health/metrics
    and the control plane, in one ``MultiService``."""
    from firezone_relay.tap import _udpio_missing, warn_short_rest_secrets

    from firezone_relay.adapters.host import ephemeral_overlap
    from firezone_relay.adapters.http import Readiness, ServingFlag
    from firezone_relay.adapters.metrics import StatsLogger, StreamCollector, make_registry
    from firezone_relay.adapters.shell import Shell
    from firezone_relay.core.relay import Relay

    given = dict(options)  # as parsed: what a SIGHUP reload compares with
    limits = raise_nofile_limit()
    if limits is not None:
        log.info("open file limit: {old} -> {new}", old=limits[0], new=limits[1])

    # Before anything starts: the portal must never be handed an address
    # clients cannot reach (firezone_relay.discovery, SPEC §6).
    from firezone_relay.discovery import AddressError, settle

    try:
        settle(options, detect_public_ip4)
    except AddressError as exc:
        raise SystemExit("firezone-relay: %s" % exc) from None

    secret, generated = make_secret(options["auth-secret"], options["rng-seed"])
    if options["rest-auth-secret"]:
        log.info("TURN REST credentials: {count} shared secret(s), realm {realm}",
                 count=len(options["rest-auth-secret"]), realm=options["realm"])
        warn_short_rest_secrets(options["rest-auth-secret"])

    if options["token"]:
        # Portal mode: the secret goes to the portal only (stamp_secret), never to the log.
        log.info("portal mode: STUN/TURN listeners open when the portal's init arrives")
    elif generated:
        # Standalone mode without --auth-secret: the secret exists only in
        # this process, so it is logged exactly once, with how to use it.
        log.info(
            "standalone mode: generated auth secret {auth_secret}; mint credentials with: "
            "{credentials} --secret {auth_secret} --ttl 3600",
            auth_secret=secret,
            credentials=_console_script("firezone-relay-credentials"),
        )
    else:
        log.info("standalone mode: using the auth secret from --auth-secret")

    log.info(
        "{software}: STUN/TURN on UDP port {listen_port} (IPv4 {ipv4}, IPv6 {ipv6}), "
        "allocation ports {lowest_port}-{highest_port}",
        software=SOFTWARE,
        listen_port=options["listen-port"],
        ipv4=options["public-ip4-addr"] or "off",
        ipv6=options["public-ip6-addr"] or "off",
        public_ip4=options["public-ip4-addr"],
        public_ip6=options["public-ip6-addr"],
        lowest_port=options["lowest-port"],
        highest_port=options["highest-port"],
    )

    overlap = ephemeral_overlap(options["lowest-port"], options["highest-port"])
    if overlap is not None:
        log.warn("{message}", message=overlap)
    top = _RelayServices()
    if options.get("workers", 1) > 1:  # SPEC §9: this process supervises, workers relay
        from firezone_relay.workers.supervisor import build_supervisor

        return build_supervisor(options, reactor, secret, top)  # type: ignore[no-any-return]
    rng: Any = random.Random(options["rng-seed"]) if options["rng-seed"] is not None else BufferedSystemRandom()
    relay = Relay(relay_config(options, secret), rng)
    # The XDP fast path starts before the UDP service (and so stops after
    # it): it must be attached before the first ChannelBound is mirrored.
    xdp = make_xdp_service(options)
    if xdp is not None:
        xdp.setServiceParent(top)
    shell = Shell(
        relay,
        reactor=reactor,
        serve_at_start=not options["token"],  # portal mode: on the first init
        batched_io={"auto": None, "batched": True, "python": False}[options["udp-io"]],
        fast_path=xdp,
    )
    stream = make_transports(shell, options, stream_limits(options))
    if shell.io is not None:
        log.info("UDP I/O: batched (recvmmsg/sendmmsg, up to {batch} datagrams per system call)", batch=shell.io_batch)
    elif options["udp-io"] == "python":
        log.info("UDP I/O: pure Python (--udp-io python)")
    else:
        log.warn("UDP I/O: pure Python, slower: the C extension is not built ({reason})", reason=_udpio_missing())
    from firezone_relay.adapters import dispatch

    if dispatch.install(reactor):
        log.info("event dispatch: the relay's sockets without Twisted's per-event log context")
    else:
        log.info("event dispatch: Twisted's ({reactor})", reactor=type(reactor).__name__)
    shell.setServiceParent(top)

    # Health, readiness and metrics (SPEC §6, §7).  Children start in order
    # and stop in reverse: ServingFlag, after the UDP service, turns
    # /readyz on once the listeners are open and off first at shutdown.  In
    # portal mode the portal client sets the readiness flags itself.
    readiness = Readiness(relay, portal_required=bool(options["token"]))
    if stream.tls is None:
        log.info("TURN over TLS is off: give --tls-cert and --tls-key to serve it on port {tls_port}",
                 tls_port=options["tls-port"])
    registry, _ = make_registry(
        relay, readiness, drop_sources=[shell.drops, stream.drops], shell=shell, fast_path=xdp
    )
    registry.register(StreamCollector(stream))
    if not options["token"]:
        ServingFlag(readiness).setServiceParent(top)
    StatsLogger(relay, fast_path=xdp).setServiceParent(top)
    if options["otlp-grpc-endpoint"]:
        from firezone_relay.adapters.otlp import make_service as make_otlp_service

        make_otlp_service(options["otlp-grpc-endpoint"], relay, fast_path=xdp).setServiceParent(top)
    add_health(options, top, registry, readiness)
    _add_portal_and_drain(options, top, shell, secret, readiness, reactor)
    _add_control(options, top, relay, shell)
    _add_reload(given, options, top, relay, shell, stream.tls, secret)
    from firezone_relay.adapters.gcfreeze import StartupFreeze

    StartupFreeze(reactor).setServiceParent(top)  # last: once everything else has started
    return top


def add_health(options: "Options", top: "MultiService", registry: Any, readiness: Any) -> None:
    """The /healthz /readyz /metrics server on ``--health-check-addr``, named
    ``http`` (the single process and the workers' supervisor alike)."""
    from firezone_relay.adapters.http import HealthService

    host, port = options["health-check-addr"]
    health = HealthService(host, port, registry, readiness)
    health.setName("http")
    health.setServiceParent(top)


def _add_reload(
    given: Mapping[str, Any], options: "Options", top: "MultiService", relay: Any, shell: Any, tls: Any, secret: str
) -> None:
    """SIGHUP: the TLS certificate, and the configuration's live part (SPEC §10)."""
    from firezone_relay.tap import _FLAGS, _PARAMETERS, _REPEATABLE, Options, warn_short_rest_secrets
    from firezone_relay.logs import apply_log_levels
    from firezone_relay.reload import Reloader, ReloadService

    argv, environ = list(options.argv), dict(options._environ)
    names = frozenset([entry[0] for entry in _PARAMETERS] + [entry[0] for entry in _FLAGS] + list(_REPEATABLE))

    def parse() -> Options:
        new = Options(environ=environ)
        new.parseOptions(argv)
        return new

    def apply_core(merged: Any) -> None:
        import dataclasses

        from firezone_relay.core.relay import LIVE_FIELDS

        new = relay_config(merged, secret)
        # Only the live fields come from the new parse: the rest (addresses
        # found at start-up, the interfaces' addresses) stays as it started.
        relay.reconfigure(dataclasses.replace(relay.config, **{name: getattr(new, name) for name in LIVE_FIELDS}))

    reloader = Reloader(
        given,
        options,
        names,
        parse,
        apply_core,
        pump=shell.pump,
        tls=tls,
        set_log_level=apply_log_levels,
        on_secrets=lambda merged: warn_short_rest_secrets(merged["rest-auth-secret"]),
    )
    ReloadService(reloader).setServiceParent(top)


def _add_control(options: "Options", top: "MultiService", relay: Any, shell: Any) -> None:
    """The control endpoint (SPEC §10), unless ``--control-endpoint off``."""
    if options["control-endpoint"] is None:
        log.info("control endpoint: off")
        return
    from firezone_relay.adapters.control import ControlResource, ControlService
    from firezone_relay.logs import set_log_level

    host, port = options["control-endpoint"]
    loopback = ipaddress.ip_address(host).is_loopback
    if not loopback:
        log.warn(
            "control endpoint on a non-loopback address ({host}): it has no authentication, "
            "anyone who reaches it can list and end allocations",
            host=host,
        )
    resource = ControlResource(
        relay,
        pump=shell.pump,
        transport_of=shell.transport_of,
        set_log_level=set_log_level,
        clock=shell.now,
        loopback_only=loopback,
    )
    control = ControlService(host, port, resource, required=bool(options.get("control-endpoint-required")))
    control.setName("control")
    control.setServiceParent(top)


def _add_portal_and_drain(
    options: "Options", top: "MultiService", shell: Any, secret: str, readiness: Any, reactor: Any
) -> None:
    """Portal mode's control channel, and the SIGTERM drain (both modes).

    A fatal portal error and the end of a drain both go through
    ``ProcessControl``, which stops the reactor and sets the exit status
    (twistd itself cannot exit non-zero; see ``adapters.drain``).
    """
    from firezone_relay.adapters.drain import DrainController, ProcessControl
    from firezone_relay.adapters.portal import PortalClient, load_trust_root, portal_url

    process = ProcessControl(reactor)
    portal = None
    if options["token"]:
        trust_root = None
        if options["portal-ca-file"]:
            try:
                trust_root = load_trust_root(options["portal-ca-file"])
            except (OSError, ValueError) as exc:
                raise usage.UsageError("FIREZONE_PORTAL_CA_FILE: %s" % (exc,)) from None

        def first_init() -> None:
            shell.start_serving()
            readiness.serving = True

        url = portal_url(
            options["api-url"],
            options["name"],
            options["public-ip4-addr"],
            options["public-ip6-addr"],
            options["listen-port"],
        )
        portal = PortalClient(
            url,
            options["token"],
            secret,
            on_init=first_init,
            on_fatal=process.fail,
            reactor=reactor,
            trust_root=trust_root,
            readiness=readiness,
        )
        portal.setServiceParent(top)
    drain = DrainController(
        shell, process, portal=portal, readiness=readiness, drain_timeout=options["drain-timeout"], reactor=reactor
    )
    drain.setServiceParent(top)


def stream_limits(options: Mapping[str, Any], workers: int = 1) -> Any:
    """The stream clients' bounds (``StreamLimits``) from the options; with
    ``workers`` processes each gets its share of the two host-wide budgets
    (connections and buffered bytes, rounded up), the rest as given."""
    from firezone_relay.adapters.connection import StreamLimits

    return StreamLimits(
        max_connections=-(-options["max-connections"] // workers),
        max_connections_per_ip=options["max-connections-per-ip"],
        write_buffer=options["stream-write-buffer"],
        handshake_timeout=options["tls-handshake-timeout"],
        idle_timeout=options["stream-idle-timeout"],
        auth_timeout=options["stream-auth-timeout"],
        max_buffered=-(-options["stream-buffer-budget"] // workers),
    )


def served_binds(options: Mapping[str, Any]) -> Dict[int, str]:
    """family -> the address to bind, for each family served (the ones with
    a public address)."""
    return {f: options["bind-ip%d-addr" % f] for f in (4, 6) if options["public-ip%d-addr" % f]}


#: The options ``make_transports`` reads (a worker gets them in its configuration).
TRANSPORT_OPTIONS = (
    "listen-port", "public-ip4-addr", "public-ip6-addr", "bind-ip4-addr", "bind-ip6-addr", "socket-buffer",
    "tls-cert", "tls-key", "tls-port",
)


def make_transports(
    shell: Any,
    options: Mapping[str, Any],
    limits: Any,
    fds: Optional[Tuple[Dict[int, int], Dict[Tuple[str, int], int]]] = None,
) -> Any:
    """The shell's transports, each registered with it, for the families
    served (``served_binds``): UDP and TCP on the listen port, TLS given a
    certificate (SPEC §8); the clients' bounds ``limits``.  Returns the
    stream service (its metrics and drops are read beside the shell's).
    ``options``: at least ``TRANSPORT_OPTIONS``.  ``fds``: a worker's
    listening sockets, made by the supervisor (UDP: family -> descriptor;
    stream: (transport, family) -> descriptor), adopted instead of bound.
    SIGHUP belongs to the ``ReloadService``, which reloads TLS too."""
    from firezone_relay.adapters.stream import StreamService
    from firezone_relay.adapters.tls import TLSContext
    from firezone_relay.adapters.udp import RelayService

    udp_class: Any = RelayService
    stream_class: Any = StreamService
    if fds is not None:
        from firezone_relay.workers.adopted import AdoptedRelayService, AdoptedStreamService

        udp_class = functools.partial(AdoptedRelayService, fds=fds[0])
        stream_class = functools.partial(AdoptedStreamService, fds=fds[1])
    bind = served_binds(options)
    udp_class(
        shell,
        listen_port=options["listen-port"],
        bind_ip4=bind.get(4),
        bind_ip6=bind.get(6),
        socket_buffer=options["socket-buffer"],
    )
    stream = stream_class(
        shell,
        tcp_port=options["listen-port"],
        bind_ip4=bind.get(4),
        bind_ip6=bind.get(6),
        tls=TLSContext(options["tls-cert"], options["tls-key"]) if options["tls-cert"] else None,
        tls_port=options["tls-port"],
        limits=limits,
    )
    return stream
