"""`coel plan` end to end (in process): every strategy on a synthetic profile and a small
topology, the bundled topologies, re-plan from a plan file, and errors as one clear line."""
from __future__ import annotations

import json

import pytest

from coel.cli import main
from coel_model.config import MoEConfig
from controller.plan import Plan
from controller.profile import synthetic_profile

STRATEGIES = ["coel", "uniform", "pipeline", "offload", "random"]
CFG = MoEConfig(vocab_size=512, d_model=96, n_layers=3, n_heads=4, n_kv_heads=4, n_experts=8, top_k=2,
                expert_hidden=192)


@pytest.fixture()
def files(tmp_path):
    prof = synthetic_profile(CFG, seed=1, skew=1.0)
    (tmp_path / "profile.json").write_text(json.dumps(prof.to_dict()))
    (tmp_path / "model.json").write_text(json.dumps({
        "format": "coel-model-config", "name": "tiny", "model_config": CFG.to_dict(),
        "backbone_params": None, "synthetic": {"skew": 1.0, "seed": 1}}))
    mb = 1 << 20
    bb = prof.backbone_bytes / mb
    (tmp_path / "cluster.json").write_text(json.dumps({
        "name": "three", "nodes": ["hub"],
        "servers": [{"name": "a", "memory_mb": bb * 1.3, "cpu_share": 0.3},
                    {"name": "b", "memory_mb": bb * 1.2, "cpu_share": 0.2},
                    {"name": "c", "memory_mb": bb * 1.5, "cpu_share": 0.4}],
        "links": [{"a": "a", "b": "hub", "bw_mbit": 100, "delay_ms": 1},
                  {"a": "b", "b": "hub", "bw_mbit": 50, "delay_ms": 3},
                  {"a": "c", "b": "hub", "bw_mbit": 200, "delay_ms": 2}],
        "requirements": {"classes": [{"name": "u", "entry": "a", "token_slo_ms": 500}]}}))
    return tmp_path


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plan_every_strategy_writes_the_documented_json(files, strategy, capsys):
    out = files / f"plan-{strategy}.json"
    rc = main(["plan", "--topology", str(files / "cluster.json"), "--model-config", str(files / "model.json"),
               "--profile", str(files / "profile.json"), "--strategy", strategy, "--json-out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    for key in ("bits", "placement", "compression", "predicted", "reasons"):
        assert key in doc
    assert len(doc["bits"]) == CFG.n_layers and len(doc["bits"][0]) == CFG.n_experts
    assert all(len(reps) >= 1 for row in doc["placement"] for reps in row)
    assert doc["predicted"]["u"]["token_ms"] > 0
    assert doc["strategy"] == strategy and doc["reasons"]
    Plan.from_dict(doc)  # loads back
    printed = capsys.readouterr().out
    assert "request classes" in printed and "servers" in printed


@pytest.mark.parametrize("topology", ["edge-star-5", "metro-ring-8", "edge-cloud-3tier", "single-server"])
def test_plan_on_bundled_topologies(files, topology, tmp_path):
    out = tmp_path / "p.json"
    rc = main(["plan", "--topology", topology, "--model-config", str(files / "model.json"), "--memory-scale",
               "auto", "--json", "--json-out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc["predicted"]) - {"_overall"}  # one class per client of the topology


def test_replan_from_a_plan_file_after_dropping_a_server(files, tmp_path, capsys):
    first = tmp_path / "first.json"
    assert main(["plan", "--topology", str(files / "cluster.json"), "--model-config", str(files / "model.json"),
                 "--profile", str(files / "profile.json"), "--json-out", str(first)]) == 0
    doc = json.loads(first.read_text())
    used = {s for row in doc["placement"] for reps in row for s in reps} - {"a"}
    if not used:
        pytest.skip("everything on the entry server")
    lost = sorted(used)[0]
    second = tmp_path / "second.json"
    assert main(["plan", "--topology", str(files / "cluster.json"), "--model-config", str(files / "model.json"),
                 "--profile", str(files / "profile.json"), "--current", str(first), "--drop-server", lost,
                 "--json-out", str(second)]) == 0
    doc2 = json.loads(second.read_text())
    assert all(lost not in reps for row in doc2["placement"] for reps in row)
    assert any(a["kind"] == "load_shard" for a in doc2["actions"])
    # re-plan with nothing changed: no actions
    third = tmp_path / "third.json"
    assert main(["plan", "--topology", str(files / "cluster.json"), "--model-config", str(files / "model.json"),
                 "--profile", str(files / "profile.json"), "--current", str(first), "--json-out", str(third)]) == 0
    assert json.loads(third.read_text())["actions"] == []


def test_infeasible_and_bad_input_are_one_line_errors(files, tmp_path, capsys):
    tiny = json.loads((files / "cluster.json").read_text())
    for s in tiny["servers"]:
        s["memory_mb"] = 0.01
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    rc = main(["plan", "--topology", str(tmp_path / "tiny.json"), "--model-config", str(files / "model.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "MB" in err and "Traceback" not in err
    rc = main(["plan", "--topology", str(files / "cluster.json"), "--model-config", str(files / "model.json"),
               "--strategy", "magic"])
    err = capsys.readouterr().err
    assert rc == 2 and all(n in err for n in STRATEGIES)
    rc = main(["plan", "--topology", str(files / "cluster.json"), "--model-config", "no-such-model"])
    err = capsys.readouterr().err
    assert rc == 2 and "deepseek-v3" in err  # lists the bundled configs


BUNDLED = __import__("pathlib").Path(__file__).resolve().parents[2] / "models" / "tiny-moe"


@pytest.mark.skipif(not (BUNDLED / "profile.json").exists(), reason="models/tiny-moe/profile.json not committed yet")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plan_bundled_model_on_the_default_topology(strategy, tmp_path):
    out = tmp_path / "p.json"
    rc = main(["plan", "--model", str(BUNDLED), "--topology", "edge-star-5", "--strategy", strategy,
               "--json-out", str(out), "--json"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert all(len(reps) >= 1 for row in doc["placement"] for reps in row)


def test_plan_from_a_checkpoint_without_profile_uses_its_config(tmp_path, capsys):
    import torch
    from coel_model.checkpoint import save_model
    from coel_model.model import MoEModel, init_weights
    torch.manual_seed(0)
    model = MoEModel(CFG)
    init_weights(model, 0)
    save_model(model, tmp_path / "ckpt", dtype=torch.float16)
    out = tmp_path / "p.json"
    rc = main(["plan", "--model", str(tmp_path / "ckpt"), "--topology", "edge-star-5", "--json-out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert len(doc["bits"]) == CFG.n_layers
    assert any("synthetic" in r for r in doc["reasons"])
