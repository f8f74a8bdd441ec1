"""The pure parts of the benchmark (bench/): wrk parsing, /proc, tables, configs, sections' figures."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    accesslog,
    cluster,
    configs,
    harness,
    measure,
    metrics,
    policies,
    procstat,
    protections,
    report,
    variants,
)
from bench.configs import Ports  # noqa: E402
from bench.harness import failure_line  # noqa: E402
from bench.measure import L4Row, L7Row  # noqa: E402
from bench.procstat import parse_proc_stat  # noqa: E402
from bench.tables import render_table  # noqa: E402
from bench.throughput import evaluate_targets, render_l4, render_l7  # noqa: E402
from bench.wrk import WrkParseError, parse_time_ms, parse_wrk  # noqa: E402

# Real wrk 4.1.0 output (Debian) against the backend nginx.
WRK_OK = """\
Running 1s test @ http://127.0.0.1:19001/small
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    72.70us  103.61us   2.84ms   99.19%
    Req/Sec   116.47k     6.76k  127.53k    60.00%
  Latency Distribution
     50%   69.00us
     75%   81.00us
     90%   92.00us
     99%  161.00us
  115546 requests in 1.00s, 28.98MB read
Requests/sec: 115498.07
Transfer/sec:     28.97MB
"""

# A slow, failing run: ms/s units, socket errors, non-2xx responses.
WRK_ERRORS = """\
Running 10s test @ http://127.0.0.1:18080/small
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.31ms   40.02ms   1.99s    97.50%
    Req/Sec     4.52k   310.00     5.01k    71.00%
  Latency Distribution
     50%    5.12ms
     75%    8.00ms
     90%   20.51ms
     99%    1.02s
  45012 requests in 10.01s, 9.87MB read
  Socket errors: connect 0, read 12, write 0, timeout 3
  Non-2xx or 3xx responses: 42
Requests/sec:   4496.70
Transfer/sec:      0.99MB
"""


def test_parse_time_units():
    assert parse_time_ms("535.20us") == pytest.approx(0.5352)
    assert parse_time_ms("1.23ms") == pytest.approx(1.23)
    assert parse_time_ms("2.00s") == pytest.approx(2000.0)
    assert parse_time_ms("1.00m") == pytest.approx(60_000.0)
    with pytest.raises(WrkParseError):
        parse_time_ms("12 parsecs")


def test_parse_wrk_ok():
    r = parse_wrk(WRK_OK)
    assert r.requests == 115546
    assert r.seconds == pytest.approx(1.0)
    assert r.rps == pytest.approx(115498.07)
    assert r.latency_ms == pytest.approx({50: 0.069, 75: 0.081, 90: 0.092, 99: 0.161})
    assert r.non_2xx_3xx == 0
    assert r.socket_errors == {}
    assert r.errors == 0


def test_parse_wrk_errors_and_units():
    r = parse_wrk(WRK_ERRORS)
    assert r.requests == 45012
    assert r.seconds == pytest.approx(10.01)
    assert r.rps == pytest.approx(4496.70)
    assert r.latency_ms[50] == pytest.approx(5.12)
    assert r.latency_ms[99] == pytest.approx(1020.0)
    assert r.non_2xx_3xx == 42
    assert r.socket_errors == {"connect": 0, "read": 12, "write": 0, "timeout": 3}
    assert r.errors == 57


def test_parse_wrk_needs_latency_distribution():
    no_latency = WRK_OK.split("  Latency Distribution")[0] + WRK_OK.split("161.00us\n")[1]
    with pytest.raises(WrkParseError, match="latency"):
        parse_wrk(no_latency)


@pytest.mark.parametrize("text", ["", "unable to connect to 127.0.0.1:1 Connection refused\n"])
def test_parse_wrk_rejects_garbage(text):
    with pytest.raises(WrkParseError):
        parse_wrk(text)


def test_parse_proc_stat_with_spaces_and_parens_in_comm():
    fields = ["S", "4242", "1", "1", "0", "-1", "4194560", "100", "0", "0", "0"]
    fields += ["1234", "567", "8", "9"] + ["0"] * 37
    text = "4243 (lb (node) x) " + " ".join(fields) + "\n"
    st = parse_proc_stat(text)
    assert (st.ppid, st.pgrp, st.utime, st.stime, st.cutime, st.cstime) == (
        4242,
        1,
        1234,
        567,
        8,
        9,
    )
    assert st.user == 1234 + 8 and st.system == 567 + 9


def test_own_process_tree_cpu_is_readable():
    tree = procstat.process_tree(os.getpid())
    assert os.getpid() in tree
    assert procstat.tree_cpu_seconds([os.getpid()]) >= 0.0
    user0, system0 = procstat.tree_cpu_split([os.getpid()])
    end = time.process_time() + 0.1
    while time.process_time() < end:  # 0.1 s of user time: at least a tick on any kernel
        pass
    user1, system1 = procstat.tree_cpu_split([os.getpid()])
    assert user1 > user0 and system1 >= system0
    assert procstat.process_tree(2**22 + 12345) == {}


def test_render_table_aligns_and_escapes():
    out = render_table(["Name", "n"], [["a|b", 1], ["long name", 22]]).splitlines()
    assert out[0] == "| Name      |   n |"
    assert out[1] == "|:----------|----:|"
    assert out[2] == "| a\\|b      |   1 |"
    assert out[3] == "| long name |  22 |"
    assert len({len(line) for line in out}) == 1


def test_render_l7_ratios_and_failed_row():
    rows = [
        L7Row(
            "Fulcrum",
            rps=10_000,
            p50_ms=4.0,
            p99_ms=9.0,
            cpu_us_per_req=50.0,
            backend_cpu_us_per_req=8.0,
        ),
        L7Row(
            "HAProxy",
            rps=50_000,
            p50_ms=0.9,
            p99_ms=1.9,
            cpu_us_per_req=16.0,
            backend_cpu_us_per_req=8.0,
        ),
        L7Row("nginx", failed="nginx exited with code 1: [emerg] bind() failed"),
        L7Row(
            "direct (no balancer)",
            rps=130_000,
            p50_ms=0.2,
            p99_ms=0.5,
            backend_cpu_us_per_req=7.0,
            errors=3,
            note="3 timeout",
        ),
    ]
    lines = render_l7(rows).splitlines()
    fulcrum = [c.strip() for c in lines[2].strip("|").split("|")]
    assert fulcrum == ["Fulcrum", "10,000", "4.00", "9.00", "50.0", "3.12x", "0.20x", "8.0", "0"]
    assert "failed: nginx exited with code 1: [emerg] bind() failed" in lines[4]
    direct = [c.strip() for c in lines[5].strip("|").split("|")]
    assert direct[4] == "—" and direct[5] == "—"  # no balancer CPU
    assert direct[8] == "3 (3 timeout)"


def test_render_l7_without_haproxy_has_no_ratios():
    out = render_l7(
        [
            L7Row("Fulcrum", rps=1.0, p50_ms=1, p99_ms=2, cpu_us_per_req=3.0),
            L7Row("HAProxy", failed="x"),
        ]
    )
    assert "x" in out and "1.00x" not in out


def test_render_l4():
    rows = [
        L4Row("Fulcrum", gbps=0.5, cpu_ms_per_gb=2000, downloads=9),
        L4Row("HAProxy", gbps=1.0, cpu_ms_per_gb=1000, downloads=20),
    ]
    line = [c.strip() for c in render_l4(rows).splitlines()[2].strip("|").split("|")]
    assert line == ["Fulcrum", "0.50", "0.50x", "2000", "9"]


def _l7(f_cpu, h_cpu="ok"):
    f = L7Row("Fulcrum", failed="boom") if f_cpu is None else L7Row("Fulcrum", cpu_us_per_req=f_cpu)
    h = L7Row("HAProxy", failed="boom") if h_cpu is None else L7Row("HAProxy", cpu_us_per_req=10.0)
    return [f, h]


def _l4(f_gbps, h_gbps=1.0):
    f = L4Row("Fulcrum", failed="boom") if f_gbps is None else L4Row("Fulcrum", gbps=f_gbps)
    return [f, L4Row("HAProxy", gbps=h_gbps), L4Row("HAProxy, splice-response (info)", gbps=9.0)]


def test_targets_met_and_not_met():
    t = evaluate_targets(_l7(35.0), _l4(0.9))
    assert [(x.ratio, x.status) for x in t] == [("3.50x", "met"), ("0.90x", "met")]
    t = evaluate_targets(_l7(36.0), _l4(0.89))
    assert [(x.ratio, x.status) for x in t] == [("3.60x", "not met"), ("0.89x", "not met")]
    assert t[0].fulcrum == "36.0 µs/req" and t[0].haproxy == "10.0 µs/req"


def test_target_not_met_with_errors():
    rows = [
        L7Row("Fulcrum", cpu_us_per_req=20.0, requests=10_000, errors=11),
        L7Row("HAProxy", cpu_us_per_req=10.0, requests=50_000),
    ]
    assert evaluate_targets(rows, None)[0].status == "not met (11 errors in 10000 requests)"
    rows[0].errors = 10  # 0.1 % is tolerated
    assert evaluate_targets(rows, None)[0].status == "met"


def test_targets_failed_or_skipped():
    t = evaluate_targets(_l7(None), None)
    assert t[0].status == "not met (no Fulcrum figure)" and t[0].fulcrum == "failed"
    assert t[1].status == "not measured (section skipped)"
    t = evaluate_targets(_l7(10.0, h_cpu=None), _l4(1.0, h_gbps=0.0))
    assert t[0].status == "not met (no HAProxy figure)"
    assert t[1].status == "not met (no HAProxy figure)"


PORTS = Ports(
    backends=[19001, 19002, 19003],
    fulcrum_web=18080,
    fulcrum_bulk=18081,
    fulcrum_admin=17070,
    haproxy_web=18180,
    haproxy_bulk=18181,
    haproxy_bulk_splice=18182,
    nginx_web=18280,
)


def test_fulcrum_config_is_valid_for_lbnode():
    from lbnode.config import load_config_text

    cfg = load_config_text(configs.fulcrum_config(PORTS, state_dir="/tmp/x"))
    assert cfg.node.id == "bench"
    assert [(li.name, li.protocol, li.bind.port) for li in cfg.listeners] == [
        ("web", "http", 18080),
        ("bulk", "tcp", 18081),
    ]
    web, bulk = cfg.pools
    assert [b.address.port for b in web.backends] == [19001, 19002, 19003]
    assert web.algorithm == "round_robin"
    assert [b.address.port for b in bulk.backends] == [19001]


def test_proxy_configs_use_loopback_only(tmp_path):
    texts = [
        configs.haproxy_config(PORTS),
        configs.nginx_lb_config(tmp_path, PORTS, run_as_root=True),
        configs.nginx_backend_config(tmp_path, tmp_path / "www", PORTS, run_as_root=False),
        configs.fulcrum_config(PORTS),
    ]
    import re

    for text in texts:
        addrs = set(re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", text))
        assert addrs == {"127.0.0.1"}
    hap = texts[0]
    assert "nbthread 1" in hap and "http-reuse always" in hap and "option splice-auto" in hap
    lb = texts[1]
    assert (
        "worker_processes 1;" in lb and "proxy_http_version 1.1;" in lb and "keepalive 128;" in lb
    )
    assert "user root;" in lb and "user root;" not in texts[2]


def test_failure_line_picks_the_telling_line():
    trio_tb = [
        "| ExceptionGroup: Exceptions from Trio nursery (1 sub-exception)",
        "+-+---------------- 1 ----------------",
        "| Traceback (most recent call last):",
        '|   File "/work/main/lbnode/node.py", line 98, in run',
        "| ImportError: cannot import name 'TcpProxy' from 'lbnode.tcp.proxy'",
        "+------------------------------------",
    ]
    assert (
        failure_line(trio_tb)
        == "ImportError: cannot import name 'TcpProxy' from 'lbnode.tcp.proxy'"
    )
    hap = [
        "[NOTICE]   (4748) : path to executable is /usr/sbin/haproxy",
        "[ALERT]    (4748) : [haproxy.main()] Cannot raise FD limit to 50015, limit is 20000.",
    ]
    assert failure_line(hap) == "[haproxy.main()] Cannot raise FD limit to 50015, limit is 20000."
    assert failure_line(["starting", "listening"]) == "listening"
    assert failure_line([]) == ""
    assert len(failure_line(["ValueError: " + "x" * 500])) == 120


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1527 1 0 100 0 0 10 0
   1: 0100007F:4E21 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 21451 1 0 100 0 0 10 0
   2: 0100007F:4E21 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 21999 1 0 20 4 30 10 -1
   3: 0200007F:4E22 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 22000 1 0 100 0 0 10 0
"""


def test_parse_proc_net_tcp_listeners():
    # listening on 0.0.0.0:2024 and 127.0.0.1:20001; not the established one, not 127.0.0.2
    assert procstat.parse_proc_net_tcp_listeners(PROC_NET_TCP) == {2024: 1527, 20001: 21451}


def test_listening_ports_of_own_socket():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port in procstat.listening_ports_of([os.getpid()])


def test_optional_sections(tmp_path, monkeypatch):
    (tmp_path / "bench_opt_ok.py").write_text("def run():\n    return 'ok block'\n")
    (tmp_path / "bench_opt_ctx.py").write_text("def run(ctx):\n    return f'ctx {ctx}'\n")
    (tmp_path / "bench_opt_broken.py").write_text("import no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        report,
        "OPTIONAL_MODULES",
        [
            ("missing", "bench_opt_missing_xyz", "Missing"),
            ("ok", "bench_opt_ok", "OK"),
            ("ctx", "bench_opt_ctx", "Ctx"),
            ("broken", "bench_opt_broken", "Broken"),
        ],
    )
    secs = {s.name: s for s in report.optional_sections()}
    assert set(secs) == {"ok", "ctx", "broken"}
    assert secs["ok"].run("C") == "ok block"
    assert secs["ctx"].run("C") == "ctx C"
    assert secs["broken"].run("C").startswith("failed: import bench_opt_broken")


# The shared runner, and what the sections are built from; a section module (or one
# listed in report.OPTIONAL_MODULES) may import these, never the other way round.
RUNNER_MODULES = ("tables", "procstat", "wrk", "configs", "harness", "measure", "variants", "report", "reloadload")
SECTION_MODULES = ("throughput", "policies", "protections", "metrics", "cluster", "pick", "tail", "tls", "reload")


def test_runner_modules_import_no_section_module():
    import ast

    for name in RUNNER_MODULES:
        tree = ast.parse((ROOT / "bench" / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "bench":
                imported |= {f"bench.{a.name}" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert not imported & {f"bench.{s}" for s in SECTION_MODULES}, name


# --------------------------------------------------------------------------- policies / protections


def _load(text):
    from lbnode.config import load_config_text

    return load_config_text(text)


def test_every_policy_variant_config_is_valid_for_lbnode():
    from lbnode.model import ALGORITHMS

    runs = policies.policy_runs()
    seen = set()
    for _label, v in runs:
        cfg = _load(v.config(PORTS, state_dir="/tmp/x"))
        web = cfg.pool("web")
        seen.add(web.algorithm)
        assert [b.address.port for b in web.backends] == [19001, 19002, 19003]
        assert web.health is None and web.outlier is None
        assert all(b.max_inflight is None for b in web.backends)
        assert cfg.listeners[0].rate_limit is None and cfg.listeners[0].max_connections is None
        # the rest of the config is the main section's
        assert [(li.name, li.bind.port) for li in cfg.listeners] == [
            ("web", 18080),
            ("bulk", 18081),
        ]
        assert [b.address.port for b in cfg.pool("bulk").backends] == [19001]
        assert cfg.node.admin.port == 17070 and cfg.node.state_dir == "/tmp/x"
    assert seen == set(ALGORITHMS)  # every algorithm is measured


def test_policy_variant_details():
    by_name = {v.name: v for v in policies.POLICY_VARIANTS}
    wrr = _load(by_name["weighted_round_robin (weights 1,2,3)"].config(PORTS)).pool("web")
    assert [b.weight for b in wrr.backends] == [1, 2, 3]
    path = _load(by_name["consistent_hash, hash_key path"].config(PORTS)).pool("web")
    assert (path.algorithm, path.hash_key) == ("consistent_hash", "path")
    v = by_name["consistent_hash, hash_key header:X-User"]
    hdr = _load(v.config(PORTS)).pool("web")
    assert (hdr.algorithm, hdr.hash_key, v.client) == ("consistent_hash", "header:X-User", "x-user")
    for name, client in (
        ("cookie affinity, no cookie sent", ""),
        ("cookie affinity, cookie sent", "cookie"),
    ):
        pool = _load(by_name[name].config(PORTS)).pool("web")
        assert pool.algorithm == "round_robin" and by_name[name].client == client
        assert pool.affinity.mode == "cookie"
        assert (
            pool.affinity.key == bytes.fromhex(variants.AFFINITY_KEY)
            and len(pool.affinity.key) == 32
        )
    # without options: byte for byte the main section's config
    assert variants.BASELINE.config(PORTS, "/s") == configs.fulcrum_config(PORTS, state_dir="/s")


def test_protections_config():
    cfg = _load(protections.PROTECTED.config(PORTS))
    web, web_l = cfg.pool("web"), cfg.listeners[0]
    assert web.algorithm == "round_robin"
    assert (web.health.type, web.health.interval, web.health.path) == ("http", 1.0, "/")
    assert web.outlier is not None and web.outlier.consecutive_failures == 5
    assert [b.max_inflight for b in web.backends] == [1000, 1000, 1000]
    assert web_l.max_connections == 10000
    assert (web_l.rate_limit.rate, web_l.rate_limit.burst) == (1_000_000.0, 1_000_000)
    # the bulk side is untouched
    bulk, bulk_l = cfg.pool("bulk"), cfg.listeners[1]
    assert bulk.health is None and bulk.backends[0].max_inflight is None
    assert bulk_l.rate_limit is None and bulk_l.max_connections is None
    plain = _load(protections.PLAIN.config(PORTS))
    assert plain.pool("web").health is None and plain.listeners[0].rate_limit is None


def test_run_orders():
    runs = policies.policy_runs()
    assert runs[0] == ("round_robin (1st)", variants.BASELINE)
    assert runs[-1] == ("round_robin (2nd)", variants.BASELINE)
    assert [v for _, v in runs[1:-1]] == list(policies.POLICY_VARIANTS)
    assert len({label for label, _ in runs}) == len(runs)
    prot = protections.protection_runs()
    assert [v for _, v in prot] == [
        protections.PLAIN,
        protections.PROTECTED,
        protections.PROTECTED,
        protections.PLAIN,
    ]
    assert len({label for label, _ in prot}) == 4
    logged = accesslog.access_log_runs()
    assert [v for _, v in logged] == [accesslog.UNLOGGED, accesslog.LOGGED, accesslog.LOGGED, accesslog.UNLOGGED]
    assert len({label for label, _ in logged}) == 4


def test_access_log_variant_logs_the_http_listener_only():
    on = _load(accesslog.LOGGED.config(PORTS, "/s"))
    assert on.listeners[0].access_log is not None and on.listeners[0].access_log.path == "/s.access.log"
    assert on.listeners[1].access_log is None
    assert accesslog.UNLOGGED.config(PORTS, "/s") == configs.fulcrum_config(PORTS, state_dir="/s")


def test_core_percent():
    assert variants.core_percent(L7Row("a", rps=8000.0, cpu_us_per_req=100.0)) == pytest.approx(80.0)
    assert variants.core_percent(L7Row("direct", rps=8000.0)) is None
    assert variants.core_percent(L7Row("x", failed="boom")) is None


def test_mean_and_spread():
    rows = [L7Row("a", rps=100.0), L7Row("b", rps=120.0), L7Row("c", failed="x"), L7Row("d")]
    assert variants.mean_figure(rows, "rps") == pytest.approx(110.0)
    assert variants.mean_figure(rows, "cpu_us_per_req") is None
    assert variants.spread(rows) == pytest.approx(20 / 110)
    assert variants.spread(rows[:1]) is None


def _prow(name, rps, cpu=100.0, **kw):
    return L7Row(name, rps=rps, p50_ms=1.0, p99_ms=2.0, cpu_us_per_req=cpu, requests=10_000, **kw)


def test_policy_statuses_against_mean_of_baselines():
    base = ["rr (1st)", "rr (2nd)"]
    rows = [
        _prow("rr (1st)", 1100.0),
        _prow("ok", 950.0),  # exactly 0.95x of the mean 1000
        _prow("slow", 949.0),
        _prow("errors", 1000.0, errors=11),
        _prow("few errors", 1000.0, errors=10),
        L7Row("dead", failed="lbnode exited"),
        _prow("rr (2nd)", 900.0),
    ]
    assert policies.policy_statuses(rows, base) == [
        "baseline",
        "met",
        "not met",
        "not met (11 errors in 10000 requests)",
        "met",
        "not met (failed)",
        "baseline",
    ]
    # one failed baseline run: the other one is the baseline
    rows2 = [L7Row("rr (1st)", failed="x"), _prow("p", 960.0), _prow("rr (2nd)", 1000.0)]
    assert policies.policy_statuses(rows2, base) == ["baseline (failed)", "met", "baseline"]
    rows3 = [L7Row("rr (1st)", failed="x"), _prow("p", 960.0)]
    assert policies.policy_statuses(rows3, base)[1] == "not met (no round_robin figure)"


def test_render_policies():
    base = ["rr (1st)", "rr (2nd)"]
    rows = [
        _prow("rr (1st)", 1100.0, cpu=90.0),
        _prow("hash", 800.0, cpu=120.0, errors=2, note="2 timeout"),
        L7Row("dead", failed="boom"),
        _prow("rr (2nd)", 900.0, cpu=110.0),
    ]
    lines = render_policies_lines(rows, base)
    assert lines[0].split("|")[1].strip() == "Policy"
    assert "throughput vs round_robin" in lines[0]
    rr1 = cells(lines[2])
    assert rr1 == [
        "rr (1st)",
        "1,100",
        "1.00",
        "2.00",
        "90.0",
        "10",
        "0.900x",
        "1.100x",
        "0",
        "—",
        "baseline",
    ]
    hashed = cells(lines[3])
    assert hashed == [
        "hash",
        "800",
        "1.00",
        "2.00",
        "120.0",
        "10",
        "1.200x",
        "0.800x",
        "2 (2 timeout)",
        ">= 0.95x",
        "not met",
    ]
    dead = cells(lines[4])
    assert dead[1] == "failed: boom" and dead[-1] == "not met (failed)" and len(dead) == 11
    assert len({len(line) for line in lines}) == 1


def render_policies_lines(rows, base):
    return policies.render_policies(rows, base).splitlines()


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_compare_protections():
    without = [_prow("w1", 1000.0, cpu=100.0), _prow("w2", 1200.0, cpu=110.0)]
    with_ = [_prow("p1", 1050.0, cpu=110.0), _prow("p2", 1040.0, cpu=111.0)]
    c = protections.compare_protections(without, with_)
    assert [(x.figure, x.ratio, x.goal, x.status) for x in c] == [
        ("req/s", "0.950x", ">= 0.95x", "met"),
        ("CPU µs/req", "1.052x", "<= 1.05x", "not met"),
        ("p99 ms", "1.000x", "—", "information"),
    ]
    assert (c[0].without, c[0].with_) == ("1,100", "1,045")
    # errors in the runs with protections (a rate limit that triggered) fail the targets
    with_[1].errors = 21
    c = protections.compare_protections(without, [_prow("p", 1100.0, cpu=100.0)] + with_[1:])
    assert c[0].status == "not met (21 errors in 20000 requests)"
    # a side without figures
    c = protections.compare_protections(without, [L7Row("p", failed="x")])
    assert c[0].status == "not met (no figure with protections)" and c[0].ratio == "—"
    c = protections.compare_protections([], with_)
    assert c[1].status == "not met (no figure without protections)"


def test_render_runs_and_comparison():
    out = variants.render_runs([_prow("a", 1234.0), L7Row("b", failed="boom")]).splitlines()
    assert cells(out[2]) == ["a", "1,234", "1.00", "2.00", "100.0", "12", "0"]
    assert cells(out[3]) == ["b", "failed: boom", "—", "—", "—", "—", "—"]
    comp = protections.compare_protections([_prow("w", 1000.0)], [_prow("p", 990.0)])
    out = variants.render_comparison(comp).splitlines()
    assert cells(out[0]) == [
        "Figure",
        "without (mean)",
        "with (mean)",
        "with / without (median)",
        "by round",
        "goal",
        "status",
    ]
    assert cells(out[2]) == ["req/s", "1,000", "990", "0.990x", "0.990", ">= 0.95x", "met"]


def test_cookie_from_set_cookie():
    f = variants.cookie_from_set_cookie
    assert f(["other=1; Path=/", "FULCRUM=abc.def-_; Path=/; HttpOnly"]) == "FULCRUM=abc.def-_"
    assert f(["FULCRUMX=1", "FULCRUM=; Path=/"]) is None
    assert f([]) is None


def test_wrk_argv():
    o = harness.Options()
    plain = measure.wrk_argv(o, 18080, 4.0)
    assert plain == [
        "wrk",
        "-t1",
        "-c50",
        "-d4s",
        "--timeout",
        "5s",
        "--latency",
        "http://127.0.0.1:18080/small",
    ]
    x = measure.wrk_argv(o, 18080, 1.4, script=Path("/t/x.lua"), headers=["Cookie: FULCRUM=a"])
    assert x == plain[:3] + ["-d1s"] + plain[4:7] + [
        "-H",
        "Cookie: FULCRUM=a",
        "-s",
        "/t/x.lua",
        "http://127.0.0.1:18080/small",
    ]
    assert "request = function()" in variants.X_USER_LUA and '"X-User"' in variants.X_USER_LUA


def test_cli_sections_and_options():
    from bench import __main__ as cli

    names = [s.name for s in cli.sections()]
    assert names[:3] == ["l7", "policies", "protections"] and names[-1] == "targets"
    for only in ("l7", "policies", "protections", "accesslog", "l4", "cluster"):
        assert cli.parse_args(["--only", only], names).only == only
    with pytest.raises(SystemExit):
        cli.parse_args(["--only", "targets"], names)
    assert cli.parse_args(["--variant-duration", "6"], names).variant_duration == 6.0


# --------------------------------------------------------------------------- cluster section


def test_cluster_config_is_the_standalone_one_plus_cluster_and_control():
    url = "http://127.0.0.1:27400"
    plain = configs.fulcrum_config(PORTS, state_dir="/s")
    assert configs.fulcrum_config(PORTS, state_dir="/s", etcd=()) == plain
    text = configs.fulcrum_config(
        PORTS, node_id="n2", state_dir="/s", etcd=[url], etcd_prefix="/p/v1", control_port=27513
    )
    cfg = _load(text)
    assert cfg.node.id == "n2" and cfg.node.state_dir == "/s"
    assert (cfg.cluster.etcd, cfg.cluster.prefix) == ((url,), "/p/v1")
    assert cfg.control.insecure and cfg.control.bind.port == 27513
    assert cfg.control.bind.host == "127.0.0.1"
    assert [p.name for p in cfg.pools] == ["web", "bulk"]  # the pools seeded into etcd
    # the clustered variant: the standalone config plus [cluster], nothing else
    member = cluster.CLUSTERED.config(PORTS, "/s", etcd=[url])
    cfg = _load(member)
    assert cfg.cluster.etcd == (url,) and cfg.cluster.prefix == variants.CLUSTER_L7_PREFIX
    assert cfg.control is None
    extra = f'\n[cluster]\netcd = ["{url}"]\nprefix = "{variants.CLUSTER_L7_PREFIX}"\n'
    assert member.replace(extra, "") == plain
    assert cluster.STANDALONE.config(PORTS, "/s", etcd=[url]) == plain  # etcd ignored
    with pytest.raises(ValueError):
        cluster.CLUSTERED.config(PORTS, "/s")


def test_cluster_runs_are_abba():
    runs = cluster.cluster_runs()
    assert [v for _, v in runs] == [
        cluster.STANDALONE,
        cluster.CLUSTERED,
        cluster.CLUSTERED,
        cluster.STANDALONE,
    ]
    assert len({label for label, _ in runs}) == 4
    assert not cluster.STANDALONE.cluster and cluster.CLUSTERED.cluster


def test_compare_runs_names_its_sides():
    base = [_prow("s1", 1000.0, cpu=100.0), _prow("s2", 1000.0, cpu=100.0)]
    member = [_prow("c1", 960.0, cpu=104.0), _prow("c2", 940.0, cpu=106.0)]
    c = variants.compare_runs(base, member, 0.05, "standalone", "cluster member")
    assert [(x.figure, x.ratio, x.goal, x.status) for x in c] == [
        ("req/s", "0.950x", ">= 0.95x", "met"),
        ("CPU µs/req", "1.050x", "<= 1.05x", "met"),
        ("p99 ms", "1.000x", "—", "information"),
    ]
    c = variants.compare_runs(base, [L7Row("c", failed="x")], 0.05, "standalone", "cluster member")
    assert c[0].status == "not met (no figure cluster member)"
    out = variants.render_comparison(c, "standalone", "cluster member").splitlines()
    assert cells(out[0])[1:4] == [
        "standalone (mean)",
        "cluster member (mean)",
        "cluster member / standalone (median)",
    ]


def test_abba_rounds_label_each_run_once():
    runs = protections.protection_runs(3)
    assert [v for _, v in runs] == [protections.PLAIN, protections.PROTECTED, protections.PROTECTED,
                                    protections.PLAIN] * 3
    assert [label for label, _ in runs[-4:]] == [
        "without protections (5th)", "with protections (5th)", "with protections (6th)",
        "without protections (6th)"]
    assert len({label for label, _ in runs}) == 12
    assert [variants.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 103)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "103rd"]
    assert [scraped for _, scraped in metrics.metrics_runs(2)] == [False, True, True, False] * 2


def test_compare_runs_is_the_median_of_the_rounds_ratios():
    # three rounds of ABBA: CPU ratios 1.10, 1.02, 1.04 by round; the mean of all runs would
    # say 1.053 (the first round's outlier pulls it), the median of the rounds says 1.04
    base = [_prow(f"s{i}", 1000.0, cpu=c) for i, c in enumerate([100.0, 100.0, 100.0, 100.0, 90.0, 110.0])]
    other = [_prow(f"c{i}", 1000.0, cpu=c) for i, c in enumerate([110.0, 110.0, 102.0, 102.0, 104.0, 104.0])]
    c = variants.compare_runs(base, other, 0.05, "standalone", "cluster member")
    cpu = c[1]
    assert (cpu.ratio, cpu.by_round) == ("1.040x", "1.100 1.020 1.040")
    assert cpu.status == "met (goal inside the rounds' spread)"
    assert (cpu.without, cpu.with_) == ("100.0", "105.3")
    # every round above the goal: not met, and not said to be inside the spread
    other = [_prow(f"c{i}", 1000.0, cpu=108.0) for i in range(6)]
    c = variants.compare_runs(base, other, 0.05, "standalone", "cluster member")
    assert (c[1].ratio, c[1].status) == ("1.080x", "not met")
    # a round where one side failed gives no ratio; the others still count
    other[0] = L7Row("c0", failed="x")
    other[1] = L7Row("c1", failed="x")
    c = variants.compare_runs(base, other, 0.05, "standalone", "cluster member")
    assert c[1].by_round == "1.080 1.080"


def test_etcd_argv_is_one_member_on_loopback(tmp_path):
    argv = harness.etcd_argv("/usr/bin/etcd", tmp_path / "etcd", 27400, 27401)
    opts = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert argv[0] == "/usr/bin/etcd" and opts["--data-dir"] == str(tmp_path / "etcd")
    assert (
        opts["--listen-client-urls"] == opts["--advertise-client-urls"] == "http://127.0.0.1:27400"
    )
    assert opts["--listen-peer-urls"] == "http://127.0.0.1:27401"
    assert opts["--initial-cluster"] == "bench=http://127.0.0.1:27401"
    assert opts["--initial-cluster-state"] == "new"


def test_ports_of_lists_every_port():
    assert sorted(harness.ports_of(PORTS)) == sorted(
        [19001, 19002, 19003, 18080, 18081, 17070, 18180, 18181, 18182, 18280]
    )


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(50, 0, -1)]  # 50 samples, unsorted
    assert cluster.percentile(values, 99) == 50.0  # the slowest of 50
    assert cluster.percentile(values, 50) == 25.0
    assert cluster.percentile(values, 0) == 1.0
    assert cluster.percentile(range(1, 201), 99) == 198
    assert cluster.percentile([3.0], 99) == 3.0
    assert cluster.percentile([], 50) is None


def test_status_weight():
    doc = {
        "node": "n1",
        "pools": [
            {"name": "bulk", "backends": [{"id": "127.0.0.1:1", "weight": 9}]},
            {
                "name": "web",
                "backends": [{"id": "a", "weight": 1}, {"id": "127.0.0.1:1", "weight": 3}],
            },
        ],
    }
    assert cluster.status_weight(doc, "web", "127.0.0.1:1") == 3
    assert cluster.status_weight(doc, "bulk", "127.0.0.1:1") == 9
    assert cluster.status_weight(doc, "web", "b") is None
    assert cluster.status_weight(doc, "api", "a") is None
    assert cluster.status_weight(None, "web", "a") is None
    assert (
        cluster.status_weight({"pools": [{"name": "web", "backends": [{"id": "a"}]}]}, "web", "a")
        is None
    )


def test_render_propagation_and_its_target():
    p = cluster.Propagation(3)
    p.write_s = [0.004] * 50
    p.propagation_s = [0.002] * 49 + [0.120]
    p.total_s = [0.006] * 49 + [0.6]
    out = cluster.render_propagation(p).splitlines()
    assert cells(out[0]) == ["Figure", "changes", "p50 ms", "p99 ms", "max ms", "goal", "status"]
    assert cells(out[2])[1:] == ["50/50", "4.0", "4.0", "4.0", "—", "information"]
    assert cells(out[3])[1:] == ["50/50", "2.0", "120.0", "120.0", "p99 < 500 ms", "met"]
    assert cells(out[4])[1:] == ["50/50", "6.0", "600.0", "600.0", "p99 < 500 ms", "not met"]
    assert "all 3 nodes" in out[3]
    p.failed = ["change 7: 1 nodes not showing it after 5 s"]
    out = cluster.render_propagation(p).splitlines()
    assert cells(out[3])[1] == "50/51" and cells(out[3])[-1] == "not met (1 of 51 changes failed)"
    empty = cluster.render_propagation(cluster.Propagation(3)).splitlines()
    assert cells(empty[3])[-1] == "not met (no change measured)"


def test_cluster_section_is_skipped_without_etcd(monkeypatch, tmp_path):
    monkeypatch.setattr(cluster, "ETCD", str(tmp_path / "no-etcd"))
    out = cluster.section_cluster(None)  # type: ignore[arg-type]  # touches nothing else
    assert out.startswith("skipped: etcd is not installed (") and "etcd-server" in out


def test_metrics_section_runs_abba_and_its_scraper_gets_metrics_from_a_real_server() -> None:
    import http.server
    import threading

    from bench.metrics import Scraper, metrics_runs

    assert [scraped for _, scraped in metrics_runs()] == [False, True, True, False]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            body = b"# HELP x y\n# TYPE x gauge\nx 1\n"
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Scraper(server.server_address[1], interval=0.05) as scraper:
            deadline = time.monotonic() + 10  # 3 scrapes take 0.15 s; the margin is for busy cores
            while scraper.scrapes < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert scraper.scrapes >= 3 and scraper.failures == 0 and scraper.last_bytes == 30
    finally:
        server.shutdown()
        server.server_close()


def test_route_propagation_renders_its_own_figures_and_its_probe_routes_are_valid():
    from lbnode.model import route_from_dict

    p = cluster.Propagation(3, kind="route")
    p.write_s, p.propagation_s, p.total_s = [0.004] * 50, [0.002] * 50, [0.006] * 50
    out = cluster.render_propagation(p).splitlines()
    assert cells(out[2])[0].startswith("PutRoute through node 1's control API")
    assert cells(out[3])[0] == "write returned -> all 3 nodes route requests by it"
    assert cells(out[3])[-1] == "met"
    # both versions of the probe route pass the node's own validation; only the sticky one sets the cookie
    sticky = route_from_dict({"name": cluster.PROBE_ROUTE, **json.loads(cluster.probe_route_spec(True))})
    plain = route_from_dict({"name": cluster.PROBE_ROUTE, **json.loads(cluster.probe_route_spec(False))})
    assert sticky.split is not None and f"{sticky.split.cookie}=" == cluster.PROBE_COOKIE
    assert plain.split is None and plain.pool == "web"
