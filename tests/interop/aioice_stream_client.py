"""``aioice_client.py`` over TCP or TLS: the same run, with aioice's stream transport.

    python aioice_stream_client.py '<json config>'

Extra config keys: ``tls`` (bool) and ``cafile`` (the PEM the relay's
certificate must chain to; verified, host name included).  aioice pads
every message to 4 bytes on a stream (RFC 8656 §12.5) and cuts what it
receives by the length fields, as the relay does.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import sys
import traceback

from aioice import turn

import aioice_client  # this directory is sys.path[0]

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    config = json.loads(sys.argv[1])
    options: dict = {"transport": "tcp"}
    if config.get("tls"):
        options["ssl"] = ssl.create_default_context(cafile=config["cafile"])
    turn.create_turn_endpoint = functools.partial(turn.create_turn_endpoint, **options)
    try:
        out = asyncio.run(aioice_client.main(config))
        code = 0
    except Exception as exc:  # report, don't hide: the test prints it
        out = {"error": "%s: %s" % (type(exc).__name__, exc), "traceback": traceback.format_exc()}
        code = 2
    print(json.dumps(out))
    sys.exit(code)
