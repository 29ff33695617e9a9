"""`vmsuper stats --prometheus`: snapshots in the Prometheus text format.

A custom collector turns the snapshots into metric families, and prometheus-client writes them
(`generate_latest`), so escaping and the format's rules are the library's. Every sample carries
the run's `pid` and `host`, and per-VCPU samples a `vcpu` label. The response-time histogram
is exposed as a Prometheus histogram in seconds with the log2 bucket bounds as `le`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from vmsuper.supervisor.stats import RunSnapshot

__all__ = ["SnapshotCollector", "exposition"]


class SnapshotCollector(Collector):
    """Metric families of a fixed list of snapshots."""

    def __init__(self, snaps: Sequence[RunSnapshot]) -> None:
        self._snaps = snaps

    def collect(self) -> Iterator[Metric]:
        run_labels = ["pid", "host", "log_dir"]
        vcpu_labels = [*run_labels, "vcpu"]
        live = GaugeMetricFamily("vmsuper_run_live", "1 while the run is live", labels=run_labels)
        state = GaugeMetricFamily(
            "vmsuper_vcpu_state", "1 for the VCPU's current state", labels=[*vcpu_labels, "state"]
        )
        waiting = GaugeMetricFamily(
            "vmsuper_vcpu_waiting_seconds",
            "How long the VCPU has waited on the plugin (0 when it does not wait)",
            labels=vcpu_labels,
        )
        exits = CounterMetricFamily(
            "vmsuper_vcpu_exits", "VCPU exits by kind", labels=[*vcpu_labels, "kind"]
        )
        ranges = CounterMetricFamily(
            "vmsuper_vcpu_range_exits",
            "VCPU exits forwarded to the plugin per reserved range",
            labels=[*vcpu_labels, "range"],
        )
        rate = GaugeMetricFamily(
            "vmsuper_vcpu_exits_per_second",
            "Exits per second between the snapshot's two readings",
            labels=vcpu_labels,
        )
        response_max = GaugeMetricFamily(
            "vmsuper_vcpu_plugin_response_max_seconds",
            "The plugin's longest response to an exit",
            labels=vcpu_labels,
        )
        poll_window = GaugeMetricFamily(
            "vmsuper_vcpu_poll_window_seconds",
            "How long the VCPU's runner and worker poll before they sleep (0: polling is off)",
            labels=vcpu_labels,
        )
        cpu = CounterMetricFamily(
            "vmsuper_process_cpu_seconds",
            "CPU time (user + system) of the run's processes",
            labels=[*run_labels, "role", "process_pid", "vcpu"],
        )
        uss = GaugeMetricFamily(
            "vmsuper_process_uss_bytes",
            "Unique set size of the run's processes",
            labels=[*run_labels, "role", "process_pid", "vcpu"],
        )
        for snap in self._snaps:
            run = [str(snap.pid or ""), snap.host or "", snap.log_dir]
            live.add_metric(run, 1.0 if snap.live else 0.0)
            for v in snap.vcpus:
                labels = [*run, str(v.vcpu)]
                state.add_metric([*labels, v.state], 1.0)
                waiting.add_metric(labels, v.waiting_s or 0.0)
                for kind, count in sorted(v.exits.items()):
                    exits.add_metric([*labels, kind], float(count))
                for name, count in sorted((v.ranges or {}).items()):
                    ranges.add_metric([*labels, name], float(count))
                if v.exits_per_second is not None:
                    rate.add_metric(labels, v.exits_per_second)
                if v.response_s.get("max_s") is not None:
                    response_max.add_metric(labels, v.response_s["max_s"] or 0.0)
                if v.poll_window_s is not None:
                    poll_window.add_metric(labels, v.poll_window_s)
            for p in snap.processes:
                labels = [*run, p.role, str(p.pid), "" if p.vcpu is None else str(p.vcpu)]
                if p.cpu_s is not None:
                    cpu.add_metric(labels, p.cpu_s)
                if p.uss_bytes is not None:
                    uss.add_metric(labels, float(p.uss_bytes))
        yield from (live, state, waiting, exits, ranges, rate, response_max, poll_window, cpu, uss)
        yield from self._histograms(run_labels)

    def _histograms(self, run_labels: list[str]) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "vmsuper_vcpu_plugin_response_seconds",
            "The plugin's response time to exits, from delivery to Resume (log2 buckets)",
            labels=[*run_labels, "vcpu"],
        )
        for snap in self._snaps:
            for v in snap.vcpus:
                if v.buckets is None:
                    continue
                cumulative = 0
                pairs = []
                for bucket, count in enumerate(v.buckets[:-1]):
                    cumulative += count
                    pairs.append((repr((1 << bucket) / 1e9), float(cumulative)))
                pairs.append(("+Inf", float(cumulative + v.buckets[-1])))
                family.add_metric(
                    [str(snap.pid or ""), snap.host or "", snap.log_dir, str(v.vcpu)],
                    pairs,
                    sum_value=v.response_sum_ns / 1e9,
                )
        yield family


def exposition(snaps: Sequence[RunSnapshot]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snaps))
    return generate_latest(registry).decode()
