"""`coel serve-local` equals `coel generate` (compression off); agreement with compression on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coel_model.checkpoint import save_model
from coel_model.config import MoEConfig
from coel_model.model import MoEModel, init_weights
from coel_model.tokenizer import train_tokenizer
from nodes.coordinator import Coordinator
from nodes.local import LocalCluster, deploy_experts, round_robin_placement

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TEXT = ["the quick brown fox jumps over the lazy dog", "edge servers hold quantized experts",
        "mixture of experts routes each token to two experts", "tokens travel between servers"] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-serve")
    tok = train_tokenizer(TEXT, vocab_size=300, min_frequency=1)
    cfg = MoEConfig(vocab_size=tok.vocab_size, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=6,
                    top_k=2, expert_hidden=64, max_seq_len=128)
    m = MoEModel(cfg)
    init_weights(m, 11)
    save_model(m, d, dtype=torch.float16)
    tok.save(d)
    return d


def _coel(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "coel", *args], capture_output=True, text=True,
                       timeout=120, cwd=str(ROOT), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_serve_local_tokens_equal_coel_generate(model_dir):
    common = ["--model", str(model_dir), "--prompt", "the quick brown fox", "--max-new-tokens", "10", "--json"]
    ref = _coel("generate", *common)
    got = _coel("serve-local", "--agents", "3", *common)
    assert got["tokens"] == ref["tokens"] and got["text"] == ref["text"]
    assert got["bytes_on_wire"] > 0 and got["ms_per_token"] > 0 and got["secure"] is True
    assert got["expert_calls"] > 0 and got["failovers"] == 0


@torch.inference_mode()
def test_agreement_with_compression_on(model_dir):
    from coel_model.checkpoint import load_model
    from nodes.compression import CompressionSettings
    model = load_model(model_dir)
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, 64), generator=g)
    ref = model(tokens)[0].argmax(-1)
    results = {}
    with LocalCluster(2, 4.0) as lc:
        placement = round_robin_placement(cfg.n_layers, cfg.n_experts, lc.endpoints)
        deploy_experts(model, lc, placement)
        for spec in ("none", "act=fp16", "act=int8", "act=int8,beta=0.9,fuse=0.3"):
            s = CompressionSettings.parse(spec)
            coord = Coordinator(model, placement, compression={ep: s for ep in lc.endpoints})
            try:
                top1 = model(tokens, executor=coord, observer=coord.observer)[0].argmax(-1)
            finally:
                coord.close()
            results[spec] = ((top1 == ref).float().mean().item(), coord.bytes_sent + coord.bytes_received,
                             coord.pruned_assignments)
    print(results)
    assert results["none"][0] == 1.0
    assert results["act=fp16"][0] >= 0.95 and results["act=fp16"][1] < results["none"][1]
    assert results["act=int8"][0] >= 0.9 and results["act=int8"][1] < results["act=fp16"][1]
    agree, nbytes, pruned = results["act=int8,beta=0.9,fuse=0.3"]
    assert pruned > 0 and nbytes < results["act=int8"][1] and agree >= 0.5


def test_serve_local_error_stops_every_agent(model_dir):
    """An over-budget deployment fails with a clear error and leaves no agent running."""
    import psutil
    from nodes.local import ServeLocalConfig, serve_local
    from nodes.transport import RemoteError
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(RemoteError, match="over_budget"):
        serve_local(ServeLocalConfig(str(model_dir), "", 4, n_agents=2, memory_mb=0.01, prompt_ids=(1, 2, 3)))
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not left, left
    from coel_model.errors import CoelError
    assert issubclass(RemoteError, CoelError)  # so `coel serve-local` prints one line and exits 2


def test_serve_local_with_controller_plan_and_quantized_shards(model_dir, tmp_path):
    """A controller Plan (server names, mixed bits) deploys packed shards; tokens equal the same
    quantized model run in one process."""
    quant = pytest.importorskip("coel_model.quant")
    from coel_model.checkpoint import load_model
    from coel_model.generate import generate
    from nodes.local import ServeLocalConfig, serve_local
    model = load_model(model_dir)
    L, E = model.cfg.n_layers, model.cfg.n_experts
    bits = [[(16, 4, 8, 2, 3, 16)[(l + e) % 6] for e in range(E)] for l in range(L)]
    placement = [[["srvA"] if e % 2 else ["srvB", "srvA"] for e in range(E)] for l in range(L)]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"bits": bits, "placement": placement}))
    for l in range(L):
        for e in range(E):
            if bits[l][e] != 16:
                model.set_expert(l, e, quant.quantize_expert(model.expert(l, e), quant.QuantSpec(bits=bits[l][e])))
    prompt = [5, 17, 33, 2, 9]
    want = generate(model, prompt, 8)
    got = serve_local(ServeLocalConfig(str(model_dir), "", 8, n_agents=2, plan_path=str(plan), prompt_ids=tuple(prompt)))
    assert got["tokens"] == want and got["failovers"] == 0


def test_bundled_tiny_moe_over_three_agents_equals_local():
    """The bundled model (fp16 shards over CURVE, round-robin on 3 agents) generates the same tokens."""
    bundled = ROOT / "models" / "tiny-moe"
    if not (bundled / "config.json").exists():
        pytest.skip("models/tiny-moe not present")
    from coel_model.checkpoint import load_model
    from coel_model.generate import generate
    from nodes.local import ServeLocalConfig, serve_local
    prompt = "Once upon a time"
    got = serve_local(ServeLocalConfig(str(bundled), prompt, 8, n_agents=3))
    torch.set_num_threads(1)
    want = generate(load_model(bundled), got["prompt_tokens"], 8)
    assert got["tokens"] == want and got["deploy_bytes"] > 0 and got["failovers"] == 0
