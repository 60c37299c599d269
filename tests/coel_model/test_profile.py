"""Profiling, the profile schema, and the `coel profile` / `coel quantize` commands on a tiny model."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from coel_model import corpus
from coel_model.checkpoint import load_model, save_model
from coel.cli import main
from coel_model.config import MoEConfig
from coel_model.errors import ConfigError
from coel_model.model import MoEModel, init_weights
from coel_model.profile import calibration_batch, profile_model
from coel_model.profile_format import validate_profile
from coel_model.packing import QuantSpec, packed_expert_bytes
from coel_model.quant import quantize_expert
from coel_model.tokenizer import train_tokenizer

torch.set_num_threads(1)


def tiny_cfg(vocab: int = 320) -> MoEConfig:
    return MoEConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4,
                     top_k=2, expert_hidden=64, max_seq_len=128)


def tiny_model(seed: int = 0, vocab: int = 320) -> MoEModel:
    m = MoEModel(tiny_cfg(vocab))
    init_weights(m, seed)
    # larger expert weights than the GPT-2 init so 2-bit quantization visibly moves the loss
    with torch.no_grad():
        for l in range(m.cfg.n_layers):
            for e in range(m.cfg.n_experts):
                for p in m.expert(l, e).parameters():
                    p.mul_(8.0 * (1 + e))
    return m.eval()


def random_ids(n: int, vocab: int = 320, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def doc():
    return profile_model(tiny_model(), random_ids(513), bits=(2, 3, 4, 8), window=128, with_kl=True,
                         source="random tokens")


def test_profile_is_valid_and_consistent(doc):
    cfg = validate_profile(doc)
    assert cfg == tiny_cfg()
    assert doc["bits"] == [2, 3, 4, 8, 16]
    assert doc["calibration"]["tokens"] == 512
    L, E, k = cfg.n_layers, cfg.n_experts, cfg.top_k
    same = doc["coactivation"]["same_layer"]
    nxt = doc["coactivation"]["next_layer"]
    assert len(same) == L and len(nxt) == L - 1
    for l in range(L):
        ents = [x for x in doc["experts"] if x["layer"] == l]
        assert sum(x["popularity"] for x in ents) == pytest.approx(k)
        for x in ents:
            # diagonal = tokens routed to the expert; rows = its tokens times the other k-1 choices
            assert same[l][x["expert"]][x["expert"]] == round(x["popularity"] * 512)
            assert sum(same[l][x["expert"]]) == round(x["popularity"] * 512) * k
            assert 0 < x["mean_weight"] <= 1
    assert sum(map(sum, nxt[0])) == 512 * k * k
    for x in doc["experts"]:
        for b in doc["bits"]:
            assert x["bytes"][str(b)] == packed_expert_bytes(cfg.d_model, cfg.expert_hidden, QuantSpec(b, 64))
        assert x["loss_increase"]["16"] == 0.0
        assert x["output_kl"]["2"] > x["output_kl"]["8"] >= 0
    # a random model on random tokens: the loss change has either sign, the output KL must fall
    kl2 = sum(x["output_kl"]["2"] for x in doc["experts"])
    kl8 = sum(x["output_kl"]["8"] for x in doc["experts"])
    assert kl2 > 100 * kl8 > 0
    assert any(x["loss_increase"]["2"] != 0 for x in doc["experts"])
    bb = doc["backbone_bytes"]
    assert bb["32"] == 2 * bb["16"] == 4 * cfg.param_counts()["backbone"]


def test_measured_loss_matches_a_full_forward(doc):
    """The cached-stream shortcut must give what quantizing the expert in the model gives."""
    model = tiny_model()
    x, y = calibration_batch(random_ids(513), 128)
    with torch.inference_mode():
        base = torch.nn.functional.cross_entropy(model(x).reshape(-1, 320).double(), y.reshape(-1))
        for (l, e, b) in ((0, 1, 2), (1, 3, 3), (0, 2, 4)):
            m = tiny_model()
            m.set_expert(l, e, quantize_expert(m.expert(l, e), QuantSpec(b)))
            q = torch.nn.functional.cross_entropy(m(x).reshape(-1, 320).double(), y.reshape(-1))
            ent = next(z for z in doc["experts"] if z["layer"] == l and z["expert"] == e)
            assert ent["loss_increase"][str(b)] == pytest.approx(float(q - base), rel=2e-2, abs=2e-5)


def _broken(doc, fn):
    d = copy.deepcopy(doc)
    fn(d)
    return d


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="coel-prof"), '"format" must be'),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d.pop("calibration"), "missing key"),
    (lambda d: d["experts"].pop(3), "have no entry"),
    (lambda d: d["experts"].append(dict(d["experts"][0])), "repeats experts[0]"),
    (lambda d: d["experts"][5].update(popularity=1.5), "experts[5] (layer 1, expert 1): popularity"),
    (lambda d: d["experts"][0].update(popularity=d["experts"][0]["popularity"] + 0.1), "sums to"),
    (lambda d: d["experts"][2]["loss_increase"].pop("3"), "missing ['3']"),
    (lambda d: d["experts"][2]["loss_increase"].update({"3": float("nan")}), "finite"),
    (lambda d: d["experts"][2]["bytes"].update({"4": 10}), "bytes must grow with bits"),
    (lambda d: d["experts"][2].update(importance=1), "unknown key(s) ['importance']"),
    (lambda d: d.update(bits=[2, 5, 16]), '"bits"'),
    (lambda d: d["coactivation"]["next_layer"].append([[0] * 4] * 4), "next_layer must be a list of 1"),
    (lambda d: d["coactivation"]["same_layer"][1][2].__setitem__(0, -1), "same_layer[1][2][0]"),
    (lambda d: d["model_config"].update(n_layers=0), "n_layers must be > 0"),
    (lambda d: d["backbone_bytes"].update({"8": 5}), "backbone_bytes"),
])
def test_validator_names_the_problem(doc, mutate, message):
    with pytest.raises(ConfigError) as err:
        validate_profile(_broken(doc, mutate), source="p.json")
    assert message in str(err.value) and str(err.value).startswith("p.json: ")


def test_optional_parts(doc):
    d = _broken(doc, lambda d: d.pop("coactivation"))
    validate_profile(d)  # synthetic profiles may omit co-activation
    d = _broken(doc, lambda d: [x.pop("output_kl") for x in d["experts"]])
    validate_profile(d)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random checkpoint with a tokenizer trained on a slice of the shipped calib text."""
    d = tmp_path_factory.mktemp("tiny")
    texts = corpus.split_texts("calib")[:20]
    tok = train_tokenizer(texts, vocab_size=300)
    model = tiny_model(vocab=max(300, tok.vocab_size))
    save_model(model, d / "fp")
    tok.save(d / "fp")
    return d


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_profile_and_quantize_commands(model_dir, capsys):
    fp, prof = model_dir / "fp", model_dir / "profile.json"
    rc, out, err = run(["profile", "--model", str(fp), "--json-out", str(prof), "--max-tokens", "256",
                        "--window", "128", "--threads", "1", "--quiet", "--no-kl"], capsys)
    assert rc == 0, err
    validate_profile(json.loads(prof.read_text()))
    sizes = {}
    for strategy in ("mixed", "uniform"):
        for bits in ("3.0", "2.5"):
            out_dir = model_dir / f"q-{strategy}-{bits}"
            rc, out, err = run(["quantize", "--model", str(fp), "--profile", str(prof), "--budget-bits", bits,
                                "--strategy", strategy, "--out", str(out_dir), "--json"], capsys)
            assert rc == 0, err
            summary = json.loads(out)
            assert summary["weighting"] == "mcmoe"  # auto: no output_kl in this profile
            assert summary["expert_bytes"] <= summary["budget_bytes"]
            q = load_model(out_dir)
            assert q.expert_bytes() == summary["expert_bytes"]
            sizes[(strategy, bits)] = summary["expert_bytes"]
            if strategy == "uniform" and bits == "3.0":
                assert {x["bits"] for x in summary["bits"]} == {3}
    for bits in ("3.0", "2.5"):
        mixed, uni = sizes[("mixed", bits)], sizes[("uniform", bits)]
        assert abs(mixed - uni) <= 0.01 * uni, (bits, mixed, uni)
    # the checkpoint names its base model, so eval reports agreement against it
    from coel_model.evaluate import run_eval
    res = run_eval(model_dir / "q-mixed-3.0", max_tokens=200)
    assert 0.0 <= res["top1_agreement"] <= 1.0 and res["expert_bytes"] == sizes[("mixed", "3.0")]
    # greedy and the tables path work too
    rc, out, err = run(["quantize", "--model", str(fp), "--profile", str(prof), "--budget-bits", "3.5",
                        "--solver", "greedy", "--weighting", "measured", "--out", str(model_dir / "qg")], capsys)
    assert rc == 0, err
    assert "bytes:" in out and "greedy" in out
    rc, out, err = run(["quantize", "--model", str(fp), "--profile", str(prof), "--budget-bits", "3",
                        "--weighting", "kl", "--out", str(model_dir / "qk")], capsys)
    assert rc == 2 and "without --no-kl" in err  # this profile was made with --no-kl
    prof_kl = model_dir / "profile_kl.json"
    rc, out, err = run(["profile", "--model", str(fp), "--json-out", str(prof_kl), "--max-tokens", "128",
                        "--window", "128", "--threads", "1", "--quiet"], capsys)
    assert rc == 0, err
    rc, out, err = run(["quantize", "--model", str(fp), "--profile", str(prof_kl), "--budget-bits", "3",
                        "--out", str(model_dir / "qk"), "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["weighting"] == "kl"  # auto picks the KL when the profile has it


def test_quantize_errors_are_one_line(model_dir, capsys):
    fp, prof = model_dir / "fp", model_dir / "profile.json"
    if not prof.exists():
        pytest.skip("needs the profile from test_profile_and_quantize_commands")
    rc, out, err = run(["quantize", "--model", str(fp), "--profile", str(prof), "--budget-bits", "1.5",
                        "--out", str(model_dir / "bad")], capsys)
    assert rc == 2
    need = json.loads(prof.read_text())["experts"][0]["bytes"]["2"] * 8
    assert f"smallest feasible budget is {need} bytes" in err and "2.00" in err
    assert not (model_dir / "bad").exists()
    other = model_dir / "other"
    m = MoEModel(MoEConfig(**{**tiny_cfg(load_model(fp).cfg.vocab_size).to_dict(), "expert_hidden": 128}))
    save_model(m, other)
    rc, out, err = run(["quantize", "--model", str(other), "--profile", str(prof), "--budget-bits", "3",
                        "--out", str(model_dir / "bad2")], capsys)
    assert rc == 2 and "different model" in err and "expert_hidden" in err
    rc, out, err = run(["profile", "--model", str(model_dir / "q-mixed-3.0"), "--json-out",
                        str(model_dir / "x.json")], capsys)
    assert rc == 2 and "already quantized" in err
