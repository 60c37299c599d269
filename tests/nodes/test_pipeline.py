"""Pipeline stages across agent processes on loopback (CURVE on): a 3-stage plan through
`serve_local` generates the greedy tokens of `coel generate`, and a stage server killed
mid-request is routed around and the request replayed to the same tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coel_model.checkpoint import load_model
from coel_model.generate import generate
from nodes import protocol as P

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "models" / "tiny-moe"
PROMPT = [47, 78, 303, 1036, 268, 272, 706, 12]


@pytest.fixture(scope="module")
def model():
    if not (BUNDLED / "config.json").exists():
        pytest.skip("models/tiny-moe not present")
    torch.set_num_threads(1)
    return load_model(BUNDLED)


def _plan(path: Path, n_layers: int, n_experts: int) -> Path:
    """Stages e3[0:1], e1[1:2], e5[2:4] (the demo's pipeline shape); experts on all three."""
    servers = ["e1", "e3", "e5"]
    placement = [[[servers[(l + e) % 3]] for e in range(n_experts)] for l in range(n_layers)]
    path.write_text(json.dumps({
        "format": "coel-plan", "version": 1, "strategy": "pipeline", "mode": "pipeline", "model": "tiny",
        "bits": [[16] * n_experts for _ in range(n_layers)], "placement": placement,
        "backbone": {"e3": [{"server": "e3", "layers": [0, 1]}, {"server": "e1", "layers": [1, 2]},
                            {"server": "e5", "layers": [2, n_layers]}]}}))
    return path


def test_serve_local_three_stage_plan_equals_coel_generate(model, tmp_path):
    from nodes.local import ServeLocalConfig, serve_local
    cfg = model.cfg
    want = generate(model, PROMPT, 12)
    trace = tmp_path / "serve.jsonl"
    got = serve_local(ServeLocalConfig(str(BUNDLED), "", 12, n_agents=3, prompt_ids=tuple(PROMPT),
                                       plan_path=str(_plan(tmp_path / "plan.json", cfg.n_layers, cfg.n_experts)),
                                       trace_out=str(trace)))
    assert got["tokens"] == want
    assert got["stage_steps"] == 12 and got["replays"] == 0 and len(got["stages"]) == 3
    # each stage agent accounts its backbone slice; the first holds the embedding, the last the lm_head
    slices = sorted(s["stage"] + [s["backbone_bytes"]] for s in got["stage_stats"].values())
    assert [s[:2] for s in slices] == [[0, 1], [1, 2], [2, cfg.n_layers]]
    assert all(s[2] > 0 for s in slices) and slices[0][2] > slices[1][2]
    spans = [json.loads(line) for line in trace.read_text().splitlines()]
    assert sum(s["span"] == "stage_wait" for s in spans) == 12  # one wait per step, not one per layer


def test_a_killed_stage_server_is_routed_around_and_the_request_replayed(model, tmp_path):
    """Stage 1 runs on agent 1 with a warm standby slice on agent 3; agent 1 is killed after the
    third token: the step times out, the route switches to agent 3, stage 0 answers STAGE_CACHE
    (its cache moved past the failed step) and the request is replayed from the prompt."""
    import zmq

    from nodes.local import LocalCluster, deploy_experts, deploy_stages
    from nodes.pipeline import RemoteStageError, StageClient
    from nodes.security import make_keys, start_authenticator
    from nodes.stage import Pipeline
    cfg = model.cfg
    want = generate(model, PROMPT, 10)
    keys_dir = str(make_keys(tmp_path / "keys"))
    with LocalCluster(4, 64.0, keys_dir) as lc:
        a0, a1, a2, a3 = lc.endpoints
        placement = {(l, e): [(a0, a2)[e % 2]] for l in range(cfg.n_layers) for e in range(cfg.n_experts)}
        deploy_experts(model, lc, placement)
        deploy_stages(model, lc, [(a0, 0, 1), (a1, 1, 2), (a2, 2, cfg.n_layers), (a3, 1, 2)], placement)
        ctx = zmq.Context()
        auth = start_authenticator(ctx, lc.keys)
        client = StageClient([(a0, 0, 1), (a1, 1, 2), (a2, 2, cfg.n_layers)], lc.keys, ctx, "127.0.0.1",
                             timeout_s=1.0)
        pipe = Pipeline(cfg, client.send)
        failures: list[str] = []

        def killer(step: int, tok: int) -> None:
            if step == 2:
                lc.kill(1)

        def reroute(run):
            try:
                return run()
            except RemoteStageError as exc:  # what the entry's step hook does once a new plan arrives
                failures.append(str(exc))
                client.set_route([(a0, 0, 1), (a3, 1, 2), (a2, 2, cfg.n_layers)])
                return run()
        try:
            got = generate(pipe, PROMPT, 10, on_token=killer, step=reroute)
            status = [c.call(P.MsgType.STATUS, timeout_s=5.0).body for i, c in enumerate(lc.clients) if i != 1]
        finally:
            client.close()
            auth.stop()
            ctx.term()
    assert got == want
    assert len(failures) == 1 and "no result within" in failures[0] and pipe.replays == 1
    standby = [s["stats"]["stage"] for s in status if s["endpoint"] == a3][0]
    assert standby["steps"] >= 1 and standby["stage"] == [1, 2]
