"""Prometheus metrics of one server (their own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0)
disable_created_metrics()       # no *_created series: they only double the output

TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 10.0)

STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge("sirocco_requests_running", "Sequences in cache rows, being pre-filled or decoded",
                             registry=r)
        self.waiting = Gauge("sirocco_requests_waiting", "Sequences waiting for a cache row", registry=r)
        self.prompt_tokens = Counter("sirocco_prompt_tokens", "Prompt tokens of admitted sequences", registry=r)
        self.generation_tokens = Counter("sirocco_generation_tokens", "Tokens generated", registry=r)
        self.success = Counter("sirocco_request_success", "Sequences finished, by finish reason",
                               ["finish_reason"], registry=r)
        self.ttft = Histogram("sirocco_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("sirocco_time_per_output_token_seconds",
                              "(latency - time to first token) / (tokens - 1), per sequence",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("sirocco_e2e_request_latency_seconds", "Arrival to last token, per sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.busy = Counter("sirocco_engine_busy_seconds", "Time the engine spent in model steps (the rest of the "
                            "wall time it was idle or between steps)", registry=r)
        self.step_tokens = Histogram("sirocco_iteration_tokens", "Tokens per engine step (pre-fill chunks and "
                                     "decodes)", buckets=STEP_BUCKETS, registry=r)
        self.spec_proposed = Counter("sirocco_spec_tokens_proposed", "Draft tokens verified (speculative decoding)",
                                     registry=r)
        self.spec_accepted = Counter("sirocco_spec_tokens_accepted", "Draft tokens accepted (speculative decoding)",
                                     registry=r)
        self.prefix_queries = Counter("sirocco_prefix_cache_queries", "Prompts looked up in the prefix store",
                                      registry=r)
        self.prefix_hits = Counter("sirocco_prefix_cache_hits", "Prompts that continued from a stored prefix",
                                   registry=r)
        self.prefix_hit_tokens = Counter("sirocco_prefix_cache_hit_tokens", "Prompt tokens restored from the "
                                         "prefix store instead of pre-filled", registry=r)
        self.prefix_bytes = Gauge("sirocco_prefix_cache_bytes", "Bytes of keys and values in the prefix store "
                                  "(over every layer of the model)", registry=r)
        self.prefix_entries = Gauge("sirocco_prefix_cache_entries", "Prompt states in the prefix store", registry=r)
        for reason in ("stop", "length", "abort"):
            self.success.labels(finish_reason=reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict:
        """The numbers of ``render`` that a status view shows, read from the same registry: gauges as they are,
        counters and histograms' ``_sum`` / ``_count`` as totals since the start (a reader takes differences
        between two snapshots for rates and recent means)."""
        get = self.registry.get_sample_value
        out: dict = {"running": get("sirocco_requests_running"), "waiting": get("sirocco_requests_waiting")}
        for key, name in (("prompt_tokens", "sirocco_prompt_tokens_total"),
                          ("generation_tokens", "sirocco_generation_tokens_total"),
                          ("busy_seconds", "sirocco_engine_busy_seconds_total")):
            out[key] = get(name)
        for key, name in (("ttft", "sirocco_time_to_first_token_seconds"),
                          ("tpot", "sirocco_time_per_output_token_seconds"),
                          ("e2e", "sirocco_e2e_request_latency_seconds"),
                          ("step_tokens", "sirocco_iteration_tokens")):
            out[key] = {"sum": get(name + "_sum"), "count": get(name + "_count")}
        out["finished"] = {reason: get("sirocco_request_success_total", {"finish_reason": reason})
                           for reason in ("stop", "length", "abort")}
        return out
