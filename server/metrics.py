"""Prometheus metrics with vLLM's names under `specdec:`, in the server's own registry.

Every series is exported under `specdec:` and again under each extra prefix
(`server.metrics_prefix`, default `vllm`), so vLLM dashboards, the production-stack HPA/KEDA
recipes and the Gateway API Inference Extension read `vllm:num_requests_waiting` unchanged.

Engine-wide counters and gauges are read from an EngineStats snapshot at scrape time (the engine
keeps the running totals); per-request histograms and the success counter are observed by the
server when a request ends.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class _EngineStatsCollector:
    """Yields gauges and counters from the latest EngineStats snapshot."""

    def __init__(self, model_name: str, prefixes: tuple[str, ...] = ("specdec",)):
        self.model_name = model_name
        self.prefixes = prefixes
        self.stats = None

    def collect(self):
        for prefix in self.prefixes:
            yield from self._collect(prefix)

    def _collect(self, prefix: str):
        s = self.stats
        if s is None:
            return
        labels = ["model_name"]
        values = [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"{prefix}:{name}", doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"{prefix}:{name}", doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0..1).",
                    s.kv_cache_usage)
        yield gauge("num_blocks_total", "KV blocks in the pool.", s.num_blocks_total)
        yield gauge("num_blocks_free", "KV blocks free (prefix-cached free blocks count).",
                    s.num_blocks_free)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens served by the prefix cache.",
                      s.prefix_cache_hits)
        yield counter("num_preemptions", "Preemptions (recompute) so far.", s.num_preemptions)
        yield counter("prompt_tokens", "Prefill tokens processed.", s.prompt_tokens_total)
        yield counter("generation_tokens", "Generated tokens.", s.generation_tokens_total)
        yield counter("spec_decode_num_drafts", "Speculative drafts proposed.", s.spec_num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Draft tokens proposed.",
                      s.spec_num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                      s.spec_num_accepted_tokens)
        yield gauge("spec_decode_mean_k", "Mean draft length k chosen for the running decodes "
                    "(adaptive speculation; 0 when it is off or has backed off).",
                    getattr(s, "spec_mean_k", 0.0))
        per_pos = CounterMetricFamily(f"{prefix}:spec_decode_num_accepted_tokens_per_pos",
                                      "Accepted draft tokens by position.",
                                      labels=["model_name", "position"])
        for position, count in enumerate(s.spec_accepted_per_pos or ()):
            per_pos.add_metric([self.model_name, str(position)], count)
        yield per_pos
        if getattr(s, "lora_info", None) is not None:
            from server.lora import lora_info_metric
            yield lora_info_metric(s.lora_info, prefix)


class ServerMetrics:
    """The server's registry; `render(stats)` returns the Prometheus text body."""

    def __init__(self, model_name: str, extra_prefix: str = ""):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        prefixes = ("specdec",) + ((extra_prefix,) if extra_prefix else ())
        self.prefixes = prefixes
        self._engine = _EngineStatsCollector(model_name, prefixes)
        self.registry.register(self._engine)
        labels = ["model_name"]

        def per_prefix(kind, name, doc, labelnames, **kw):
            return [kind(f"{p}:{name}", doc, labelnames, registry=self.registry, **kw)
                    for p in prefixes]
        self.request_success = per_prefix(Counter, "request_success",
                                          "Finished requests by finish reason.",
                                          ["model_name", "finished_reason"])
        self.ttft = per_prefix(Histogram, "time_to_first_token_seconds", "Time to first token.",
                               labels, buckets=_TTFT_BUCKETS)
        self.itl = per_prefix(Histogram, "inter_token_latency_seconds",
                              "Time between output tokens (per token; a verify step's tokens "
                              "share its latency).", labels, buckets=_ITL_BUCKETS)
        self.e2e = per_prefix(Histogram, "e2e_request_latency_seconds", "End-to-end latency.",
                              labels, buckets=_E2E_BUCKETS)
        self.queue_time = per_prefix(Histogram, "request_queue_time_seconds",
                                     "Time from arrival to first scheduling.", labels,
                                     buckets=_E2E_BUCKETS)
        for reason in ("stop", "length", "abort"):
            for c in self.request_success:
                c.labels(model_name, reason)

    def observe_itl(self, latencies: list[float]) -> None:
        for hist in self.itl:
            h = hist.labels(self.model_name)
            for x in latencies:
                h.observe(x)

    def observe_finished(self, finish_reason: str, metrics) -> None:
        """One engine request (one choice) ended."""
        for c in self.request_success:
            c.labels(self.model_name, finish_reason).inc()
        if metrics is None:
            return
        arrival = metrics.arrival_time
        for i in range(len(self.ttft)):
            if metrics.first_token_time is not None:
                self.ttft[i].labels(self.model_name).observe(metrics.first_token_time - arrival)
            if metrics.first_scheduled_time is not None:
                self.queue_time[i].labels(self.model_name).observe(
                    metrics.first_scheduled_time - arrival)
            if metrics.finished_time is not None:
                self.e2e[i].labels(self.model_name).observe(metrics.finished_time - arrival)

    def render(self, stats) -> bytes:
        self._engine.stats = stats
        return generate_latest(self.registry)
