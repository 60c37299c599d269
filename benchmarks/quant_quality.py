"""Quality of mixed-precision vs uniform expert quantization at equal bytes, in one run.

For each average bit width (default 2.5, 3, 3.5, 4, 16) the same byte budget is spent three ways:
  uniform         every expert at the width (round-robin mix of the two neighbouring widths for
                  fractional averages; popularity-agnostic)
  mixed-mcmoe     ILP on freq^1 * weight^1.5 * measured loss_increase (MC-MoE's cost)
  mixed-measured  ILP on the measured loss_increase alone
  mixed-kl        ILP on the measured output KL alone (needs a profile made with --kl)
  greedy-mcmoe    the fast hull greedy on MC-MoE's cost (how far the heuristic is from the ILP)
and each quantized model (real packed experts, run through the quant kernels) is evaluated on the
held-out split against the fp32 model: perplexity, its increase over fp32, top-1 agreement.

    .venv/bin/python benchmarks/quant_quality.py --model models/tiny-moe --json-out /tmp/qq.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coel_model import evaluate  # noqa: E402
from coel_model.allocate import (budget_bytes_for_avg_bits, costs_from_profile, solve_greedy,  # noqa: E402
                                 solve_ilp, solve_uniform)
from coel_model.checkpoint import load_model  # noqa: E402
from coel_model.profile_format import load_profile  # noqa: E402
from coel_model.quant import QuantSpec, quantize_expert  # noqa: E402

STRATEGIES = ("uniform", "mixed-mcmoe", "mixed-measured", "mixed-kl", "greedy-mcmoe")


@torch.inference_mode()
def run_windows(model, wins) -> tuple[float, list[torch.Tensor], int]:
    """Mean NLL (float64 sum) and per-window argmax over non-overlapping windows."""
    nll, n, argmaxes = 0.0, 0, []
    for w in wins:
        x, y = w[:-1].unsqueeze(0), w[1:]
        logits = model(x)[0].float()
        nll += float(F.cross_entropy(logits, y, reduction="none").double().sum())
        n += y.numel()
        argmaxes.append(logits.argmax(-1))
    return nll / n, argmaxes, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-moe"))
    ap.add_argument("--profile", default=None, help="default: <model>/profile.json")
    ap.add_argument("--bits", default="2.5,3,3.5,4,16", help="average bit widths to compare")
    ap.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens evaluated")
    ap.add_argument("--method", choices=("rtn", "hqq"), default="rtn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", help="write the results as JSON to this file")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="subset to run (uniform is always run)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.monotonic()

    prof_path = Path(args.profile) if args.profile else Path(args.model) / "profile.json"
    profile = load_profile(prof_path)
    model = load_model(args.model)
    cfg = model.cfg
    if profile.cfg.to_dict() != cfg.to_dict():
        raise SystemExit(f"{prof_path} profiles a different model than {args.model}")
    group = profile.group_size
    tables = {"uniform": costs_from_profile(profile, "mcmoe"),
              "mixed-mcmoe": costs_from_profile(profile, "mcmoe"),
              "mixed-measured": costs_from_profile(profile, "measured"),
              "mixed-kl": costs_from_profile(profile, "kl"),
              "greedy-mcmoe": costs_from_profile(profile, "mcmoe")}
    tok = evaluate.find_tokenizer(args.model)
    ids = evaluate.eval_token_ids(tok, "heldout", args.max_tokens + 1)
    wins = evaluate.windows(ids, min(evaluate.MAX_WINDOW, cfg.max_seq_len))
    fp_loss, fp_argmax, n_tokens = run_windows(model, wins)
    fp_ppl = math.exp(fp_loss)

    qcache: dict[tuple[int, int, int], torch.nn.Module] = {}
    work = copy.deepcopy(model)
    rows = []
    n_params = cfg.n_layers * cfg.n_experts * cfg.expert_params()
    for avg in [float(b) for b in args.bits.split(",")]:
        budget = budget_bytes_for_avg_bits(tables["uniform"], avg)
        wanted = ["uniform"] + [x for x in args.strategies.split(",") if x and x != "uniform"]
        unknown = [x for x in wanted if x not in STRATEGIES]
        if unknown:
            raise SystemExit(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
        for strategy in wanted:
            table = tables[strategy]
            t0 = time.monotonic()
            if strategy == "uniform":
                alloc = solve_uniform(table, budget)
            elif strategy.startswith("greedy"):
                alloc = solve_greedy(table, budget)
            else:
                alloc = solve_ilp(table, budget)
            solve_s = time.monotonic() - t0
            for (l, e), b in alloc.bits.items():
                if (l, e, b) not in qcache:
                    qcache[(l, e, b)] = quantize_expert(model.expert(l, e), QuantSpec(b, group, args.method))
                work.set_expert(l, e, qcache[(l, e, b)])
            loss, argmax, _ = run_windows(work, wins)
            agree = sum(int((a == r).sum()) for a, r in zip(argmax, fp_argmax)) / n_tokens
            ppl = math.exp(loss)
            rows.append({"avg_bits": avg, "strategy": strategy, "budget_bytes": budget,
                         "expert_bytes": work.expert_bytes(),
                         "bits_per_weight": round(8 * work.expert_bytes() / n_params, 4),
                         "histogram": {str(k): v for k, v in sorted(alloc.histogram.items())},
                         "loss_nats": round(loss, 6), "perplexity": round(ppl, 4),
                         "ppl_increase": round(ppl - fp_ppl, 4),
                         "ppl_increase_pct": round(100 * (ppl / fp_ppl - 1), 3),
                         "loss_increase_nats": round(loss - fp_loss, 6),
                         "predicted_loss_increase": round(
                             float(tables["mixed-measured"].cost[range(table.n), [
                                 table.bits.index(alloc.bits[k]) for k in table.keys]].sum()), 6),
                         "top1_agreement": round(agree, 5), "solve_seconds": round(solve_s, 3),
                         "optimal": alloc.optimal})
    for avg in sorted({r["avg_bits"] for r in rows}):
        group_rows = {r["strategy"]: r for r in rows if r["avg_bits"] == avg}
        uni = group_rows["uniform"]
        for r in group_rows.values():
            r["bytes_vs_uniform"] = round(r["expert_bytes"] / uni["expert_bytes"], 5)
            r["ppl_increase_vs_uniform"] = (round(r["ppl_increase"] / uni["ppl_increase"], 4)
                                            if uni["ppl_increase"] > 1e-9 else None)
    at3 = {r["strategy"]: r for r in rows if r["avg_bits"] == 3.0}
    goal = None
    if at3 and at3["uniform"]["ppl_increase"] > 0:
        goal = {s: at3[s]["ppl_increase"] <= 0.5 * at3["uniform"]["ppl_increase"] for s in at3 if s != "uniform"}
    result = {"benchmark": "quant_quality", "model": args.model, "profile": str(prof_path),
              "method": args.method, "group_size": group, "heldout_tokens": n_tokens,
              "calibration_tokens": profile.calibration["tokens"],
              "fp32": {"loss_nats": round(fp_loss, 6), "perplexity": round(fp_ppl, 4),
                       "expert_bytes_fp32": model.expert_bytes()},
              "rows": rows, "goal_3bit_mixed_at_most_half_of_uniform": goal,
              "threads": args.threads, "seconds": round(time.monotonic() - t_start, 1)}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


def print_table(res: dict) -> None:
    fp = res["fp32"]
    print(f"model {res['model']}  method {res['method']}  group {res['group_size']}  held-out tokens "
          f"{res['heldout_tokens']}  calibration tokens {res['calibration_tokens']}")
    print(f"fp32: perplexity {fp['perplexity']:.4f}  expert bytes {fp['expert_bytes_fp32']}")
    hdr = (f"{'avg bits':>8} {'strategy':<15} {'expert bytes':>12} {'vs uni':>7} {'bits/w':>6} "
           f"{'ppl':>9} {'d ppl %':>8} {'d vs uni':>8} {'top1 agr':>8} {'pred dL':>9} {'real dL':>9}  widths")
    print(hdr)
    print("-" * len(hdr))
    for r in res["rows"]:
        rel = "" if r["ppl_increase_vs_uniform"] is None else f"{r['ppl_increase_vs_uniform']:.3f}"
        hist = " ".join(f"{k}:{v}" for k, v in r["histogram"].items())
        print(f"{r['avg_bits']:>8.2f} {r['strategy']:<15} {r['expert_bytes']:>12} {r['bytes_vs_uniform']:>7.4f} "
              f"{r['bits_per_weight']:>6.3f} {r['perplexity']:>9.4f} {r['ppl_increase_pct']:>8.3f} {rel:>8} "
              f"{r['top1_agreement']:>8.4f} {r['predicted_loss_increase']:>9.5f} {r['loss_increase_nats']:>9.5f}  {hist}")
    print(f"goal (3 bits: mixed ppl increase <= half of uniform's): {res['goal_3bit_mixed_at_most_half_of_uniform']}")
    print(f"{res['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
