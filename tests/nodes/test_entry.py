"""Runtime tier 1: the entry service's placement handling and bounded step retry (no sockets),
and the runtime messages' validation."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from coel_model.errors import ConfigError
from nodes import protocol as P
from tests.runtime_fixtures import make_setup


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    from nodes.entry import EntryConfig, EntryService
    setup = make_setup(tmp_path_factory.mktemp("entry"))
    cfg = EntryConfig(name="a1", listen="tcp://127.0.0.1:1", model_dir=setup["model"], placement_wait_s=1.0)
    svc = EntryService(cfg)
    yield svc
    svc.ctx.term()


def _holders(n_layers=2, n_experts=8, ep="tcp://127.0.0.1:9"):
    return [[l, e, [ep]] for l in range(n_layers) for e in range(n_experts)]


def test_entry_holds_no_expert_weights(entry):
    from nodes.coordinator import RemoteExpertStub
    assert all(isinstance(entry.model.expert(l, e), RemoteExpertStub) for l in range(2) for e in range(8))


def test_placement_versions_and_validation(entry):
    assert entry.apply_placement({"version": 5, "holders": _holders(), "compression": {}}) == 5
    assert entry.apply_placement({"version": 3, "holders": _holders(ep="tcp://127.0.0.1:8")}) == 5  # stale: ignored
    assert entry._routing.placement.holders[(0, 0)] == ("tcp://127.0.0.1:9",)
    with pytest.raises(ConfigError, match="no holder for 1 experts.*\\(1, 7\\)"):
        entry.apply_placement({"version": 6, "holders": _holders()[:-1]})
    with pytest.raises(ConfigError, match="compression settings"):
        entry.apply_placement({"version": 6, "holders": _holders(), "compression": {"tcp://x:1": {"act_dtype": "int3"}}})
    assert entry.routing_version() == 5  # a rejected placement changes nothing


class FlakyForward:
    """A forward pass that fails `fails` times with RemoteExpertError, then returns logits."""

    def __init__(self, fails):
        self.fails, self.calls = fails, 0

    def __call__(self):
        from nodes.coordinator import RemoteExpertError
        self.calls += 1
        if self.calls <= self.fails:
            raise RemoteExpertError("layer 0 expert 3: no holder answered")
        return torch.zeros(4)


def test_step_waits_for_a_new_placement_then_retries(entry):
    v = entry.routing_version()
    run = FlakyForward(fails=1)
    stats = {"retries": 0, "waited_s": 0.0}
    threading.Timer(0.1, lambda: entry.apply_placement({"version": v + 1, "holders": _holders()})).start()
    t0 = time.monotonic()
    out = entry._step(run, stats)
    assert out.shape == (4,) and run.calls == 2 and stats["retries"] == 1
    assert time.monotonic() - t0 < 0.45  # woke on the placement, not on the 0.5 s back-off


def test_step_gives_up_after_the_bounded_wait_naming_the_expert(entry):
    from nodes.entry import RequestFailed
    run = FlakyForward(fails=10 ** 6)
    stats = {"retries": 0, "waited_s": 0.0}
    t0 = time.monotonic()
    with pytest.raises(RequestFailed, match="gave up after .* attempt\\(s\\).*layer 0 expert 3"):
        entry._step(run, stats)
    assert 0.9 <= time.monotonic() - t0 < 2.5 and stats["retries"] >= 2


def test_runtime_messages_validate():
    ok = P.decode(P.encode(P.MsgType.GENERATE, 1, {"max_new_tokens": 4}, {"prompt": torch.tensor([1, 2, 3])}))
    assert ok.tensors["prompt"].tolist() == [1, 2, 3]
    for body, tensors, why in [
        ({"max_new_tokens": 0}, {"prompt": torch.tensor([1])}, "max_new_tokens=0"),
        ({"max_new_tokens": 4}, None, "neither a 'prompt' tensor nor a prompt_text"),
        ({"max_new_tokens": 4}, {"prompt": torch.tensor([[1, 2]])}, "1-D int32/int64"),
        ({"max_new_tokens": 4, "prompt_text": "x", "top_p": 0.0}, None, "top_p"),
    ]:
        with pytest.raises(P.ProtocolError, match=why):
            P.decode(P.encode(P.MsgType.GENERATE, 1, body, tensors))
    with pytest.raises(P.ProtocolError, match="holders\\[0\\]"):
        P.decode(P.encode(P.MsgType.PLACEMENT, 1, {"version": 1, "holders": [[0, 0, []]]}))
    with pytest.raises(P.ProtocolError, match="unknown op 'FLY'"):
        P.decode(P.encode(P.MsgType.CONTROL, 1, {"op": "FLY"}))
