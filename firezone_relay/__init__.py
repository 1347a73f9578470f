"""firezone-relay: a STUN/TURN relay for Firezone, on Twisted."""

__version__ = "0.1.0"
