"""The Grafana dashboard the template ships (grafana/flysticky.json in a generated project):
it imports as Grafana's "Import dashboard" paste takes it, every query is PromQL that a real
parser (promql-parser, Prometheus's grammar) accepts, and every query asks only for the metrics
and label values flysticky exports, on the machines the dashboard's variables select."""

from __future__ import annotations

import fnmatch
import json
import re
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import promql_parser
import pytest

ROOT = Path(__file__).parent.parent
TEMPLATE = ROOT / "template"
PROJECT = "{{cookiecutter.project_slug}}"
RELATIVE = "grafana/flysticky.json"  # inside the generated project
DASHBOARD_PATH = TEMPLATE / PROJECT / RELATIVE

#: The labels Fly's scraper adds to every series.
FLY_LABELS = frozenset({"app", "region", "instance"})
#: What flysticky exports: metric name (as exposed, counters with _total) -> its labels.
COUNTERS: dict[str, frozenset[str]] = {
    "flysticky_decisions_total": frozenset({"outcome", "routed_by"}),
    "flysticky_repins_total": frozenset({"arrived_by"}),
    "flysticky_replay_cache_arrivals_total": frozenset({"status"}),
    "flysticky_forwards_total": frozenset({"result"}),
}
GAUGES: dict[str, frozenset[str]] = {
    "flysticky_machines": frozenset(),
    "flysticky_build_info": frozenset({"version"}),
}
METRICS = COUNTERS | GAUGES
#: Every value each enumerated label can take.
LABEL_VALUES: dict[str, frozenset[str]] = {
    "outcome": frozenset(
        {"pinned", "stamped", "replayed", "repinned", "off_pin", "unowned", "skipped"}
    ),
    "routed_by": frozenset({"cookie", "key", "session"}),
    "arrived_by": frozenset(
        {
            "fly-replay-src",
            "fly-preferred-instance-unavailable",
            "fly-replay-failed",
            "fly-replay-cache-status",
        }
    ),
    "status": frozenset({"hit", "miss", "bypass", "other"}),
    "result": frozenset({"forwarded", "served_here", "failed"}),
}
#: Every selector carries exactly these matchers of the dashboard's variables.
FILTERS = {"app": "$app", "region": "$region", "instance": "$instance"}
#: The datasource every panel, query and query variable names: the datasource variable's.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: $__rate_interval stands for this (unusual) window while parsing, so that every window
#: found afterwards can be told to be Grafana's.
RATE_INTERVAL = "$__rate_interval"
SENTINEL = timedelta(seconds=4321)
GRID_COLUMNS = 24
LEGEND_LABEL = re.compile(r"\{\{\s*(.+?)\s*\}\}")
LABEL_VALUES_QUERY = re.compile(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)")

Json = dict[str, Any]


def load() -> Json:
    dashboard: Json = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    return dashboard


DASHBOARD = load()
PANELS: list[Json] = DASHBOARD["panels"]
QUERIES = [(panel, target) for panel in PANELS for target in panel["targets"]]


def query_id(query: tuple[Json, Json]) -> str:
    panel, target = query
    return f"{panel['id']}{target['refId']}-{panel['title']}"


def parse(expr: str) -> promql_parser.Expr:
    window = f"{int(SENTINEL.total_seconds())}s"
    return promql_parser.parse(expr.replace(RATE_INTERVAL, window))


class Found:
    """What one parsed query asks for."""

    def __init__(self, expr: promql_parser.Expr) -> None:
        self.selectors: list[promql_parser.VectorSelector] = []
        self.windowed: list[promql_parser.MatrixSelector] = []
        self.calls: list[promql_parser.Call] = []
        self.grouping: set[str] = set()
        promql_parser.walk(expr, self.visit)

    def visit(self, node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            self.selectors.append(node)
        elif isinstance(node, promql_parser.MatrixSelector):
            self.windowed.append(node)
        elif isinstance(node, promql_parser.Call):
            self.calls.append(node)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            assert node.modifier.type == promql_parser.AggModifierType.By, "by (...) only"
            self.grouping.update(node.modifier.labels)


def all_datasources(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from all_datasources(value)
    elif isinstance(node, list):
        for item in node:
            yield from all_datasources(item)


# --- Grafana's dashboard shape --------------------------------------------------------------


def test_dashboard_imports_by_paste() -> None:
    """Top-level keys as Grafana's dashboard schema (kinds/dashboard) requires them; no
    `__inputs` (the export-for-sharing form), no id (an import makes a new dashboard)."""
    assert DASHBOARD["uid"] == "flysticky"
    assert DASHBOARD["title"] == "flysticky: sticky sessions"
    assert isinstance(DASHBOARD["schemaVersion"], int) and 36 <= DASHBOARD["schemaVersion"] <= 41
    assert "__inputs" not in DASHBOARD and "__requires" not in DASHBOARD
    assert DASHBOARD.get("id") is None
    assert DASHBOARD["graphTooltip"] in (0, 1, 2)
    assert isinstance(DASHBOARD["editable"], bool)
    assert set(DASHBOARD["time"]) == {"from", "to"}
    assert isinstance(DASHBOARD["annotations"]["list"], list)
    assert isinstance(DASHBOARD["templating"]["list"], list)
    assert all(isinstance(tag, str) for tag in DASHBOARD["tags"])
    assert isinstance(PANELS, list) and PANELS
    # No datasource anywhere but the variable: an import works whatever it is named.
    found = list(all_datasources(DASHBOARD))
    assert found and all(each == DATASOURCE for each in found), found


def test_variables_select_datasource_app_region_and_machine() -> None:
    variables = {each["name"]: each for each in DASHBOARD["templating"]["list"]}
    assert list(variables) == ["datasource", "app", "region", "instance"]  # dependency order
    for each in variables.values():
        assert each["type"] in ("datasource", "query") and each["hide"] in (0, 1, 2)
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    assert "datasource" not in datasource
    for name in FILTERS:
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        assert variable["multi"] is True and variable["includeAll"] is True
        assert variable["allValue"] == ".*"  # the queries match with =~
        assert variable["refresh"] in (1, 2)  # on load or on time change, never "never"
        assert variable["definition"] == variable["query"]
        match = LABEL_VALUES_QUERY.fullmatch(variable["query"])
        assert match and match["label"] == name, variable["query"]
        (selector,) = Found(parse(match["selector"])).selectors
        assert selector.name in METRICS
        # Each variable narrows by the ones before it, and only by those.
        before = list(FILTERS)[: list(FILTERS).index(name)]
        matchers = {m.name: m.value for m in selector.matchers.matchers}
        assert matchers == {each: FILTERS[each] for each in before}, variable["query"]


def test_every_panel_has_title_description_datasource_and_targets() -> None:
    for panel in PANELS:
        assert panel["type"] in ("stat", "timeseries"), panel["type"]
        assert isinstance(panel["id"], int) and panel["id"] > 0
        assert panel["title"].strip(), panel
        # Grafana shows it on the panel's (i): it says what healthy looks like.
        assert "Healthy" in panel["description"], panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert isinstance(panel["options"], dict)
        assert isinstance(panel["fieldConfig"]["defaults"], dict)
        assert isinstance(panel["fieldConfig"]["overrides"], list)
        assert isinstance(panel.get("transformations", []), list)
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert isinstance(target["expr"], str) and target["expr"].strip()
        thresholds = panel["fieldConfig"]["defaults"].get("thresholds")
        if thresholds is not None:
            steps = thresholds["steps"]
            assert thresholds["mode"] in ("absolute", "percentage")
            assert steps[0]["value"] is None  # the base step, -Infinity
            values = [step["value"] for step in steps[1:]]
            assert values == sorted(values), panel["title"]


def test_panel_ids_are_unique() -> None:
    ids = Counter(panel["id"] for panel in PANELS)
    assert not [each for each, count in ids.items() if count > 1]


def test_panels_fit_the_grid_without_overlapping() -> None:
    boxes = []
    for panel in PANELS:
        pos = panel["gridPos"]
        x, y, w, h = (pos[key] for key in "xywh")
        assert all(isinstance(v, int) for v in (x, y, w, h)), panel["title"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= GRID_COLUMNS, panel["title"]
        boxes.append((panel["title"], x, y, w, h))
    for i, (a, ax, ay, aw, ah) in enumerate(boxes):
        for b, bx, by, bw, bh in boxes[i + 1 :]:
            apart = ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay
            assert apart, f"{a!r} overlaps {b!r}"


def test_the_stat_panels_come_first() -> None:
    top = sorted((p for p in PANELS if p["gridPos"]["y"] == 0), key=lambda p: p["gridPos"]["x"])
    assert [p["type"] for p in top] == ["stat"] * 4
    assert all(p["gridPos"]["y"] > 0 for p in PANELS if p["type"] != "stat")


# --- The queries ----------------------------------------------------------------------------


@pytest.mark.parametrize("query", QUERIES, ids=query_id)
def test_query_parses_and_asks_only_for_what_flysticky_exports(query: tuple[Json, Json]) -> None:
    panel, target = query
    expr = target["expr"]
    try:
        found = Found(parse(expr))
    except ValueError as error:
        pytest.fail(f"{panel['title']}: {error}\n{expr}")
    assert found.selectors, expr
    labels_here = set(FLY_LABELS)
    for selector in found.selectors:
        name = selector.name
        assert name in METRICS, f"unknown metric {name!r}"
        assert not selector.matchers.or_matchers, expr
        labels_here |= METRICS[name]
        matchers = selector.matchers.matchers
        # Filtered by the three variables, each once, as regexes (multi-select and All).
        filters = {m.name: (m.op, m.value) for m in matchers if m.name in FILTERS}
        expected = {k: (promql_parser.MatchOp.Re, v) for k, v in FILTERS.items()}
        assert filters == expected, f"{name}: {selector}"
        assert len([m for m in matchers if m.name in FILTERS]) == len(FILTERS)
        for matcher in matchers:
            if matcher.name in FILTERS:
                continue
            assert matcher.name in METRICS[name], f"{name} has no label {matcher.name!r}"
            values = set(matcher.value.split("|"))
            if matcher.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.NotEqual):
                values = {matcher.value}
            unknown = values - LABEL_VALUES[matcher.name]
            assert not unknown, f"{matcher.name} never takes {sorted(unknown)}: {selector}"
    # Counters only through rate() over Grafana's $__rate_interval; gauges never.
    windowed = Counter(m.vector_selector.name for m in found.windowed)
    for name, count in Counter(s.name for s in found.selectors).items():
        assert windowed[name] == (count if name in COUNTERS else 0), f"{name} in {expr}"
    assert all(m.range == SENTINEL for m in found.windowed), expr
    for call in found.calls:
        if any(isinstance(arg, promql_parser.MatrixSelector) for arg in call.args):
            assert call.func.name == "rate", expr
    # Grouping by labels the series have; legends name labels the grouping keeps.
    assert found.grouping <= labels_here, f"{found.grouping - labels_here} in {expr}"
    legend = set(LEGEND_LABEL.findall(target.get("legendFormat", "")))
    assert legend <= found.grouping, f"legend {legend - found.grouping} lost by {expr}"


def test_every_label_value_and_metric_is_shown_somewhere() -> None:
    """The dashboard covers what flysticky exports: each metric is queried, and each
    enumerated label is either matched or grouped by (so every value shows up)."""
    used_metrics: set[str] = set()
    grouped: set[str] = set()
    for _, target in QUERIES:
        found = Found(parse(target["expr"]))
        used_metrics |= {s.name for s in found.selectors if s.name}
        grouped |= found.grouping
    assert used_metrics == set(METRICS)
    assert set(LABEL_VALUES) <= grouped


def test_the_parser_has_teeth() -> None:
    """The checks above mean something only if the parser refuses what Prometheus refuses."""
    for broken in (
        "sum(rate(flysticky_repins_total[5m])",  # unclosed
        "rate(flysticky_repins_total)",  # rate of an instant vector
        "rates(flysticky_repins_total[5m])",  # no such function
        'flysticky_repins_total{arrived_by=~"("}',  # bad regex
        "flysticky_repins_total[$__rate_interval]",  # Grafana's variable, not substituted
    ):
        with pytest.raises(ValueError):
            promql_parser.parse(broken)


# --- In the template ------------------------------------------------------------------------


def test_only_spaced_braces_as_the_template_tests_allow() -> None:
    """tests/test_template.py refuses a generated file with `{{` not followed by a space;
    Grafana's legends take `{{ label }}` alike. No Jinja block or comment either."""
    text = DASHBOARD_PATH.read_text(encoding="utf-8")
    assert "{{" not in text.replace("{{ ", "")
    assert "{%" not in text and "{#" not in text and "cookiecutter" not in text


def test_the_template_copies_it_without_rendering() -> None:
    """Jinja would take the legends' `{{ instance }}` for template variables: cookiecutter
    must copy the file as it is (its patterns match paths inside the project directory)."""
    config = json.loads(TEMPLATE.joinpath("cookiecutter.json").read_text(encoding="utf-8"))
    patterns: list[str] = config.get("_copy_without_render", [])
    parts = RELATIVE.split("/")
    paths = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # the dir, then the file
    assert any(fnmatch.fnmatch(p, pattern) for p in paths for pattern in patterns), patterns


def test_the_tables_above_are_what_flysticky_exports() -> None:
    """COUNTERS, GAUGES and LABEL_VALUES against a real exposition of flysticky's collector
    (every family, every label value it can take): the dashboard follows the code."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from flysticky import StickyConfig
    from flysticky.core import ARRIVAL_HEADERS, Decider, Tally
    from flysticky.metrics import TallyCollector

    tally = Tally()
    decider = Decider(StickyConfig(), "90801679a10038", tally)
    decider.owners.update(["90801679a10038"])
    for header in ARRIVAL_HEADERS:
        tally.repins[header] = 1
    tally.arrived("anything else")
    registry = CollectorRegistry()
    registry.register(TallyCollector(tally, lambda: decider))
    exported: dict[str, set[str]] = {}
    values: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
            for label, value in sample.labels.items():
                values.setdefault(label, set()).add(value)
    assert exported == {name: set(labels) for name, labels in METRICS.items()}
    values.pop("version")
    assert values == {label: set(allowed) for label, allowed in LABEL_VALUES.items()}
