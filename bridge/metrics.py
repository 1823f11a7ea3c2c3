"""Prometheus metrics. One registry per Bridge, so tests and the demo can run several."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.webhooks = Counter(
            "bridge_webhooks",
            "Webhooks received, by platform and outcome",
            ["platform", "outcome"],
            registry=r,
        )
        self.hints = Counter(
            "bridge_hints_stored", "Hints stored", ["platform", "source"], registry=r
        )
        self.verdicts = Counter(
            "bridge_verdicts",
            "Worker decisions, by source platform and kind",
            ["platform", "kind"],
            registry=r,
        )
        self.writes = Counter(
            "bridge_writes",
            "Write attempts, by target platform and outcome",
            ["platform", "outcome"],
            registry=r,
        )
        self.api_calls = Counter(
            "bridge_api_calls", "Calls made to platform APIs", ["platform", "method"], registry=r
        )
        self.polls = Counter(
            "bridge_polls",
            "Poll cycles, by platform and outcome",
            ["platform", "outcome"],
            registry=r,
        )
        self.pending_hints = Gauge(
            "bridge_pending_hints", "Hints stored and not yet processed", registry=r
        )
        self.pending_writes = Gauge(
            "bridge_pending_writes", "Writes waiting for delivery", ["platform"], registry=r
        )
