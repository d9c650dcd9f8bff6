"""Prometheus metrics, read at scrape time from the bus's plain counters (nothing per event)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .manager import TaskManager

__all__ = ["build_registry"]


class _TaskmonCollector(Collector):
    def __init__(self, manager: TaskManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        bus = self._manager.bus
        per_task, all_tasks = bus.count()
        subscribers = GaugeMetricFamily("taskmon_subscribers", "Open event streams", labels=["stream"])
        subscribers.add_metric(["task"], per_task)
        subscribers.add_metric(["all"], all_tasks)
        yield subscribers
        yield CounterMetricFamily("taskmon_events_published", "Task events published", value=bus.changes_seen)
        yield CounterMetricFamily(
            "taskmon_events_delivered", "Task events written to stream clients", value=bus.delivered
        )
        yield CounterMetricFamily(
            "taskmon_events_coalesced",
            "Pending events replaced by a newer snapshot of the same task for a slow reader",
            value=bus.coalesced,
        )
        tasks = GaugeMetricFamily("taskmon_tasks", "Retained tasks by status", labels=["status"])
        for status, count in self._manager.count_by_status().items():
            tasks.add_metric([status.value], count)
        yield tasks


def build_registry(manager: TaskManager) -> CollectorRegistry:
    """A registry per app, so several apps (tests, benchmarks) never share counters."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_TaskmonCollector(manager))
    return registry
