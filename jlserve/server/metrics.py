"""Prometheus metrics of the swap, exported on vLLM's own `/metrics`.

The registry is a parameter so tests can build coordinators without clashing on the
process-wide default registry; the plugin passes the default one, which vLLM exposes.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# Swaps take milliseconds on tiny models and seconds on large ones.
UPDATE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class SwapMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.version = Gauge(
            "jlserve_model_version", "Model version being served (0 = base).", registry=registry
        )
        self.update_seconds = Histogram(
            "jlserve_update_duration_seconds",
            "Time from receiving an update or rollback to serving its version.",
            ["operation"],
            buckets=UPDATE_BUCKETS,
            registry=registry,
        )
        self.rejected = Counter(
            "jlserve_updates_rejected",
            "Updates refused or failed, by error type.",
            ["reason"],
            registry=registry,
        )


# Jobs take minutes to hours.
JOB_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0)


class JobMetrics:
    """The fine-tuning jobs: how many wait or run, how long they took, why they failed."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.jobs = Gauge(
            "jlserve_jobs", "Fine-tuning jobs by status.", ["status"], registry=registry
        )
        self.duration = Histogram(
            "jlserve_job_duration_seconds",
            "Time from a worker claiming a job to its end, by outcome.",
            ["status"],
            buckets=JOB_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            "jlserve_jobs_failed",
            "Fine-tuning jobs failed, by error code.",
            ["code"],
            registry=registry,
        )

    def set_counts(self, counts: dict[str, int]) -> None:
        for status, n in counts.items():
            self.jobs.labels(status=status).set(n)

    def ended(self, status: str, code: str | None, seconds: float | None) -> None:
        if seconds is not None:
            self.duration.labels(status=status).observe(seconds)
        if code is not None:
            self.failures.labels(code=code).inc()
