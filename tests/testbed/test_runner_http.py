"""`coel run` with HTTP clients: the user host replays a request trace through the entry's
OpenAI-compatible API with the `openai` package; the run loses nothing, its report carries the same
latency fields as a native-client run, and while traffic flows `coel forward`'s relays reach the
entry's API and /metrics and the controller's /metrics from the root namespace. Plus the trace-file reader, the scenario's workload fields and the
controller's metrics (no root)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.testbed.run_helpers import assert_clean, mininet_test, scenario_text, setup_dir

pytestmark = pytest.mark.timeout(200)


@pytest.mark.unit
def test_trace_csv_columns_times_and_errors(tmp_path):
    from coel_model.errors import ConfigError
    from nodes.workload import read_trace_csv
    p = tmp_path / "azure.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,374,44\n"
                 "2023-11-16 18:15:47.0,2000,20\n2023-11-16 18:15:58.0,30,10\n")
    got = read_trace_csv(p, duration_s=10, max_seq_len=1024)
    assert [(a.t_s, a.prompt_tokens, a.max_new_tokens) for a in got] == [(0.0, 374, 44), (0.5, 1004, 20)]
    p.write_text("arrival_s,prompt_tokens,output_tokens\n1.5,8,4\n2.0,9,5\n")
    assert [a.t_s for a in read_trace_csv(p, 60)] == [0.0, 0.5]
    for text, msg in [("a,b,c\n1,2,3\n", "no arrival time column"), ("time,input_tokens,output_tokens\n1,x,2\n",
                                                                        "must be numbers"),
                      ("time,input_tokens,output_tokens\n2,1,2\n1,1,2\n", "sort the trace"),
                      ("time,input_tokens,output_tokens\n1,0,2\n", ">= 1")]:
        p.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            read_trace_csv(p, 60)


@pytest.mark.unit
def test_scenario_workload_api_and_trace_fields():
    from coel_model.errors import ConfigError
    from testbed.scenario import load_scenario, parse_scenario
    sc = load_scenario("http-api")
    assert sc.workload.api == "openai"
    assert parse_scenario("name: x\nworkload: {trace_csv: t.csv}\n").workload.trace_csv == "t.csv"
    with pytest.raises(ConfigError, match="must be one of native, openai"):
        parse_scenario("name: x\nworkload: {api: grpc}\n", "x.yaml")


@mininet_test
def test_http_clients_run_replays_a_trace_with_no_loss(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from testbed.runner import RunOptions, run_scenario
    from testbed.scenario import parse_scenario
    setup = setup_dir(tmp_path)
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" +
                     "".join(f"{0.8 * i:.1f},{12 + i},{6 + i % 4}\n" for i in range(10)))
    text = scenario_text("tb-http", setup, [], duration_s=9, drain_s=15) + \
        f"workload: {{api: openai, trace_csv: {trace}}}\n"
    scraped: dict = {}

    def scrape_during_traffic() -> None:  # through `coel forward`'s relays, from the root namespace
        import urllib.request

        import openai

        from nodes.local import free_port
        from testbed.forward import Forwarder, prometheus_config, run_targets
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            pids = list(Path(setup["out"]).glob("*/runner.pid"))
            if pids:
                time.sleep(4.0)
                try:
                    base = free_port()
                    targets = run_targets(pids[0].parent, base)
                    fwd = Forwarder(targets)
                    try:
                        for t in targets:
                            url = f"http://127.0.0.1:{t.local_port}/metrics"
                            scraped[t.host] = urllib.request.urlopen(url, timeout=10).read().decode()
                        entry = next(t for t in targets if t.role == "entry")
                        client = openai.OpenAI(base_url=f"http://127.0.0.1:{entry.local_port}/v1", api_key="x",
                                               max_retries=0, timeout=30)
                        r = client.completions.create(model=client.models.list().data[0].id, prompt="def ",
                                                      max_tokens=3, temperature=0)
                        scraped["completion_tokens"] = r.usage.completion_tokens
                        scraped["config"] = prometheus_config("x", targets)
                    finally:
                        fwd.stop()
                except Exception as exc:  # reported by the asserts below
                    scraped["error"] = repr(exc)
                return
            time.sleep(0.2)

    th = threading.Thread(target=scrape_during_traffic, daemon=True)
    th.start()
    sc = parse_scenario(text, "tb-http.yaml")
    res = run_scenario(sc, RunOptions(out_dir=setup["out"], live_progress=False, serving_timeout_s=120))
    th.join(10)
    run_dir = res.run_dir
    try:
        assert res.outcome == "completed" and res.error is None, (res.outcome, res.error)
        s = json.loads((run_dir / "summary.json").read_text())
        assert s["requests"] == 10 and s["lost_requests"] == 0, s
        assert s["ttft_ms"]["p50"] > 0 and s["tpot_ms"]["p50"] > 0, s
        header = (run_dir / "summary.csv").read_text().splitlines()[0].split(",")
        assert {"ttft_ms", "tpot_ms", "ok"} <= set(header)
        spans = [json.loads(l) for l in (run_dir / "raw" / "u1-client.jsonl").read_text().splitlines()]
        reqs = [r for r in spans if r.get("span") == "request"]
        assert len(reqs) == 10 and all(r["attrs"]["api"] == "openai" and r["attrs"]["ok"] for r in reqs)
        assert sorted(r["attrs"]["prompt_tokens"] for r in reqs) == list(range(12, 22))
        # the extra completion sent through the relay above is served too (api "http" on the entry)
        assert "error" not in scraped and {"s1", "ctl"} <= set(scraped), scraped
        assert scraped["completion_tokens"] == 3 and "job_name: coel-entry" in scraped["config"]
        m = {(x.name, tuple(sorted(x.labels.items()))): x.value
             for who in ("s1", "ctl") for fam in text_string_to_metric_families(scraped[who]) for x in fam.samples}
        assert m[("coel_generation_tokens_total", (("api", "http"),))] > 0
        assert m[("coel_placement_version", ())] >= 1
        assert m[("coel_controller_state", (("state", "serving"),))] == 1
        assert m[("coel_peer_up", (("name", "s2"), ("role", "agent")))] == 1
    finally:
        assert_clean(run_dir)


@pytest.mark.unit
def test_controller_metrics_render_status_and_redeployments():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from controller.metrics import ControllerCollector
    status = {"state": "serving", "placement_version": 3, "replans": 4,
              "agents": {"e2": {"alive": True, "rtt_ms": 2.5, "baseline_rtt_ms": 2.0, "goodput_mbit": 80.0,
                                "baseline_goodput_mbit": 95.0, "memory_used_bytes": 1000, "shards": 8},
                         "e3": {"alive": False}},
              "entries": {"e4": {"alive": True, "served": 12, "failed": 0}}}
    recs = [{"trigger": "agent_lost", "detect_s": 0.7, "replan_s": 0.05, "migrate_s": 1.2, "bytes_moved": 4096},
            {"trigger": "link_degraded", "detect_s": None, "replan_s": 0.04, "migrate_s": 0.3, "bytes_moved": 0}]
    reg = CollectorRegistry()
    reg.register(ControllerCollector(lambda: status, lambda: recs))
    m = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for fam in text_string_to_metric_families(generate_latest(reg).decode()) for s in fam.samples}
    assert m[("coel_controller_state", (("state", "serving"),))] == 1
    assert m[("coel_controller_placement_version", ())] == 3
    assert m[("coel_controller_redeployments_total", (("trigger", "agent_lost"),))] == 1
    assert m[("coel_controller_migrated_bytes_total", ())] == 4096
    assert m[("coel_controller_detection_seconds_count", ())] == 1
    assert m[("coel_controller_migration_seconds_bucket", (("le", "0.5"),))] == 1
    assert m[("coel_probe_rtt_seconds", (("agent", "e2"),))] == pytest.approx(0.0025)
    assert m[("coel_probe_goodput_bits_per_second", (("agent", "e2"),))] == 80e6
    assert m[("coel_peer_up", (("name", "e3"), ("role", "agent")))] == 0
    assert m[("coel_entry_served_total", (("entry", "e4"),))] == 12


@pytest.mark.unit
def test_dashboard_and_scrape_configs_name_only_metrics_we_export():
    import re

    import yaml
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from controller.metrics import ControllerCollector
    from nodes.metrics import EntryMetrics
    from testbed.forward import Target, prometheus_config
    repo = Path(__file__).resolve().parents[2]
    stats = {"peers": {"tcp://a:1": {"calls": 1, "bytes_sent": 2, "bytes_received": 3, "rtt_ms": 1.0}},
             "failovers": 0, "step_retries": 0, "placement_updates": 0, "placement_version": 1, "blocked": 0, "queued": 0,
             "healthy": True}
    em = EntryMetrics("e3", lambda: stats)
    sink = type("S", (), {"token": lambda *a: None, "done": lambda *a: None, "error": lambda *a: None,
                          "cancelled": lambda self: False})()
    ms = em.wrap(sink, "http", time.monotonic_ns())
    ms.token(0, 1), ms.token(1, 2), ms.done({"prompt_tokens": 3})
    reg = CollectorRegistry()
    reg.register(ControllerCollector(lambda: {"state": "serving", "agents": {"e2": {
        "alive": True, "rtt_ms": 1, "baseline_rtt_ms": 1, "goodput_mbit": 1, "baseline_goodput_mbit": 1,
        "memory_used_bytes": 1, "memory_budget_bytes": 2, "cpu_percent": 3, "shards": 1}}},
        lambda: [{"trigger": "agent_lost", "detect_s": 1, "replan_s": 1, "migrate_s": 1, "bytes_moved": 1}]))
    exported = {s.name for text in (em.exposition().decode(), generate_latest(reg).decode())
                for fam in text_string_to_metric_families(text) for s in fam.samples}
    dash = json.loads((repo / "docs" / "monitoring" / "grafana-coel.json").read_text())
    used = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"coel_[a-z_]+", t["expr"])}
    assert used and used <= exported, used - exported
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for text in ((repo / "docs" / "monitoring" / "prometheus.yml").read_text(),
                 prometheus_config("r1", [Target("ctl", "controller", "10.0.0.9", 8000, 1, 9000),
                                          Target("e3", "entry", "10.0.0.3", 8000, 2, 9001)])):
        cfg = yaml.safe_load(text)
        jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
        assert set(jobs) == {"coel-controller", "coel-entry"}
        assert all(":" in t for j in jobs.values() for sc in j["static_configs"] for t in sc["targets"])


@pytest.mark.unit
def test_forward_targets_come_from_the_run_folder(tmp_path):
    from coel_model.errors import CoelError
    from testbed.forward import run_targets
    with pytest.raises(CoelError, match="not a run folder"):
        run_targets(tmp_path, 9000)
    (tmp_path / "meta.json").write_text(json.dumps({"entries": ["e4", "e3"]}))
    with pytest.raises(CoelError, match="no HTTP endpoints yet"):
        run_targets(tmp_path, 9000)
    (tmp_path / "meta.json").write_text(json.dumps({
        "entries": ["e4", "e3"], "shell_pids": {"ctl": 11, "e3": 13, "e4": 14},
        "metrics": {"e4": "http://10.0.0.4:8000/metrics", "ctl": "http://10.0.0.9:8000/metrics",
                    "e3": "http://10.0.0.3:8000/metrics"}}))
    got = [(t.host, t.role, t.ip, t.port, t.pid, t.local_port) for t in run_targets(tmp_path, 9000)]
    assert got == [("ctl", "controller", "10.0.0.9", 8000, 11, 9000), ("e3", "entry", "10.0.0.3", 8000, 13, 9001),
                   ("e4", "entry", "10.0.0.4", 8000, 14, 9002)]
