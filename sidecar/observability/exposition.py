"""The sidecar's own Prometheus exposition: metric families, labelled counters and gauges, a
registry, and the text format 0.0.4 that ``/metrics`` serves.

Why not prometheus-client: one sidecar runs beside every service, and that library costs a
sidecar about 4.5 MB of RSS (its exposition module imports ``http.server``, ``wsgiref``,
``email``...), a seventh of an idle sidecar, for a few counters rendered on a scrape. This
module is the subset the sidecar uses, with the same names and signatures
(``CounterMetricFamily(name, doc, labels=..., value=...)``, ``Counter(name, doc, labelnames,
registry=...).labels(...).inc()``, ``Gauge.set_function``, ``generate_latest``), and it renders
byte for byte what prometheus-client renders for them (``tests/unit/observability/
test_exposition.py`` compares the two). Collectors are duck-typed both ways: a prometheus-client
collector registered here is rendered, and a collector of ours registered in a
prometheus-client registry is read by it (``collect()`` yields objects with ``name``, ``type``,
``documentation`` and ``samples`` of ``name``/``labels``/``value``/``timestamp``).
The control plane keeps prometheus-client. Pure, single-threaded like the event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

__all__ = [
    "CONTENT_TYPE",
    "Collector",
    "CollectorRegistry",
    "Counter",
    "CounterMetricFamily",
    "Gauge",
    "GaugeMetricFamily",
    "HistogramMetricFamily",
    "Metric",
    "Sample",
    "generate_latest",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float
    timestamp: float | None = None


class Metric:
    """One metric family: its name (without ``_total`` for a counter), type, help and samples."""

    __slots__ = ("name", "documentation", "type", "unit", "samples")

    def __init__(self, name: str, documentation: str, typ: str) -> None:
        self.name = name
        self.documentation = documentation
        self.type = typ
        self.unit = ""
        self.samples: list[Sample] = []

    def add_sample(self, name: str, labels: dict[str, str], value: float,
                   timestamp: float | None = None) -> None:
        self.samples.append(Sample(name, labels, value, timestamp))


class Collector(Protocol):
    """Anything whose ``collect()`` yields metric families (ours or prometheus-client's)."""

    def collect(self) -> Iterable[Any]: ...


class CounterMetricFamily(Metric):
    __slots__ = ("_labelnames",)

    def __init__(self, name: str, documentation: str, value: float | None = None,
                 labels: Sequence[str] | None = None, created: float | None = None) -> None:
        if name.endswith("_total"):
            name = name[:-6]
        super().__init__(name, documentation, "counter")
        self._labelnames = tuple(labels or ())
        if value is not None:
            self.add_metric([], value, created)

    def add_metric(self, labels: Sequence[str], value: float, created: float | None = None) -> None:
        pairs = dict(zip(self._labelnames, labels))
        self.samples.append(Sample(self.name + "_total", pairs, value))
        if created is not None:
            self.samples.append(Sample(self.name + "_created", pairs, created))


class GaugeMetricFamily(Metric):
    __slots__ = ("_labelnames",)

    def __init__(self, name: str, documentation: str, value: float | None = None,
                 labels: Sequence[str] | None = None) -> None:
        super().__init__(name, documentation, "gauge")
        self._labelnames = tuple(labels or ())
        if value is not None:
            self.add_metric([], value)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append(Sample(self.name, dict(zip(self._labelnames, labels)), value))


class HistogramMetricFamily(Metric):
    __slots__ = ("_labelnames",)

    def __init__(self, name: str, documentation: str, labels: Sequence[str] | None = None) -> None:
        super().__init__(name, documentation, "histogram")
        self._labelnames = tuple(labels or ())

    def add_metric(self, labels: Sequence[str], buckets: Sequence[tuple[str, float]],
                   sum_value: float | None) -> None:
        """``buckets``: (upper bound as text, cumulative count), the last one ``+Inf``."""
        pairs = dict(zip(self._labelnames, labels))
        for bound, count in buckets:
            self.samples.append(Sample(self.name + "_bucket", {**pairs, "le": bound}, count))
        if sum_value is not None:
            self.samples.append(Sample(self.name + "_count", pairs, buckets[-1][1]))
            self.samples.append(Sample(self.name + "_sum", pairs, sum_value))


class CollectorRegistry:
    """The collectors of one sidecar; ``collect()`` yields every family, in registration order."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []
        self._names: set[str] = set()

    def register(self, collector: Collector) -> None:
        """Add ``collector``; a ``Counter``'s or ``Gauge``'s name must not be taken already."""
        sample_names = getattr(collector, "sample_names", None)
        names: tuple[str, ...] = sample_names() if sample_names is not None else ()
        taken = self._names.intersection(names)
        if taken:
            raise ValueError(f"duplicate metric names in the registry: {sorted(taken)}")
        self._names.update(names)
        self._collectors.append(collector)

    def unregister(self, collector: Collector) -> None:
        self._collectors.remove(collector)

    def collect(self) -> Iterator[Any]:
        for collector in list(self._collectors):
            yield from collector.collect()


class _Child:
    """One label combination of a ``Counter`` or ``Gauge``."""

    __slots__ = ("value", "created", "function")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()
        self.function: Callable[[], float] | None = None

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = float(value)

    def set_function(self, function: Callable[[], float]) -> None:
        """The value is ``function()`` at each scrape (a gauge read from live state)."""
        self.function = function

    def get(self) -> float:
        return float(self.function()) if self.function is not None else self.value


class _Labelled:
    """A metric with (optional) label names and one ``_Child`` per label combination."""

    _type = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry | None = None) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Child] = {}
        if not self._labelnames:
            self._children[()] = _Child()
        if registry is not None:
            registry.register(self)  # (ours, or a prometheus-client registry in tests)

    def sample_names(self) -> tuple[str, ...]:
        """The names this metric's samples take (a registry refuses them twice)."""
        return (self._name,)

    def labels(self, *values: object) -> _Child:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: {len(self._labelnames)} label values expected, got {len(values)}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _Child()
        return child

    def _family(self) -> Metric:
        raise NotImplementedError

    def collect(self) -> Iterator[Metric]:
        yield self._family()


class Counter(_Labelled):
    """A counter; its name may end in ``_total`` (rendered ``<name>_total`` either way), and
    each label combination also has ``<name>_created``, as prometheus-client renders it."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry | None = None) -> None:
        super().__init__(name[:-6] if name.endswith("_total") else name, documentation, labelnames,
                         registry=registry)

    def sample_names(self) -> tuple[str, ...]:
        return (self._name, self._name + "_total", self._name + "_created")

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def _family(self) -> Metric:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for key, child in list(self._children.items()):
            family.add_metric(key, child.get(), child.created)
        return family


class Gauge(_Labelled):
    def set(self, value: float) -> None:
        self.labels().set(value)

    def set_function(self, function: Callable[[], float]) -> None:
        self.labels().set_function(function)

    def _family(self) -> Metric:
        family = GaugeMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for key, child in list(self._children.items()):
            family.add_metric(key, child.get())
        return family


def _number(value: float) -> str:
    """A sample value as prometheus-client writes it (Go's float formatting)."""
    d = float(value)
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _sample_line(sample: Any) -> str:
    labels = sample.labels
    text = ""
    if labels:
        text = "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(labels.items())) + "}"
    stamp = "" if sample.timestamp is None else f" {int(float(sample.timestamp) * 1000):d}"
    return f"{sample.name}{text} {_number(sample.value)}{stamp}\n"


def generate_latest(registry: CollectorRegistry) -> bytes:
    """Every family of ``registry`` in the text format 0.0.4 (prometheus-client's layout:
    ``_created`` samples after the family, as a gauge of their own)."""
    out: list[str] = []
    for metric in registry.collect():
        name = metric.name
        typ = metric.type
        if typ == "counter":
            shown = name + "_total"
        elif typ == "unknown":
            shown, typ = name, "untyped"
        else:
            shown = name
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {shown} {doc}\n# TYPE {shown} {typ}\n")
        created: list[str] = []
        for sample in metric.samples:
            if sample.name == name + "_created":
                created.append(_sample_line(sample))
            else:
                out.append(_sample_line(sample))
        if created:
            out.append(f"# HELP {name}_created {doc}\n# TYPE {name}_created gauge\n")
            out.extend(created)
    return "".join(out).encode("utf-8")
