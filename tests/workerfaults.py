"""Faulty workers for tests/test_workers.py, run by the supervisor in place of
``firezone_relay.workers.worker`` (``FIREZONE_RELAY_WORKER_MODULE``).

``FAULT`` names what worker ``FAULT_SLOT`` (default 1) does wrong; the
other workers are the real one:

* ``exit``: exits with status 3 at once, every time it is started;
* ``stuck``: hangs while it configures (never answers ``Configure``);
* ``hang``: serves, then blocks its reactor for ever (a stuck worker);
* ``flood``: serves, then sends allocation notices as fast as it can
  (raw AMP boxes, written as fast as the pipe takes them; a million at most).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict



def main() -> int:
    slot = int(sys.argv[1])
    fault = os.environ.get("FAULT", "")
    faulty = slot == int(os.environ.get("FAULT_SLOT", "1"))
    if faulty and fault == "exit":
        return 3  # before any import: as fast as a worker can fail
    from twisted.protocols import amp

    from firezone_relay.workers import worker

    if not faulty:
        return worker.main()
    real_build = worker.build_worker
    if fault == "stuck":
        def stuck(control: Any, config: Dict[str, Any]) -> None:
            while True:  # the supervisor kills it after its ready timeout (or it dies with its parent)
                time.sleep(1)

        worker.build_worker = stuck
    elif fault == "hang":
        def hanging(control: Any, config: Dict[str, Any]) -> None:
            real_build(control, config)

            def hang() -> None:
                while True:  # killed by the supervisor (or with its parent)
                    time.sleep(1)

            control.reactor.callLater(0.5, hang)

        worker.build_worker = hanging
    elif fault == "flood":
        def flooding(control: Any, config: Dict[str, Any]) -> None:
            real_build(control, config)
            sent = [0]

            removed = b"[[%d]]" % config["relay"]["lowest_port"]  # one removal: nothing to forget, all cost
            box = amp.AmpBox(_command=b"AllocationNotices", notices=removed).serialize()

            def flood() -> None:
                control.transport.write(box * 5000)
                sent[0] += 5000
                if sent[0] < 1_000_000:
                    control.reactor.callLater(0, flood)

            control.reactor.callLater(0.2, flood)

        worker.build_worker = flooding
    return worker.main()


if __name__ == "__main__":
    sys.exit(main())
