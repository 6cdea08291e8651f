"""The serving Deployment's companions beyond Service and NetworkPolicy: a PodDisruptionBudget and an
optional Prometheus Operator PodMonitor (``serve.pod_monitor``). Pure builders, like render/serve.py.

vLLM exposes Prometheus metrics at ``/metrics`` on the API port; gptoss_serve_auth leaves that path open
(it runs no model), so a scrape needs no key. The pods also carry the ``prometheus.io/*`` annotations
for annotation-based scrapers.
"""

from __future__ import annotations

from gptoss_cloud.render.k8s.serve import METRICS_PATH, ServeTarget, _meta, deployment_name, selector


def pod_disruption_budget(t: ServeTarget) -> dict:
    # One replica at a time: a drain never takes the whole service down while others serve, and a
    # single replica can still be drained (maxUnavailable 0 would block node maintenance forever).
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(deployment_name(t.run_id), t, "serve"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(t.run_id)}},
    }


def pod_monitor(t: ServeTarget) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(deployment_name(t.run_id), t, "serve"),
        "spec": {
            "selector": {"matchLabels": selector(t.run_id)},
            "podMetricsEndpoints": [{"port": "http", "path": METRICS_PATH, "interval": "30s"}],
        },
    }


def extras(t: ServeTarget) -> list[dict]:
    return [pod_disruption_budget(t)] + ([pod_monitor(t)] if t.spec.serve.pod_monitor else [])
