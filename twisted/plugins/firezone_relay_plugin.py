"""twistd dropin for firezone-relay.

Kept import-light on purpose: the module is named as a string, so an import
error in ``firezone_relay.tap`` surfaces (with its traceback) only when the
``firezone-relay`` command runs, never while twistd scans its plugins.  This
directory must never get an ``__init__.py`` (it would replace Twisted's own).
"""

from twisted.application.service import ServiceMaker

serviceMaker = ServiceMaker(
    "firezone-relay",
    "firezone_relay.tap",
    "STUN/TURN relay for Firezone.",
    "firezone-relay",
)
