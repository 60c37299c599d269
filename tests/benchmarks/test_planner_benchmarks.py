"""The planner benchmarks run end to end on small settings and write the documented keys."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_planner_scale_small(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert _load("planner_scale").main(["--config", "mixtral-8x7b", "--servers", "8", "--repeat", "1",
                                        "--json", "--json-out", str(out)]) == 0
    doc = json.loads(out.read_text())
    for key in ("full_plan_s", "replan_s", "replan_bytes_moved", "lost_server_bytes"):
        assert key in doc
    assert doc["lost_server_bytes"] > 0 and doc["replan_bytes_moved"] <= 2 * doc["lost_server_bytes"]


def test_strategies_small(tmp_path, capsys):
    out = tmp_path / "strategies.json"
    assert _load("strategies").main(["--models", "tiny-moe", "--topologies", "edge-star-5",
                                     "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["strategy"] for r in rows} == {"coel", "uniform", "pipeline", "offload", "random"}
    assert all(r["token_ms_weighted"] > 0 for r in rows if "error" not in r)
