"""Pipeline stages in one process: a chain of backbone slices computes what MoEModel.forward
does, per-request KV caches stay within their bound, and a request whose cache was evicted is
replayed to the same greedy tokens."""
from __future__ import annotations

import pytest
import torch

from coel_model.config import MoEConfig
from coel_model.generate import generate
from coel_model.model import BackboneSlice, MoEModel, init_weights, slice_state
from nodes.stage import Pipeline, StageCaches, StageError, StageRunner, local_chain

pytestmark = pytest.mark.unit

CFG = MoEConfig(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, n_experts=6, top_k=2,
                expert_hidden=48, max_seq_len=64, tie_embeddings=True, eos_token_id=-1)
SPLIT = [(0, 1), (1, 2), (2, 4)]


def tiny_model(seed: int = 3) -> MoEModel:
    m = MoEModel(CFG).eval()
    init_weights(m, seed)
    return m


def runners(model: MoEModel, cache_tokens: int = 1 << 16) -> list[StageRunner]:
    """One runner per slice of SPLIT; each stage's cache bound holds one cache of cache_tokens."""
    out = []
    for l0, l1 in SPLIT:
        s = BackboneSlice(CFG, l0, l1, ends=l0 == 0)
        s.load_state_dict(slice_state(model, l0, l1, ends=l0 == 0))
        ex = lambda layer, routing, h: model.layers[layer].moe.local_executor(layer, routing, h)  # noqa: E731
        bound = s.new_cache(cache_tokens).nbytes() if cache_tokens < CFG.max_seq_len else 1 << 30
        out.append(StageRunner(s, StageCaches(s, bound), ex))
    return out


def test_slices_hold_the_backbone_once_and_no_routed_expert():
    model = tiny_model()
    names = [set(slice_state(model, l0, l1, ends=l0 == 0)) for l0, l1 in SPLIT]
    assert not any("experts" in n for ns in names for n in ns)
    assert {"embed.weight", "lm_head.weight", "norm.weight"} <= names[0]  # the coordinator holds the ends
    assert not any(n.split(".")[0] in ("embed", "lm_head", "norm") for n in names[1] | names[2])
    backbone = {n for n in model.state_dict() if ".experts." not in n}
    assert set().union(*names) == backbone
    assert sum(len(ns) for ns in names) == len(backbone) + 0  # no layer tensor in two slices
    with pytest.raises(ValueError, match="not a slice"):
        BackboneSlice(CFG, 2, 2)


@torch.inference_mode()
def test_stage_chain_forward_equals_single_process_forward():
    model = tiny_model()
    toks = torch.tensor([[5, 9, 11, 2, 40]])
    chain = local_chain(runners(model))
    got = chain("r", toks, 0, 16)
    assert torch.equal(got, model(toks)[:, -1:])


def test_pipeline_generate_equals_generate_and_caches_are_per_request():
    model = tiny_model()
    rs = runners(model)
    pipe = Pipeline(CFG, local_chain(rs))
    prompt = [3, 14, 15, 92, 65]
    want = generate(model, prompt, 10)
    assert generate(pipe, prompt, 10) == want
    assert generate(pipe, [7, 7, 1], 6) == generate(model, [7, 7, 1], 6)
    assert all(len(r.caches.caches) == 2 for r in rs) and pipe.replays == 0
    sampled = dict(temperature=0.8, top_k=20, seed=5)
    assert generate(pipe, prompt, 8, **sampled) == generate(model, prompt, 8, **sampled)


def test_an_evicted_cache_is_replayed_to_the_same_tokens():
    model = tiny_model()
    rs = runners(model, cache_tokens=16)  # room for one request's cache per stage
    pipe = Pipeline(CFG, local_chain(rs))
    prompt = [4, 8, 15, 16]
    want = generate(model, prompt, 8)
    cache = pipe.new_cache(len(prompt) + 8)
    logits = pipe(torch.tensor([prompt]), cache)
    got = [int(logits[0, -1].argmax())]
    generate(pipe, [1, 2, 3], 4)  # another request evicts ours on every stage
    assert all(r.caches.evicted >= 1 and cache.request not in r.caches.caches for r in rs)
    while len(got) < 8:
        got.append(int(pipe(torch.tensor([[got[-1]]]), cache)[0, -1].argmax()))
    assert got == want and pipe.replays == 1


def test_a_stage_refuses_a_step_out_of_position():
    model = tiny_model()
    r = runners(model)[0]
    r.run("a", torch.tensor([[1, 2, 3]]), 0, 16)
    with pytest.raises(StageError, match="at position 5 \\(have 3 tokens\\)"):
        r.run("a", torch.tensor([[4]]), 5, 16)
    with pytest.raises(StageError, match="cache bound"):
        StageCaches(r.model, 10).get("b", 0, 16)


def test_stage_messages_validate():
    from nodes import protocol as P
    step = {"request": "r1", "pos": 0, "max_len": 8, "l0": 0, "route": [["tcp://10.0.0.2:5555", 1, 4]],
            "reply_to": "tcp://10.0.0.4:40000", "reply_id": 3}
    ok = P.decode(P.encode(P.MsgType.STAGE_STEP, 3, step, {"x": torch.tensor([[1, 2, 3]])}))
    assert ok.body["route"] == [["tcp://10.0.0.2:5555", 1, 4]]
    for body, tensors, why in [
        (step, {"x": torch.zeros(2, 3, dtype=torch.int64)}, "ids \\(1, T\\)"),
        (step, {"x": torch.zeros(1, 3)}, "ids \\(1, T\\)"),  # a 2-D float is neither ids nor a hidden state
        ({**step, "pos": 7}, {"x": torch.tensor([[1, 2]])}, "must fit max_len"),
        ({**step, "route": [["tcp://x:1", 3, 3], ["tcp://x:1", 3, 4]]}, {"x": torch.tensor([[1]])},
         "route\\[0\\]"),  # l0 == l1 (the head) only as the last hop
        ({**step, "reply_to": "nowhere"}, {"x": torch.tensor([[1]])}, "reply_to"),
    ]:
        with pytest.raises(P.ProtocolError, match=why):
            P.decode(P.encode(P.MsgType.STAGE_STEP, 1, body, tensors))
    with pytest.raises(P.ProtocolError, match="no float tensor 'logits'"):
        P.decode(P.encode(P.MsgType.STAGE_RESULT, 1, {"request": "r1", "hops": []}))
    with pytest.raises(P.ProtocolError, match="l0 < l1"):
        P.decode(P.encode(P.MsgType.LOAD_STAGE, 1, {"l0": 2, "l1": 2, "config": {}, "holders": [],
                                                    "kv_cache_bytes": 0}))
