"""The bootstrap's ``tracing`` section: where this sidecar's spans go, and how many.

Per sidecar (``sidecar.yaml``), absent = off (and the tracing code is not even imported)::

    tracing: {endpoint: http://127.0.0.1:4318, sample: 1%, service_name: orders,
              queue: 2048, batch: 512, interval: 1s, timeout: 5s}

No OpenTelemetry import here: the schema is read by every sidecar.
"""

from __future__ import annotations

from dataclasses import dataclass

from .reader import Fields

__all__ = ["TracingConfig", "parse_tracing"]


@dataclass(frozen=True, slots=True)
class TracingConfig:
    endpoint: str = "http://127.0.0.1:4318/v1/traces"  # OTLP/HTTP traces URL
    sample: float = 0.01  # share of new traces sampled (a caller's sampled flag is followed)
    service_name: str = ""  # the spans' service.name ("" = the sidecar's service)
    queue: int = 2048  # finished spans waiting for export; more are dropped and counted
    batch: int = 512  # spans per export request
    interval: float = 1.0  # a partial batch leaves after this long
    timeout: float = 5.0  # one export request (its retries included) gives up after this


def parse_tracing(node: Fields) -> TracingConfig:
    """The bootstrap's ``tracing``. A base URL (``http://host:4318``) gets the OTLP traces
    path; a URL with a path is used as it is."""
    d = TracingConfig()
    endpoint = node.str("endpoint", "http://127.0.0.1:4318")
    if isinstance(endpoint, str):
        scheme, sep, rest = endpoint.partition("://")
        if not sep or scheme not in ("http", "https") or not rest.strip("/"):
            node.error("endpoint", f"must be an http:// or https:// URL, got {endpoint!r}")
        elif "/" not in rest.rstrip("/"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
    config = TracingConfig(
        endpoint=endpoint if isinstance(endpoint, str) else d.endpoint,
        sample=node.percent("sample", d.sample),
        service_name=node.str("service_name", ""),
        queue=node.int("queue", d.queue, min=1, max=1_000_000),
        batch=node.int("batch", d.batch, min=1, max=100_000),
        interval=node.duration("interval", d.interval, min=0.001),
        timeout=node.duration("timeout", d.timeout, min=0.001),
    )
    if isinstance(config.batch, int) and isinstance(config.queue, int) and config.batch > config.queue:
        node.error("batch", f"must not exceed queue ({config.queue}), got {config.batch}")
    node.done()
    return config
