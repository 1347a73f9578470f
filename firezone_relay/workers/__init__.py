"""``--workers N``: a supervisor and N worker processes (SPEC §9).

``supervisor`` runs in the twistd process: it creates the listening
sockets once, spawns the workers (``python -m firezone_relay.workers.worker``)
with those sockets and a Twisted AMP control channel on their stdin/stdout
(``protocol``), and owns everything that is one per relay: the secret and
the portal session, HTTP health and metrics, the signals and the drain.
``worker`` runs one relay core with its own slice of the allocation ports.

The supervisor's parts: ``pool`` (``WorkerPool``: spawn, configure, restart,
the user limit and the drain across workers), ``control`` (its end of each
worker's AMP channel, bounded), ``listeners`` (the shared ``SO_REUSEPORT``
sockets) and ``counters`` (``/metrics`` summed over the workers).
"""
