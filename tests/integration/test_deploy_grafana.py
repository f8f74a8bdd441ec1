"""deploy/grafana/fulcrum.json against a real node: the dashboard is an importable JSON model,
promtool parses every query, every metric and label a query names is one a real cluster node
(etcd, a VIP, HTTP and TCP listeners, a pool with outlier checks) exports on /metrics, and a
real Prometheus scraping that node returns data for every query."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO, free_port, spawn_backend, wait_port
from tests.integration.test_deploy_prometheus import PROMTOOL
from tests.integration.test_vip_api import RUN_RECORDED
from tests.promtext import parse, value

PROMETHEUS = shutil.which("prometheus")  # the server of the same Debian package
DASHBOARD = REPO / "deploy" / "grafana" / "fulcrum.json"
# Labels Prometheus adds to every series of a target (job, instance) and the one the
# prometheus_targets role adds (node): not on /metrics, valid in queries.
TARGET_LABELS = {"job", "instance", "node"}
# Grafana's variables, as promtool must see them: a range for the interval ones, a regex
# matching anything for ours (they only appear inside =~"...").
GRAFANA_RANGES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_SELECTOR = re.compile(rf"({NAME})?\s*\{{([^{{}}]*)\}}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(rf"(?<![\w.:]){NAME}(?![\w:])(?!\s*\()")
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)$", re.DOTALL)
# A cluster node joins etcd, takes its lease and the VIP within a few lease TTLs (2 s);
# 30 s is the margin for 2 busy cores.
SETTLE = 30.0


def promql(expr: str) -> str:
    for var, rng in GRAFANA_RANGES.items():
        expr = expr.replace(var, rng)
    return re.sub(r"\$\{?[a-zA-Z_]\w*\}?", ".*", expr)


def _balanced(text: str, start: int) -> str:
    """The text inside the parenthesis that opens at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i]
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def _metrics(text: str) -> set[str]:
    """Metric names in string-free PromQL: identifiers that are not functions, keywords or labels."""
    text = _GROUPING.sub(" ", text)
    text = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", text)
    text = _RANGE.sub(" ", text)
    return {n for n in _IDENT.findall(text) if n not in KEYWORDS}


Grouping = tuple[str, set[str], set[str]]  # (by|on|..., its labels, the metrics it applies to)


def names_in(expr: str) -> tuple[set[str], list[tuple[str | None, set[str]]], list[Grouping]]:
    """(metric names, (metric, matcher labels) per selector, grouping clauses) of ``expr``.

    A by/without clause applies to the metrics of the aggregation's argument, which must
    follow it (``sum by (pool) (...)``); on/ignoring to every metric of the expression;
    group_left/right's extra labels to one side.
    """
    text = _STRING.sub('""', expr)
    everything = _metrics(text)
    groupings: list[Grouping] = []
    for m in _GROUPING.finditer(text):
        labels = {label.strip() for label in m.group(2).split(",") if label.strip()}
        if m.group(1) in ("by", "without"):
            rest = text[m.end():].lstrip()
            assert rest.startswith("("), f"write `sum by (...) (expr)`, not `sum(expr) by (...)`: {expr!r}"
            scope = _metrics(_balanced(rest, 0))
        else:
            scope = everything
        groupings.append((m.group(1), labels, scope))
    selectors = [(m.group(1), set(_MATCHER.findall(m.group(2)))) for m in _SELECTOR.finditer(_GROUPING.sub(" ", text))]
    return everything, selectors, groupings


def problems(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """What in ``expr`` names a series or label the node does not export ([] when all is there)."""
    metrics, selectors, groupings = names_in(expr)
    out = [f"{m}: not exported" for m in sorted(metrics - exported.keys())]
    if not metrics:
        out.append("names no metric")
    for metric, labels in selectors:
        if metric is None:
            out.append("a selector without a metric name")
        elif metric in exported:
            out += [f"{metric}: no label {label}" for label in sorted(labels - exported[metric] - TARGET_LABELS)]
    for kind, labels, scope in groupings:
        known = [exported[m] | TARGET_LABELS for m in sorted(scope & exported.keys())]
        if kind in ("group_left", "group_right"):
            out += [f"no series has label {label} ({kind})" for label in sorted(labels)
                    if not any(label in k for k in known)]
        else:
            out += [f"{m}: no label {label} ({kind})" for m in sorted(scope & exported.keys())
                    for label in sorted(labels - exported[m] - TARGET_LABELS)]
    return out


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = _LABEL_VALUES.match(var["query"]["query"])
            assert m, f"variable {var['name']}: only label_values(selector, label) is used"
            found.append((f"variable {var['name']}", m.group(1)))
            found.append((f"variable {var['name']} label", f'{m.group(1).split("{")[0]}{{{m.group(2)}!=""}}'))
    return found


def test_dashboard_is_an_importable_model_with_the_datasource_as_an_input() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    assert dashboard["uid"] and dashboard["title"] == "Fulcrum" and dashboard["schemaVersion"] >= 36
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == ds, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(t["datasource"] == ds and t["expr"].strip() for t in panel["targets"]), panel["title"]
    # what the issue asks for, by the families the queries read
    everything = " ".join(expr for _, expr in queries(dashboard))
    for family in ("fulcrum_http_responses_total", "fulcrum_http_request_duration_seconds_bucket",
                   "fulcrum_backend_response_seconds_bucket", "fulcrum_backend_health",
                   "fulcrum_backend_inflight_requests", "fulcrum_pool_queue_length", "fulcrum_pool_retries_total",
                   "fulcrum_backend_ejections_total", "fulcrum_tcp_sessions_open", "fulcrum_tcp_sent_bytes_total",
                   "fulcrum_cluster_etcd_reachable", "fulcrum_cluster_lease_held", "fulcrum_cluster_vips_held",
                   "fulcrum_cluster_nodes", "fulcrum_config_revision", "process_cpu_seconds_total",
                   "process_resident_memory_bytes", "process_open_fds"):
        assert family in everything, family


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    assert PROMTOOL is not None, "promtool missing: run `make sysdeps-test` (Debian package prometheus)"
    found = queries(json.loads(DASHBOARD.read_text()))
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": promql(expr)} for i, (_, expr) in enumerate(found)]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    done = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "rules.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(found)} rules found" in done.stdout, done.stdout
    # and it can fail: one query with a typo
    rules["groups"][0]["rules"][0]["expr"] = "sum by (pool (rate(fulcrum_backend_requests_total[1m]))"
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(rules))
    bad = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "bad.yml")], capture_output=True, timeout=60)
    assert bad.returncode != 0


def test_extraction_reads_names_labels_and_skips_functions_and_keywords() -> None:
    expr = ('histogram_quantile(0.99, sum by (pool, le) (rate(fulcrum_backend_response_seconds_bucket'
            '{instance=~"$instance",pool=~"$pool"}[$__rate_interval]))) / on (pool) group_left '
            'max by (pool) (fulcrum_pool_queue_length offset 5m) or vector(0)')
    metrics, selectors, groupings = names_in(promql(expr))
    bucket, queue = "fulcrum_backend_response_seconds_bucket", "fulcrum_pool_queue_length"
    assert metrics == {bucket, queue}
    assert selectors == [(bucket, {"instance", "pool"})]
    assert groupings == [("by", {"pool", "le"}, {bucket}), ("on", {"pool"}, {bucket, queue}),
                         ("by", {"pool"}, {queue})]
    exported = {"fulcrum_backend_response_seconds_bucket": {"pool", "backend", "le"},
                "fulcrum_pool_queue_length": {"pool"}}
    assert problems(expr, exported) == []
    assert problems(expr.replace("queue_length", "queue_len"), exported) == ["fulcrum_pool_queue_len: not exported"]
    assert problems(expr.replace('pool=~"', 'poool=~"'), exported) == [
        "fulcrum_backend_response_seconds_bucket: no label poool"]
    assert problems(expr.replace("by (pool, le)", "by (listener, le)"), exported) == [
        "fulcrum_backend_response_seconds_bucket: no label listener (by)"]
    assert problems(expr.replace("on (pool)", "on (backend)"), exported) == [
        "fulcrum_pool_queue_length: no label backend (on)"]


@dataclass
class ClusterNode:
    admin: int
    http: int
    tcp: int
    exported: dict[str, set[str]]  # series name -> its label names, from one scrape


@pytest.fixture
def cluster_node(spawn, tmp_path: Path, etcd) -> ClusterNode:  # type: ignore[no-untyped-def]
    """A cluster node with everything the dashboard reads, up with its lease and VIP."""
    a, b = spawn_backend(spawn, "a"), spawn_backend(spawn, "b")
    http, tcp, admin = free_port(), free_port(), free_port()
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    config = tmp_path / "n1.toml"
    config.write_text(f"""
[node]
id = "n1"
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path / 'state'}"
drain_timeout = "1s"
workers = 1

[cluster]
etcd = [{endpoints}]
lease_ttl = "2s"
vip_interface = "eth0"

[[cluster.vips]]
address = "203.0.113.100/24"

[[listeners]]
name = "web"
protocol = "http"
bind = "127.0.0.1:{http}"
pool = "p0"
  [listeners.rate_limit]
  rate = 1000
  burst = 1000

[[listeners]]
name = "raw"
protocol = "tcp"
bind = "127.0.0.1:{tcp}"
pool = "p0"

[[pools]]
name = "p0"
retry_on = [503]
  [pools.outlier]
  consecutive_failures = 3
  [[pools.backends]]
  address = "127.0.0.1:{a}"
  [[pools.backends]]
  address = "127.0.0.1:{b}"
""")
    # `lbnode run` with the VIP recorded in memory, not added to eth0 (tests/integration/test_vip_api.py)
    # (the spawn fixture runs in tmp_path: the repository goes on sys.path for `tests`)
    node = spawn("-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); {RUN_RECORDED}", "run", "--config",
                 str(config), name="n1")
    try:
        wait_port(admin, timeout=SETTLE)
    except TimeoutError:
        raise AssertionError(f"the node did not start:\n{node.log()[-3000:]}") from None
    assert httpx.get(f"http://127.0.0.1:{http}/", timeout=10).status_code == 200
    deadline = time.monotonic() + SETTLE
    while True:
        text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
        samples = parse(text)
        if (("fulcrum_cluster_vips_held", ()) in samples and value(samples, "fulcrum_cluster_vips_held") == 1
                and value(samples, "fulcrum_cluster_lease_held") == 1):
            break
        assert time.monotonic() < deadline, f"the node did not take its lease and VIP in {SETTLE}s:\n{node.log()[-3000:]}"
        time.sleep(0.2)
    exported: dict[str, set[str]] = {}
    for name, labels in samples:
        exported.setdefault(name, set()).update(k for k, _ in labels)
    return ClusterNode(admin, http, tcp, exported)


def test_every_query_names_series_and_labels_a_cluster_node_exports(cluster_node: ClusterNode) -> None:
    found = queries(json.loads(DASHBOARD.read_text()))
    assert len(found) > 40
    wrong = {where: p for where, expr in found if (p := problems(promql(expr), cluster_node.exported))}
    assert not wrong, json.dumps(wrong, indent=2)


# Prometheus scrapes every 500 ms; the queries' windows (2 s) then hold 4 samples, rate() needs 2.
SCRAPE, WINDOW = "500ms", "2s"
# Queries that are empty on a healthy node with traffic: filters that keep only trouble.
EMPTY_WHEN_HEALTHY = {"panel 'Backends not enabled' A"}


def test_every_query_returns_data_from_a_real_prometheus_scraping_the_node(
    cluster_node: ClusterNode, tmp_path: Path
) -> None:
    """The queries evaluated by Prometheus itself (Debian's prometheus package) over a few scrapes."""
    if PROMETHEUS is None:
        pytest.fail("prometheus missing: run `make sysdeps-test` (Debian package prometheus)")
    port = free_port()
    config = {"global": {"scrape_interval": SCRAPE, "scrape_timeout": SCRAPE},
              "scrape_configs": [{"job_name": "fulcrum", "static_configs": [
                  {"targets": [f"127.0.0.1:{cluster_node.admin}"], "labels": {"node": "n1"}}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "wb")
    server = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        try:
            wait_port(port, timeout=SETTLE)
        except TimeoutError:
            raise AssertionError((tmp_path / "prometheus.log").read_text()[-3000:]) from None
        # the web port opens before the TSDB is ready: queries get 503 until /-/ready says 200
        deadline = time.monotonic() + SETTLE
        while httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-3000:]
            time.sleep(0.1)
        api = f"http://127.0.0.1:{port}/api/v1/query"

        def query(expr: str) -> dict:
            r = httpx.get(api, params={"query": expr}, timeout=10)
            assert r.status_code == 200, f"{expr}: {r.text}"
            return r.json()["data"]

        # traffic while Prometheus scrapes: HTTP requests and L4 sessions, until 4 scrapes are in
        deadline = time.monotonic() + SETTLE
        with httpx.Client(timeout=10) as client:
            while True:
                assert client.get(f"http://127.0.0.1:{cluster_node.http}/").status_code == 200
                with socket.create_connection(("127.0.0.1", cluster_node.tcp), timeout=10) as s:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    while s.recv(65536):
                        pass
                scraped = query('count_over_time(up{job="fulcrum"}[1m])')["result"]
                if scraped and float(scraped[0]["value"][1]) >= 4:
                    break
                assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-3000:]
                time.sleep(0.05)
        assert query('up{job="fulcrum"}')["result"][0]["value"][1] == "1"

        empty, failed = [], {}
        for where, expr in queries(json.loads(DASHBOARD.read_text())):
            text = re.sub(r"\$__(rate_)?interval", WINDOW, expr)
            text = re.sub(r"\$\{?[a-zA-Z_]\w*\}?", ".*", text)
            r = httpx.get(api, params={"query": text}, timeout=10)
            if r.status_code != 200:
                failed[where] = r.text
            elif not r.json()["data"]["result"] and where not in EMPTY_WHEN_HEALTHY:
                empty.append(where)
        assert not failed, json.dumps(failed, indent=2)
        assert not empty, f"no data: {empty}"
    finally:
        server.terminate()
        server.wait(30)
        log.close()
