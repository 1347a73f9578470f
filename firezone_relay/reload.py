"""SIGHUP: read the configuration again and apply what can change live (SPEC §10).

The command line, the environment captured at start-up and the ``--config``
file (read again) are parsed exactly as at start-up, by a new ``Options``.
If that fails, the running configuration stays and the error (with the
file's line for a file error) is logged.  Otherwise each flag that changed is
either applied at once (``LIVE``: peer allow/deny lists, quotas and caps,
rate limits, REST secrets, the realm-free parts of authentication, the log
level, the TLS certificate) or refused with a log line naming it (addresses,
ports, workers, the portal: they need a restart).  No allocation is dropped:
the core takes the new limits for what comes next, and only channels and
permissions to peers that the new policy denies are revoked.

The TLS certificate is re-read on every SIGHUP, changed paths or not, as
before ``--config`` existed (certificate renewal writes the same paths).
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Optional

from twisted.logger import Logger
from twisted.python import usage

from firezone_relay.adapters._twisted import SignalHandlers, WhenRunningService, default_reactor

log = Logger(namespace="firezone_relay.reload")

#: Flags a reload applies while running.
LIVE = frozenset(
    (
        "allow-peer",
        "deny-peer",
        "allow-loopback-peers",
        "max-allocations",
        "user-allocation-limit",
        "max-permissions-per-allocation",
        "max-channels-per-allocation",
        "unauthenticated-rate",
        "unauthenticated-burst",
        "rest-auth-secret",
        "max-bps",
        "log-level",
        "tls-cert",
        "tls-key",
    )
)

#: Never logged, whatever happens.
SECRET = frozenset(("auth-secret", "token", "rest-auth-secret"))


def _shown(name: str, value: Any) -> str:
    if name in SECRET:
        return "(secret)"
    if name == "log-level" and hasattr(value, "default"):  # logs.LogLevels
        relay = getattr(value, "relay", None)
        return str(value.default.name) + (",relay=%s" % relay.name if relay is not None else "")
    return repr(value)


class Reloader:
    """Re-parses the options and applies the difference; call it on the reactor thread.

    ``given``: the options as parsed at start-up, before the composition root
    filled in what it found out (the public address, the secret): a reload
    compares new parses with these.  ``options``: the options in effect.
    ``parse()`` returns new ``Options`` (raising ``usage.UsageError``);
    ``apply_core(options)`` gives the core its new ``RelayConfig``;
    ``tls`` is the ``stream.TLSContext`` or None; ``set_log_level(levels)``
    changes the log level; ``pump()`` runs the core's commands afterwards.
    """

    def __init__(
        self,
        given: Any,
        options: Any,
        names: frozenset[str],
        parse: Callable[[], Any],
        apply_core: Callable[[Any], None],
        pump: Callable[[], None],
        tls: Any = None,
        set_log_level: Optional[Callable[[Any], Any]] = None,
        on_secrets: Optional[Callable[[Any], None]] = None,
    ) -> None:
        self.given: dict[str, Any] = dict(given)
        self.options: dict[str, Any] = dict(options)
        self.names = names
        self.parse = parse
        self.apply_core = apply_core
        self.pump = pump
        self.tls = tls
        self.set_log_level = set_log_level
        self.on_secrets = on_secrets

    def __call__(self) -> bool:
        try:
            new = self.parse()
        except usage.UsageError as exc:
            log.error("configuration reload failed, the running configuration stays: {error}", error=str(exc))
            self._reload_tls()
            return False
        old, given = self.options, self.given
        changed = sorted(name for name in self.names if new.get(name) != given.get(name))
        refused = [name for name in changed if name not in LIVE or (name in ("tls-cert", "tls-key") and self.tls is None)]
        for name in refused:
            log.warn(
                "configuration reload: {key} cannot change while running (restart to apply); keeping {old}",
                key=name,
                old=_shown(name, given.get(name)),
            )
        live = [name for name in changed if name not in refused]
        merged = dict(old)
        for name in live:
            merged[name] = new[name]
        try:
            self.apply_core(merged)
        except ValueError as exc:  # the core refused: keep everything as it was
            log.error("configuration reload failed, the running configuration stays: {error}", error=str(exc))
            return False
        if self.tls is not None and ("tls-cert" in live or "tls-key" in live):
            self.tls.cert_path, self.tls.key_path = merged["tls-cert"], merged["tls-key"]
        tls_ok = self._reload_tls()
        if not tls_ok and self.tls is not None and ("tls-cert" in live or "tls-key" in live):
            # The new files do not load: keep serving the old certificate and its paths.
            self.tls.cert_path, self.tls.key_path = old["tls-cert"], old["tls-key"]
            merged["tls-cert"], merged["tls-key"] = old["tls-cert"], old["tls-key"]
            live = [name for name in live if name not in ("tls-cert", "tls-key")]
        if "rest-auth-secret" in live and self.on_secrets is not None:
            self.on_secrets(merged)
        self.pump()
        self.options = merged
        self.given = dict(given)
        for name in live:
            self.given[name] = new[name]
        log.info(
            "configuration reloaded: {changes}",
            changes=", ".join("%s=%s" % (name, _shown(name, merged[name])) for name in live) or "nothing changed",
        )
        # Last, so that the line above is still written when the level rises.
        if "log-level" in live and self.set_log_level is not None:
            self.set_log_level(merged["log-level"])
        return True

    def _reload_tls(self) -> bool:
        if self.tls is None:
            return True
        return bool(self.tls.reload())


class ReloadService(WhenRunningService):
    """Runs ``reload`` on the reactor thread for each SIGHUP while running."""

    name = "reload"

    def __init__(self, reload: Callable[[], Any], reactor: Any = None, signum: int = signal.SIGHUP) -> None:
        reactor = default_reactor(reactor)
        self.reload = reload
        self.reactor = reactor
        self.signum = signum
        self._handlers = SignalHandlers(reactor, (signum,), self._run)

    def when_running(self) -> None:
        self._handlers.install()

    def _run(self, signum: int) -> None:
        try:
            self.reload()
        except Exception:  # noqa: BLE001 - a reload must never stop the relay
            log.failure("configuration reload failed with an internal error; the relay goes on")

    def stopService(self) -> None:
        super().stopService()
        self._handlers.uninstall()
