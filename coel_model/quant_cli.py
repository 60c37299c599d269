"""Quantization commands of `coel`: `profile` (measure every expert) and `quantize` (allocate bits
under a budget and write a quantized checkpoint).

    coel profile  --model models/tiny-moe --json-out models/tiny-moe/profile.json
    coel quantize --model models/tiny-moe --profile models/tiny-moe/profile.json \\
                  --budget-bits 3.0 --strategy mixed --out /tmp/tiny-q3
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from coel_model.errors import CheckpointError, ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure per-expert popularity, co-activation and quantization "
                       "sensitivity (coel-profile v1 JSON)")
    p.add_argument("--model", required=True, help="unquantized checkpoint directory")
    p.add_argument("--json-out", required=True, help="profile file to write")
    p.add_argument("--split", choices=("calib", "heldout"), default="calib",
                   help="text the statistics are measured on (default calib)")
    p.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--bits", default="2,3,4,8", help="widths whose loss is measured (16 is the reference)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--method", choices=("rtn", "hqq"), default="rtn",
                   help="quantizer used for the measurement (use the one you will deploy)")
    p.add_argument("--window", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--no-kl", dest="kl", action="store_false",
                   help="skip the output KL(fp || quantized) per expert (recorded by default: it is the "
                        "best allocation signal measured on tiny-moe)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("quantize", help="choose per-expert bits under a budget and write a quantized checkpoint")
    p.add_argument("--model", required=True, help="unquantized checkpoint directory")
    p.add_argument("--profile", required=True, help="coel-profile JSON of that model (coel profile)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-bits", type=float,
                        help="average bits per expert weight; N bits = the bytes of every expert at N bits "
                             "(interpolated between widths for fractions)")
    budget.add_argument("--budget-bytes", type=int, help="packed bytes for all routed experts together")
    p.add_argument("--strategy", choices=("mixed", "uniform"), default="mixed")
    p.add_argument("--solver", choices=("ilp", "greedy"), default="ilp", help="mixed strategy only")
    p.add_argument("--weighting", choices=("auto", "mcmoe", "measured", "kl"), default="auto",
                   help="cost = freq^a * weight^b * loss (mcmoe), the measured loss alone, or the measured "
                        "output KL alone (kl: best on tiny-moe, see docs/bench/quant_quality.md); auto = kl "
                        "when the profile has output_kl, else mcmoe")
    p.add_argument("--alpha", type=float, default=1.0, help="exponent on popularity (mcmoe)")
    p.add_argument("--beta", type=float, default=1.5, help="exponent on mean routing weight (mcmoe)")
    p.add_argument("--bits", default="", help="allowed widths, e.g. 2,3,4 (default: all in the profile)")
    p.add_argument("--method", choices=("rtn", "hqq"), default="hqq",
                   help="quantizer of the written experts (default hqq: with the kl weighting it measures best, "
                        "docs/benchmarks.md 'Quantization quality'; rtn = round to nearest)")
    p.add_argument("--time-limit-s", type=float, default=10.0, help="ILP time limit")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=cmd_quantize)


def _parse_bits(text: str, flag: str) -> list[int]:
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers like 2,3,4,8 (got {text!r})") from None


@contextlib.contextmanager
def _stdout_to_stderr():
    """Point file descriptor 1 at stderr for the duration (C libraries write there directly)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _require_float_model(model_dir: str) -> None:
    if (Path(model_dir) / "quant.json").exists():
        raise ConfigError(f"{model_dir} is already quantized (it has quant.json); give the unquantized model")


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from coel_model import evaluate
    from coel_model.checkpoint import load_model
    from coel_model.profile import profile_model
    from coel_model.profile_format import write_profile

    torch.set_num_threads(max(1, args.threads))
    bits = _parse_bits(args.bits, "--bits")
    if args.max_tokens < 2:
        raise ConfigError(f"--max-tokens must be at least 2 (got {args.max_tokens})")
    _require_float_model(args.model)
    model = load_model(args.model)
    tok = evaluate.find_tokenizer(args.model)
    ids = evaluate.eval_token_ids(tok, args.split, args.max_tokens + 1)
    if max(ids) >= model.cfg.vocab_size:
        raise CheckpointError(f"{args.model}: tokenizer produced id {max(ids)} >= vocab_size "
                              f"{model.cfg.vocab_size}")
    source = f"{args.split} split (data/{args.split}.txt), first {len(ids) - 1} predicted tokens"

    def run(progress) -> dict:
        return profile_model(model, ids, tuple(bits), args.group_size, args.method, args.window,
                             args.kl, source, progress)
    if args.quiet or not sys.stderr.isatty():
        last = [0.0]

        def progress(done: int, total: int, what: str) -> None:
            now = time.monotonic()
            if not args.quiet and (now - last[0] > 10 or done == total):
                print(f"profile: {done}/{total} measurements ({what})", file=sys.stderr, flush=True)
                last[0] = now
        doc = run(progress)
    else:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        with Progress(TextColumn("profile"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"),
                      transient=True) as bar:
            task = bar.add_task("baseline", total=None)

            def progress(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, description=what)
            doc = run(progress)
    out = write_profile(doc, args.json_out)
    _print_profile_summary(doc, out)
    return 0


def _print_profile_summary(doc: dict, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = doc["model_config"]
    measured = [b for b in doc["bits"] if b != 16]
    t = Table(title=f"profile of {cfg['n_layers']} layers x {cfg['n_experts']} experts on "
                    f"{doc['calibration']['tokens']} tokens (loss increase in millinats/token)")
    t.add_column("layer", justify="right")
    t.add_column("expert", justify="right")
    t.add_column("popularity", justify="right")
    t.add_column("mean w", justify="right")
    for b in measured:
        t.add_column(f"{b}-bit", justify="right")
    for ent in doc["experts"]:
        t.add_row(str(ent["layer"]), str(ent["expert"]), f"{ent['popularity']:.3f}", f"{ent['mean_weight']:.3f}",
                  *[f"{1000 * ent['loss_increase'][str(b)]:.3f}" for b in measured])
    console = Console()
    console.print(t)
    console.print(f"base loss {doc['calibration']['base_loss_nats']:.4f} nats/token; "
                  f"{doc['calibration']['seconds']} s; wrote {path}")


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from coel_model.allocate import (allocate, budget_bytes_for_avg_bits, costs_from_profile,
                                     solve_uniform)
    from coel_model.checkpoint import load_config, load_model
    from coel_model.profile_format import load_profile
    from coel_model.checkpoint import save_quantized
    from coel_model.packing import QuantSpec, packed_expert_bytes

    torch.set_num_threads(max(1, args.threads))
    _require_float_model(args.model)
    profile = load_profile(args.profile)
    cfg = load_config(args.model)
    cfg_dict = cfg.to_dict()
    if profile.cfg.to_dict() != cfg_dict:
        diff = sorted(k for k in cfg_dict if profile.cfg.to_dict().get(k) != cfg_dict[k])
        raise ConfigError(f"{args.profile} profiles a different model than {args.model} "
                          f"(fields differ: {diff}); run `coel profile` on this model")
    if args.weighting == "auto":
        args.weighting = "kl" if profile.output_kl is not None else "mcmoe"
    table = costs_from_profile(profile, weighting=args.weighting, alpha=args.alpha, beta=args.beta,
                               bits=_parse_bits(args.bits, "--bits") or None)
    group = profile.group_size
    for b in table.bits:  # the profile's byte counts must be what the packer really writes
        real = packed_expert_bytes(cfg.d_model, cfg.expert_hidden, QuantSpec(b, group))
        listed = sorted(set(table.nbytes[:, table.bits.index(b)].tolist()))
        if listed != [real]:
            raise ConfigError(f"{args.profile}: experts at {b} bits are listed as {listed} bytes, the packed "
                              f"format takes {real} (group {group}); re-run `coel profile`")
    if args.budget_bytes is not None:
        if args.budget_bytes <= 0:
            raise ConfigError(f"--budget-bytes must be positive (got {args.budget_bytes})")
        budget = args.budget_bytes
    else:
        budget = budget_bytes_for_avg_bits(table, args.budget_bits)
    t0 = time.monotonic()
    if args.strategy == "uniform":
        alloc = solve_uniform(table, budget)
    else:
        with _stdout_to_stderr():  # HiGHS occasionally prints to fd 1, which would break --json
            alloc = allocate(table, budget, solver=args.solver, time_limit_s=args.time_limit_s)
    solve_s = time.monotonic() - t0

    model = load_model(args.model)
    specs = {k: QuantSpec(b, group, args.method) for k, b in alloc.bits.items()}
    out = Path(args.out)
    base = os.path.relpath(Path(args.model).resolve(), out.resolve())
    save_quantized(model, specs, out, base_model=base)
    written = json.loads((out / "quant.json").read_text())["expert_bytes"]
    if written != alloc.bytes_used:
        raise CheckpointError(f"{out / 'quant.json'}: expert_bytes {written} != allocated {alloc.bytes_used}")
    n_params = cfg.n_layers * cfg.n_experts * cfg.expert_params()
    summary = {"model": args.model, "profile": args.profile, "out": str(out), "strategy": args.strategy,
               "weighting": args.weighting, "method": args.method,
               "budget_bits": args.budget_bits, "budget_bytes": budget,
               "expert_bytes": alloc.bytes_used, "fp16_expert_bytes": cfg.n_layers * cfg.n_experts
               * packed_expert_bytes(cfg.d_model, cfg.expert_hidden, QuantSpec(16)),
               "bits_per_weight": round(8 * alloc.bytes_used / n_params, 4),
               "solve_seconds": round(solve_s, 3), **alloc.to_dict()}
    (out / "allocation.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.json:
        print(json.dumps(summary))
    else:
        _print_allocation(summary, cfg)
    return 0


def _print_allocation(s: dict, cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    grid = {(x["layer"], x["expert"]): x["bits"] for x in s["bits"]}
    t = Table(title=f"{s['strategy']} allocation ({s['solver']}{', optimal' if s['optimal'] else ''}): "
                    f"bits per expert")
    t.add_column("layer", justify="right")
    for e in range(cfg.n_experts):
        t.add_column(str(e), justify="right")
    for l in range(cfg.n_layers):
        t.add_row(str(l), *[str(grid[(l, e)]) for e in range(cfg.n_experts)])
    console = Console()
    console.print(t)
    hist = ", ".join(f"{c} x {b}-bit" for b, c in s["histogram"].items())
    console.print(f"experts: {hist}; average {s['average_bits']:.3f} bits nominal, "
                  f"{s['bits_per_weight']:.3f} bits/weight with scales")
    console.print(f"bytes: {s['expert_bytes']} used of {s['budget_bytes']} budget "
                  f"({100 * s['expert_bytes'] / s['budget_bytes']:.2f}%), fp16 would be {s['fp16_expert_bytes']}")
    console.print(f"predicted loss {s['predicted_loss']:.6g} ({s['weighting']}); wrote {s['out']}")
