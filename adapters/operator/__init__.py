"""The operator's HTTP side: Prometheus metrics, liveness and readiness, status, and a live web
view of the gateway.

``config`` (``[operator]``), ``server`` (:class:`OperatorServer`, the aiohttp application and
its authentication), ``metrics`` (the collector that reads the gateway at scrape time),
``health`` (the checks), ``peers`` (what it reads of the links beside the core), ``view`` (the
live view), ``auth`` (its HTTP Basic authentication) and ``charts`` / ``reports`` (the pictures
and tables it serves).
"""
