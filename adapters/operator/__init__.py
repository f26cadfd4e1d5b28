"""The operator endpoint: Prometheus metrics, liveness and readiness, and status over HTTP.

``config`` (``[operator]``), ``server`` (:class:`OperatorServer`, the aiohttp application and
its authentication), ``metrics`` (the collector that reads the gateway at scrape time),
``health`` (the checks) and ``peers`` (what it reads of the links beside the core).
"""
