"""The Grafana dashboard in docs/grafana/ queries only metrics Conveyor exports.

Goal: a renamed or dropped metric cannot leave a dashboard panel silently empty.
Method: scrape a live broker, collect every name its exposition can produce (family
names, counters' ``_total``, histograms' ``_bucket``/``_sum``/``_count``), then take
every PromQL expression of the dashboard (panels and template variables), strip
label matchers, grouping clauses, strings and durations, and check each remaining
identifier that is not a PromQL function or keyword against that set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conveyor.testing.server import BrokerThread

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana" / "conveyor.json"
PROMQL_WORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan",
})
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",), "summary": ("_sum", "_count", ""), "info": ("_info",)}


def exported_names(text: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def expressions(dashboard: dict[str, Any]) -> Iterator[str]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
            assert match is not None, variable["definition"]
            yield match.group(1)


def metric_names(expression: str) -> set[str]:
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)  # strings
    stripped = re.sub(r"\{[^}]*\}", "", stripped)  # label matchers
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", stripped)  # grouping
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # range selectors
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", stripped):
        word = match.group(0)
        following = stripped[match.end():].lstrip()
        if following.startswith("(") or word.lower() in PROMQL_WORDS:
            continue  # a function call or a keyword
        names.add(word)
    return names


def test_metric_names_are_found_in_expressions() -> None:
    expression = ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{x=~"$y"}[5m]))) '
                  "/ on (instance) b_total + topk(3, c)")
    assert metric_names(expression) == {"a_bucket", "b_total", "c"}


def test_every_dashboard_expression_names_exported_metrics(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    with BrokerThread(tmp_path, listeners=("http",)) as server:
        base = f"http://127.0.0.1:{server.ports['http']}"
        text = httpx.get(base + "/metrics").text
    exported = exported_names(text)
    used: set[str] = set()
    for expression in expressions(dashboard):
        names = metric_names(expression)
        assert names, f"no metric in {expression!r}"
        assert names <= exported, f"{expression!r} uses {sorted(names - exported)}"
        used |= names
    # the dashboard covers each area: queues, partitions, groups, listeners, storage, process
    for prefix in ("conveyor_queue_", "conveyor_partition_", "conveyor_group_",
                   "conveyor_listener_", "conveyor_storage_", "process_",
                   "conveyor_event_loop_"):
        assert any(name.startswith(prefix) for name in used), prefix
