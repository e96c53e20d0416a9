"""`/metrics` in Prometheus' text exposition format (version 0.0.4), written by hand.

Per model: queue depth and active decode slots (from the engine), requests in flight, generated
tokens (a counter) and tokens/s over the last `RATE_WINDOW` seconds; histograms of time to first
token, inter-token latency and whole-request latency; requests by endpoint and status.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass, field

RATE_WINDOW = 10.0  # seconds over which qkv_tokens_per_second is averaged
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class Histogram:
    """Cumulative-bucket histogram as Prometheus wants it: counts per upper bound, sum, count."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {running}')
        out.append(f"{name}_sum{{{labels}}} {self.total}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


@dataclass
class ModelMetrics:
    ttft: Histogram = field(default_factory=Histogram)
    inter_token: Histogram = field(default_factory=Histogram)
    latency: Histogram = field(default_factory=Histogram)
    tokens_total: int = 0
    in_flight: int = 0
    recent: deque = field(default_factory=deque)  # (time, tokens) of recent generated tokens


class Metrics:
    """What the server records as it answers; `render` adds the engines' live gauges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.models: dict[str, ModelMetrics] = {}
        self.requests: dict[tuple[str, int], int] = {}

    def _model(self, name: str) -> ModelMetrics:
        return self.models.setdefault(name, ModelMetrics())

    def request_started(self, model: str) -> None:
        with self._lock:
            self._model(model).in_flight += 1

    def request_finished(self, model: str, seconds: float) -> None:
        with self._lock:
            m = self._model(model)
            m.in_flight -= 1
            m.latency.observe(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        with self._lock:
            self._model(model).ttft.observe(seconds)

    def tokens(self, model: str, n: int, gap: float | None = None) -> None:
        """`n` tokens generated now; `gap`: seconds since the previous token of the same stream."""
        now = time.monotonic()
        with self._lock:
            m = self._model(model)
            m.tokens_total += n
            m.recent.append((now, n))
            if gap is not None:
                m.inter_token.observe(gap)

    def response(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def render(self, gauges: dict[str, dict[str, float]]) -> str:
        """The exposition text; `gauges`: per model, engine gauges (queue_depth, active_slots, ...)."""
        now = time.monotonic()
        lines: list[str] = []

        def family(name: str, kind: str, doc: str) -> None:
            lines.append(f"# HELP {name} {doc}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            names = sorted(set(self.models) | set(gauges))
            for name in names:
                self._model(name)
            for gauge, doc in (
                ("queue_depth", "requests waiting for a decode slot"),
                ("active_slots", "decode slots in use"),
                ("max_batch", "decode slots in all"),
            ):
                family(f"qkv_{gauge}", "gauge", doc)
                for name in names:
                    if gauge in gauges.get(name, {}):
                        lines.append(f'qkv_{gauge}{{model="{name}"}} {gauges[name][gauge]}')
            family("qkv_requests_in_flight", "gauge", "requests being answered")
            for name in names:
                lines.append(f'qkv_requests_in_flight{{model="{name}"}} {self.models[name].in_flight}')
            family("qkv_generated_tokens_total", "counter", "tokens generated")
            for name in names:
                lines.append(f'qkv_generated_tokens_total{{model="{name}"}} {self.models[name].tokens_total}')
            family("qkv_tokens_per_second", "gauge", f"tokens generated per second over the last {RATE_WINDOW:g} s")
            for name in names:
                recent = self.models[name].recent
                while recent and recent[0][0] < now - RATE_WINDOW:
                    recent.popleft()
                lines.append(f'qkv_tokens_per_second{{model="{name}"}} {sum(n for _, n in recent) / RATE_WINDOW}')
            for attr, metric, doc in (
                ("ttft", "qkv_time_to_first_token_seconds", "time from request to first generated token"),
                ("inter_token", "qkv_inter_token_latency_seconds", "time between tokens of one stream"),
                ("latency", "qkv_request_latency_seconds", "time from request to its last byte"),
            ):
                family(metric, "histogram", doc)
                for name in names:
                    lines.extend(getattr(self.models[name], attr).lines(metric, f'model="{name}"'))
            family("qkv_http_responses_total", "counter", "responses by endpoint and status")
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'qkv_http_responses_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        return "\n".join(lines) + "\n"
