"""The XDP fast path as a Twisted service, fed by the core's channel commands.

Theory of operation: ``XdpService`` loads the object built with the package
(or, failing that, compiles one: ``loader.find_object``, logged either way),
and attaches it in ``privilegedStartService`` (before twistd drops privileges) and detaches
it in ``stopService`` (so on every clean exit: a reactor stop, the end of a
drain, a fatal portal error) and, as a last resort, from an ``atexit`` hook.
If anything fails it logs why and the relay goes on in userspace: the
service then ignores every command.

The UDP adapter hands it the core's ``ChannelBound`` / ``ChannelUnbound``
commands (``channel_bound`` / ``channel_unbound``), so the kernel maps are a
mirror of the core's usable channels and the core stays the source of
truth: a denied peer never gets a ``ChannelBound``, an expiry or deletion
removes the entry before the next packet is read.  Stream (TCP/TLS) clients
are not mirrored.  A map write that fails is counted in ``errors`` by kind
and logged at most once a minute; userspace relays that channel.  A full
channel map refuses only new keys, so the newest bindings are the ones left
to userspace; each is counted as ``errors["full"]`` (``/metrics``:
``relay_xdp_map_errors_total{kind="full"}``).

A program killed with SIGKILL cannot detach: ``ip link set dev IFACE xdp off``
(or ``xdpgeneric off``) removes a stale attachment, and the next start says
so if one is in the way.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from typing import Any, Optional

from twisted.logger import Logger

from firezone_relay.xdp.loader import (
    XdpCounters,
    XdpError,
    XdpMapFull,
    XdpProgram,
    Settings,
    find_object,
)
from firezone_relay.adapters._twisted import Counts, LimitedLog, ListenerService
from firezone_relay.xdp.interface import interface_ip4, interface_ip6

log = Logger(namespace="firezone_relay.xdp")



class XdpService(ListenerService):
    """Loads the XDP program on ``interface`` and mirrors channel bindings into it.

    ``mode``: ``"generic"`` (SKB mode: veth, bridges, any driver),
    ``"driver"`` (native) or ``"auto"`` (native, generic if the driver
    refuses); ``program.mode`` is the one in use once attached.
    ``settings``: what to relay (``loader.Settings``); ``int4``/``int6``
    unset there default to the interface's own addresses.
    """

    def __init__(self, interface: str, mode: str, settings: Settings, map_entries: Optional[int] = None) -> None:
        self.interface = interface
        self.mode = mode
        self.settings = settings
        #: Entries per channel map (None: the object's 65,536); tests make it small.
        self.map_entries = map_entries
        self.program: Optional[XdpProgram] = None
        #: Why the fast path is off, once start-up has failed.
        self.failure: Optional[str] = None
        self.errors: Counts[str] = Counts()
        self.channels = 0
        self._limited = LimitedLog()
        self._atexit_registered = False

    # --- life cycle -----------------------------------------------------------

    def open_listeners(self) -> None:
        """Load and attach the program (``ListenerService``: before twistd
        drops privileges, and at ``startService`` without that step: tests);
        once, whether it worked or not."""
        if self.program is None and self.failure is None:
            self._load()

    def stopService(self) -> None:
        super().stopService()
        self.close()

    def _load(self) -> None:
        workdir = tempfile.mkdtemp(prefix="firezone-relay-xdp-")
        program = None
        try:
            path, origin = find_object(workdir)  # shipped or compiled
            log.info("XDP program: {origin}", origin=origin, interface=self.interface)
            program = XdpProgram(path, self.interface, map_entries=self.map_entries)
            settings = self.settings._replace(
                int4=self.settings.int4 or interface_ip4(self.interface),
                int6=self.settings.int6 or interface_ip6(self.interface),
            )
            program.configure(settings)
            program.attach(self.mode)
        except XdpError as exc:
            if program is not None:
                program.close()
            self.failure = str(exc)
            log.warn(
                "XDP fast path off, relaying in userspace only: {reason}", reason=self.failure, interface=self.interface
            )
            return
        except Exception as exc:  # a bug here must not stop the relay
            if program is not None:
                program.close()
            self.failure = "%s: %s" % (type(exc).__name__, exc)
            log.failure("XDP fast path off, relaying in userspace only")
            return
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        self.program = program
        if program.fallback is not None:
            log.warn(
                "XDP native (driver) mode not used on {interface}, attached in generic mode instead: {reason}",
                interface=self.interface,
                reason=program.fallback,
            )
        if program.warning is not None:
            log.warn("XDP in driver mode on {interface}: {reason}", interface=self.interface, reason=program.warning)
        if not self._atexit_registered:
            atexit.register(self.close)
            self._atexit_registered = True
        log.info(
            "XDP fast path attached to {interface} ({mode} mode, sending with {send}, program id {prog_id}, "
            "--ebpf-attach-mode {requested}): ChannelData on port "
            "{listen_port} and allocation ports {lowest_port}-{highest_port}; cross-family source addresses "
            "IPv4 {int4}, IPv6 {int6}; hairpin for {public4} {public6}; detach a stale one with: "
            "ip link set dev {interface} xdp off",
            interface=self.interface,
            mode=program.mode,
            requested=self.mode,
            send="XDP_REDIRECT" if program.redirect else "XDP_TX",
            prog_id=program.attached_id(),
            **settings._asdict(),
        )

    def close(self) -> None:
        """Detach and free the program (idempotent)."""
        program, self.program = self.program, None
        if program is None:
            return
        try:
            detached = program.detach()
        except XdpError as exc:
            log.warn("{reason}", reason=str(exc))
            detached = False
        finally:
            program.close()
        if detached:
            log.info("XDP fast path detached from {interface}", interface=self.interface)

    # --- the core's commands ------------------------------------------------------

    def channel_bound(self, command: Any) -> None:
        program = self.program
        if program is None or len(command.client) != 2:  # off, or a stream client
            return
        try:
            program.add_channel(command.client, command.channel, command.peer, command.port)
        except XdpMapFull as exc:
            self._error("full", exc)
            return
        except XdpError as exc:
            self._error("bind", exc)
            return
        self.channels += 1

    def channel_unbound(self, command: Any) -> None:
        program = self.program
        if program is None or len(command.client) != 2:
            return
        try:
            if program.remove_channel(command.client, command.channel, command.peer, command.port):
                self.channels -= 1
        except XdpError as exc:
            self._error("unbind", exc)

    def counters(self) -> Optional[XdpCounters]:
        """The program's counters, or None when the fast path is off."""
        program = self.program
        if program is None:
            return None
        try:
            return program.counters()
        except XdpError as exc:
            self._error("stats", exc)
            return None

    def _error(self, kind: str, exc: XdpError) -> None:
        if self._limited.count(self.errors, kind):
            log.warn(
                "XDP map {kind} failed (count {count}; userspace relays that channel): {reason}",
                kind=kind,
                count=self.errors[kind],
                reason=str(exc),
            )
