"""Corpus, tokenizer, training, eval and generate CLI of the model room (fast, tiny models)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from coel_model import commands, corpus
from coel_model.checkpoint import save_model
from coel_model.config import MoEConfig
from coel_model.errors import CheckpointError, ConfigError
from coel_model.evaluate import (base_model_dir, popularity_summary, run_eval, unigram_perplexity,
                                 write_unigram_counts)
from coel_model.model import MoEModel, init_weights
from coel_model.tokenizer import Tokenizer, train_tokenizer
from coel_model.train import TrainConfig, lr_at, train

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "models" / "tiny-moe"


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def small_tok() -> Tokenizer:
    return train_tokenizer(corpus.split_texts("calib")[:6], vocab_size=320)


def tiny_cfg(vocab: int, eos: int) -> MoEConfig:
    return MoEConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, n_experts=4, top_k=2,
                     expert_hidden=48, max_seq_len=128, tie_embeddings=True, eos_token_id=eos)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, small_tok) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    model = MoEModel(tiny_cfg(small_tok.vocab_size, small_tok.eos_id))
    init_weights(model, 1)
    save_model(model, d, dtype=torch.float16)
    small_tok.save(d)
    write_unigram_counts(d, small_tok, [1] * small_tok.vocab_size)
    return d


def run_cmd(argv: list[str], capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    rc = args.func(args)
    return rc, capsys.readouterr().out


def test_shipped_splits_match_rule_and_do_not_leak_into_training():
    manifest = json.loads((REPO / "data" / "manifest.json").read_text())
    for split in ("heldout", "calib"):
        mods = manifest["splits"][split]["modules"]
        assert mods and all(corpus.split_of(m) == split for m in mods)
        assert len(corpus.split_texts(split)) == len(mods)
        assert 100_000 < manifest["splits"][split]["bytes"] < 1_000_000
    train_mods = {d.module for d in corpus.training_documents()}
    assert train_mods and not train_mods & corpus.shipped_modules()
    assert corpus.module_name(Path("email/mime/__init__.py")) == "email.mime"


def test_tokenizer_round_trip_and_eos(small_tok, tmp_path):
    text = 'def f(x: int) -> str:\n\t"""Ünïcode ✓ and\r\n tabs."""\n    return str(x ** 2)  # done\n'
    ids = small_tok.encode(text)
    assert small_tok.decode(ids) == text
    assert small_tok.eos_id == 0 and small_tok.vocab_size == 320
    stream = small_tok.encode_documents(["a = 1", "b = 2"])
    assert stream.count(small_tok.eos_id) == 2 and stream[-1] == small_tok.eos_id
    again = Tokenizer.load(small_tok.save(tmp_path))
    assert again.encode(text) == ids
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    with pytest.raises(CheckpointError, match="end-of-text"):
        Tokenizer(HFTokenizer(models.BPE()))
    assert Tokenizer(HFTokenizer(models.BPE()), eos_id=5).eos_id == 5


def test_training_a_few_steps_lowers_loss(small_tok):
    ids = torch.tensor(small_tok.encode_documents(corpus.split_texts("calib")[:6]))
    model = MoEModel(tiny_cfg(small_tok.vocab_size, small_tok.eos_id))
    init_weights(model, 0)
    cfg = TrainConfig(steps=40, batch_size=8, seq_len=64, lr=1e-2, warmup_steps=5, threads=1, eval_every=40)
    res = train(model, ids, cfg, eval_tokens=ids[:2000])
    first = sum(r["loss"] for r in res.log[:5]) / 5
    last = sum(r["loss"] for r in res.log[-5:]) / 5
    assert res.steps == 40 and res.tokens_seen == 40 * 8 * 64
    assert last < first - 1.0, (first, last)
    assert res.final_eval_loss < math.log(small_tok.vocab_size)
    # deterministic: same seed, same losses
    model2 = MoEModel(tiny_cfg(small_tok.vocab_size, small_tok.eos_id))
    init_weights(model2, 0)
    res2 = train(model2, ids, TrainConfig(steps=3, batch_size=8, seq_len=64, lr=1e-2, warmup_steps=5, threads=1))
    assert [r["loss"] for r in res2.log] == [r["loss"] for r in res.log[:3]]


def test_train_cli_continues_a_checkpoint_and_writes_everything(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cont"
    rc, _ = run_cmd(["train", "--out", str(out), "--init-from", str(tiny_dir), "--steps", "3", "--batch-size", "2",
                     "--seq-len", "32", "--eval-every", "3", "--max-train-tokens", "4000", "--threads", "1"], capsys)
    assert rc == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_log.json", "unigram_counts.json"} <= {
        f.name for f in out.iterdir()}
    log = json.loads((out / "train_log.json").read_text())
    assert log["tokens_seen"] == 3 * 2 * 32 and len(log["log"]) == 3 and log["init_from"] == str(tiny_dir)
    assert MoEConfig.load(out / "config.json") == MoEConfig.load(tiny_dir / "config.json")
    counts = json.loads((out / "unigram_counts.json").read_text())["counts"]
    assert sum(counts) == 4000


def test_lr_schedule_and_train_config_validation():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(cfg, 10, 0.1) == pytest.approx(1.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.1))))
    assert lr_at(cfg, 99, 1.0) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_unigram_perplexity_add_one():
    assert unigram_perplexity([0, 0, 0, 0], [0, 1, 2, 3]) == pytest.approx(4.0)
    # counts [3,1]: p0 = 4/6, p1 = 2/6
    assert unigram_perplexity([3, 1], [0, 1]) == pytest.approx(math.exp(-(math.log(4 / 6) + math.log(2 / 6)) / 2))


def test_eval_json_keys_and_reference_agreement(tiny_dir, capsys):
    rc, out = run_cmd(["eval", "--model", str(tiny_dir), "--max-tokens", "600", "--json", "--threads", "1"], capsys)
    res = json.loads(out)
    assert rc == 0
    assert {"perplexity", "unigram_perplexity", "tokens", "expert_bytes"} <= set(res)
    assert "top1_agreement" not in res
    assert res["tokens"] == 599  # 600 tokens -> windows of 512 and 88 (+1 boundary token each)
    assert res["unigram_perplexity"] == pytest.approx(320.0)  # uniform counts
    assert res["expert_bytes"] == 2 * 4 * 3 * 32 * 48 * 4  # fp32 in memory
    rc, out = run_cmd(["eval", "--model", str(tiny_dir), "--reference", str(tiny_dir), "--max-tokens", "300",
                       "--json", "--routing"], capsys)
    res = json.loads(out)
    assert res["top1_agreement"] == 1.0
    pops = res["routing"]["layers"][0]["popularity"]
    assert sum(pops) == pytest.approx(2.0, abs=1e-3) and 0 < res["routing"]["layers"][0]["normalised_entropy"] <= 1


def test_agreement_drops_for_a_different_model(tiny_dir, small_tok, tmp_path):
    # untied head: a random tied model predicts its own input token, so two of them would agree
    other = MoEModel(MoEConfig.from_dict({**tiny_cfg(small_tok.vocab_size, small_tok.eos_id).to_dict(),
                                          "tie_embeddings": False}))
    init_weights(other, 7)
    save_model(other, tmp_path, dtype=torch.float16)
    res = run_eval(tiny_dir, tmp_path, max_tokens=300)
    assert res["top1_agreement"] < 0.5


def test_base_model_from_quant_json(tmp_path):
    assert base_model_dir(tmp_path) is None
    (tmp_path / "quant.json").write_text(json.dumps({"base_model": "../base"}))
    assert base_model_dir(tmp_path) == (tmp_path / "../base").resolve()
    (tmp_path / "quant.json").write_text(json.dumps({"base_model": "/abs/base"}))
    assert base_model_dir(tmp_path) == Path("/abs/base")


def test_generate_json_shape_and_determinism(tiny_dir, capsys):
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "def ", "--max-new-tokens", "8", "--json"]
    rc, out = run_cmd(argv, capsys)
    res = json.loads(out)
    assert rc == 0 and set(res) >= {"tokens", "text", "prompt_tokens", "ms_per_token"}
    assert 1 <= len(res["tokens"]) <= 8 and all(isinstance(t, int) for t in res["tokens"])
    assert res["ms_per_token"] > 0 and res["prompt_tokens"]
    _, out2 = run_cmd(argv, capsys)
    assert json.loads(out2)["tokens"] == res["tokens"]  # greedy is deterministic
    rc, out = run_cmd(argv[:-1] + ["--temperature", "1.0", "--top-k", "20", "--seed", "3"], capsys)
    assert rc == 0 and out.startswith("def ")


def test_cli_errors_are_clear(tiny_dir, tmp_path, capsys):
    from coel.cli import main
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--max-new-tokens", "1000"]) == 2
    assert "max_seq_len" in capsys.readouterr().err


def test_info(tiny_dir, capsys):
    rc, out = run_cmd(["info", "--model", str(tiny_dir), "--json"], capsys)
    info = json.loads(out)
    assert info["param_counts"]["experts"] == 2 * 4 * 3 * 32 * 48
    assert info["config"]["n_experts"] == 4 and "model.safetensors" in info["files_bytes"]


def test_popularity_summary_entropy():
    counts = torch.tensor([[50.0, 50.0, 0.0, 0.0], [25.0, 25.0, 25.0, 25.0]])  # 50 tokens, top-2
    st = popularity_summary(counts, 50)
    assert st["layers"][0]["popularity"] == [1.0, 1.0, 0.0, 0.0]
    assert st["layers"][0]["normalised_entropy"] == pytest.approx(0.5)  # two equal experts of four
    assert st["layers"][0]["max_over_min"] is None
    assert st["layers"][1]["normalised_entropy"] == pytest.approx(1.0)
    assert st["layers"][1]["max_over_min"] == 1.0


def test_bundled_model_beats_half_unigram():
    res = run_eval(BUNDLED, max_tokens=3000)
    assert res["perplexity"] < 0.5 * res["unigram_perplexity"], res
    cfg = MoEConfig.load(BUNDLED / "config.json")
    counts = cfg.param_counts()
    assert 6e6 <= counts["total"] <= 8.5e6 and counts["experts"] > 0.8 * counts["total"]
    assert sum(f.stat().st_size for f in BUNDLED.iterdir()) <= 20 * 2**20
