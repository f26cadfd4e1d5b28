"""Automated grid services: horizon schedules (price arbitrage, cost-optimal EV charging, peak
shaving) solved under the same nested envelopes as dispatch."""
