"""STUN and TURN registry values: methods and classes (RFC 8489 §5, §18.2;
RFC 8656 §17, §18), attribute types (RFC 8489 §18.3, RFC 8656 §18, RFC 8016
for the address-family attributes), password algorithms (RFC 8489 §18.5)
and the error codes' reason phrases (RFC 8489 §18.4, RFC 8656 §18).

Plain integers, used everywhere as ``stun.BINDING``, ``stun.XOR_PEER_ADDRESS``
and so on: ``stun`` re-exports all of them.
"""

from __future__ import annotations

__all__ = [
    "REQUEST",
    "INDICATION",
    "SUCCESS",
    "ERROR",
    "BINDING",
    "ALLOCATE",
    "REFRESH",
    "SEND",
    "DATA_METHOD",
    "CREATE_PERMISSION",
    "CHANNEL_BIND",
    "METHOD_NAMES",
    "MAPPED_ADDRESS",
    "USERNAME",
    "MESSAGE_INTEGRITY",
    "ERROR_CODE",
    "UNKNOWN_ATTRIBUTES",
    "CHANNEL_NUMBER",
    "LIFETIME",
    "XOR_PEER_ADDRESS",
    "DATA",
    "REALM",
    "NONCE",
    "XOR_RELAYED_ADDRESS",
    "REQUESTED_ADDRESS_FAMILY",
    "EVEN_PORT",
    "REQUESTED_TRANSPORT",
    "DONT_FRAGMENT",
    "MESSAGE_INTEGRITY_SHA256",
    "PASSWORD_ALGORITHM",
    "USERHASH",
    "XOR_MAPPED_ADDRESS",
    "RESERVATION_TOKEN",
    "ADDITIONAL_ADDRESS_FAMILY",
    "ADDRESS_ERROR_CODE",
    "PASSWORD_ALGORITHMS",
    "SOFTWARE",
    "ALTERNATE_SERVER",
    "FINGERPRINT",
    "ALGORITHM_MD5",
    "ALGORITHM_SHA256",
    "REASONS",
]

# Classes.
REQUEST = 0
INDICATION = 1
SUCCESS = 2
ERROR = 3

# Methods.
BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
SEND = 0x006
DATA_METHOD = 0x007
CREATE_PERMISSION = 0x008
CHANNEL_BIND = 0x009

METHOD_NAMES = {
    BINDING: "binding",
    ALLOCATE: "allocate",
    REFRESH: "refresh",
    SEND: "send",
    DATA_METHOD: "data",
    CREATE_PERMISSION: "createpermission",
    CHANNEL_BIND: "channelbind",
}

# Attributes.
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
CHANNEL_NUMBER = 0x000C
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA = 0x0013
REALM = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_ADDRESS_FAMILY = 0x0017
EVEN_PORT = 0x0018
REQUESTED_TRANSPORT = 0x0019
DONT_FRAGMENT = 0x001A
MESSAGE_INTEGRITY_SHA256 = 0x001C
PASSWORD_ALGORITHM = 0x001D
USERHASH = 0x001E
XOR_MAPPED_ADDRESS = 0x0020
RESERVATION_TOKEN = 0x0022
ADDITIONAL_ADDRESS_FAMILY = 0x8000
ADDRESS_ERROR_CODE = 0x8001
PASSWORD_ALGORITHMS = 0x8002
SOFTWARE = 0x8022
ALTERNATE_SERVER = 0x8023
FINGERPRINT = 0x8028


# PASSWORD-ALGORITHM values (RFC 8489 §18.5).
ALGORITHM_MD5 = 0x0001
ALGORITHM_SHA256 = 0x0002


REASONS = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    500: "Server Error",
    508: "Insufficient Capacity",
}
