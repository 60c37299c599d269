"""`coel compare` in Mininet on a short scenario: two strategies, same traffic and fault, one
folder with compare.json (the Done-means fields), the table and the three plots."""
from __future__ import annotations

import io
import json

import pytest

from tests.testbed.run_helpers import assert_clean, mininet_test, scenario_text, setup_dir

pytestmark = pytest.mark.timeout(240)


@mininet_test
def test_compare_two_strategies_on_a_short_scenario(tmp_path):
    from testbed.compare import compare_table, run_compare
    from testbed.runner import RunOptions
    setup = setup_dir(tmp_path)
    sc = tmp_path / "tb-compare.yaml"
    sc.write_text(scenario_text("tb-compare", setup, ["{at_s: 4, kind: bw, link: [s2, hub], bw_mbit: 5}"],
                                duration_s=8, drain_s=10))
    log = io.StringIO()
    opt = RunOptions(out_dir=setup["out"], live_progress=False, serving_timeout_s=150)
    doc = run_compare(str(sc), ["coel", "uniform"], 1, opt, tmp_path / "cmp", stream=log)
    text = log.getvalue()
    assert "[compare 1/2]" in text and "[compare 2/2]" in text, text[-2000:]
    folder = tmp_path / "cmp" / doc["folder"].split("/")[-1]
    on_disk = json.loads((folder / "compare.json").read_text())
    assert set(on_disk["strategies"]) == {"coel", "uniform"}
    for name, s in on_disk["strategies"].items():
        run = s["runs"][0]
        assert run["outcome"] == "completed", (name, run.get("error"), text[-3000:])
        assert s["tpot_ms"]["before"]["p50"] > 0 and s["ttft_ms"]["before"]["p50"] > 0, s["tpot_ms"]
        assert "during" in s["tpot_ms"] and s["tpot_ms"]["all"]["p95"] >= s["tpot_ms"]["all"]["p50"]
        assert s["lost"] == 0
        assert s["predicted_tpot_ms"] > 0
        assert 0 < s["max_memory_ratio"] <= 1.0, s["memory_per_server"]
        assert s["quality"]["perplexity"] > 1 and 0 < s["quality"]["top1_agreement"] <= 1
        assert s["bytes_on_wire"] > 0
        assert_clean(__import__("pathlib").Path(run["run_dir"]))
    assert on_disk["faults"] and on_disk["faults"][0]["kind"] == "bw"
    for png in ("tpot_cdf.png", "latency_over_time.png", "predicted_vs_measured.png"):
        assert (folder / png).stat().st_size > 1000
    assert (folder / "compare.txt").read_text().strip() == compare_table(on_disk)
