"""Model-room commands of `coel`: train, eval, generate, info."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a tiny MoE (and its BPE tokenizer) on the stdlib corpus")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--config", help="JSON file of MoEConfig fields overriding the default tiny-moe shape")
    p.add_argument("--time-budget-min", type=float, default=0.0, help="wall-clock budget (0 = steps only)")
    p.add_argument("--steps", type=int, default=None, help="max optimizer steps (default 100000 with a "
                   "time budget, else 2000)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-loss-coef", type=float, default=1e-3)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one")
    p.add_argument("--init-from", help="continue from this checkpoint (its config, weights and tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--max-train-tokens", type=int, default=0, help="truncate the training stream (tests)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out perplexity vs a unigram baseline (+ top-1 agreement)")
    p.add_argument("--model", required=True, help="checkpoint directory (plain or quantized)")
    p.add_argument("--reference", help="reference checkpoint for top1_agreement (default: quant.json base_model)")
    p.add_argument("--split", choices=("heldout", "calib"), default="heldout")
    p.add_argument("--max-tokens", type=int, default=16384, help="evaluate the first N tokens (0 = all)")
    p.add_argument("--routing", action="store_true", help="also report per-layer expert popularity")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text from a prompt (greedy by default)")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="a checkpoint's config, parameter counts and sizes")
    p.add_argument("--model", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)


def _progress_printer(total_steps: int, budget_s: float):
    """A rich progress bar on a terminal; plain log lines (every 50 steps) when redirected."""
    from rich.console import Console
    console = Console(stderr=True)
    if console.is_terminal:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        prog = Progress(TextColumn("step {task.fields[step]}"), BarColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), console=console)
        task = prog.add_task("train", total=total_steps if not budget_s else budget_s, info="", step=0)

        def on_step(rec: dict) -> None:
            info = f"loss {rec['loss']:.3f} aux {rec['aux']:.3f} lr {rec['lr']:.2e} tok {rec['tokens']:,}"
            if "eval_loss" in rec:
                info += f" eval {rec['eval_loss']:.3f}"
            prog.update(task, completed=rec["elapsed_s"] if budget_s else rec["step"], info=info, step=rec["step"])
        return prog, on_step

    def on_step(rec: dict) -> None:
        if rec["step"] % 50 == 0 or "eval_loss" in rec:
            extra = f" eval_loss={rec['eval_loss']:.4f}" if "eval_loss" in rec else ""
            print(f"step {rec['step']} loss={rec['loss']:.4f} aux={rec['aux']:.4f} lr={rec['lr']:.2e} "
                  f"tokens={rec['tokens']} elapsed={rec['elapsed_s']:.0f}s{extra}", file=sys.stderr, flush=True)
    return None, on_step


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from coel_model import corpus
    from coel_model.config import MoEConfig
    from coel_model.errors import ConfigError
    from coel_model.model import MoEModel, init_weights
    from coel_model.tokenizer import Tokenizer, train_tokenizer
    from coel_model.evaluate import write_unigram_counts
    from coel_model.train import TrainConfig, default_model_config, save_trained, train

    torch.set_num_threads(args.threads)
    t_start = time.monotonic()
    docs = corpus.training_documents()
    if not docs:
        raise ConfigError(f"no training documents found under {corpus.stdlib_dir()}")
    texts = [d.text for d in docs]
    if args.init_from and not args.tokenizer:
        args.tokenizer = str(Path(args.init_from) / "tokenizer.json")
    tok = Tokenizer.load(args.tokenizer) if args.tokenizer else train_tokenizer(texts, args.vocab_size)
    train_ids = tok.encode_documents(texts)
    if args.max_train_tokens:
        train_ids = train_ids[:args.max_train_tokens]
    heldout_ids = tok.encode_documents(corpus.split_texts("heldout"))
    base = default_model_config(tok.vocab_size, tok.eos_id).to_dict()
    if args.init_from:
        from coel_model.checkpoint import load_config
        base = load_config(args.init_from).to_dict()
    if args.config:
        try:
            overrides = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{args.config}: cannot read model config: {exc}") from None
        base.update({k: v for k, v in overrides.items() if k not in ("format", "version")})
    cfg = MoEConfig.from_dict(base, source=args.config or "<default tiny-moe config>")
    if cfg.vocab_size != tok.vocab_size:
        raise ConfigError(f"config vocab_size {cfg.vocab_size} != tokenizer vocab {tok.vocab_size}")
    steps = args.steps or (100_000 if args.time_budget_min else 2000)
    tcfg = TrainConfig(steps=steps, time_budget_s=args.time_budget_min * 60, batch_size=args.batch_size,
                       seq_len=args.seq_len, lr=args.lr, aux_loss_coef=args.aux_loss_coef, seed=args.seed,
                       threads=args.threads, eval_every=args.eval_every,
                       warmup_steps=min(100, max(1, steps // 10)))
    model = MoEModel(cfg)
    init_weights(model, args.seed)
    if args.init_from:
        from coel_model.checkpoint import load_model, load_state_into
        load_state_into(model, load_model(args.init_from).state_dict(), args.init_from)
    counts = cfg.param_counts()
    print(f"corpus: {len(docs)} stdlib modules, {len(train_ids):,} training tokens; held-out "
          f"{len(heldout_ids):,} tokens; params {counts['total']:,} (experts {counts['experts']:,})",
          file=sys.stderr, flush=True)
    prog, on_step = _progress_printer(steps, tcfg.time_budget_s)
    eval_ids = torch.tensor(heldout_ids[:32 * tcfg.seq_len + 1])
    if prog is not None:
        with prog:
            result = train(model, torch.tensor(train_ids), tcfg, eval_ids, on_step)
    else:
        result = train(model, torch.tensor(train_ids), tcfg, eval_ids, on_step)
    extra = {"corpus": {"source": "python-stdlib", "python": sys.version.split()[0],
                        "stdlib": str(corpus.stdlib_dir()), "train_modules": len(docs),
                        "train_tokens": len(train_ids), "epochs": round(result.tokens_seen / len(train_ids), 3)},
             "total_wall_time_s": round(time.monotonic() - t_start, 1), "init_from": args.init_from}
    out = save_trained(model, args.out, tok, result, tcfg, extra)
    counts = [0] * tok.vocab_size
    for t in train_ids:
        counts[t] += 1
    write_unigram_counts(out, tok, counts)
    print(f"saved {out} after {result.steps} steps, {result.tokens_seen:,} tokens, "
          f"{result.wall_time_s / 60:.1f} min; train loss {result.final_train_loss:.3f}, "
          f"held-out loss {result.final_eval_loss:.3f}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from coel_model.evaluate import run_eval
    torch.set_num_threads(args.threads)
    res = run_eval(args.model, args.reference, args.split, args.max_tokens)
    if args.routing:
        from coel_model import corpus
        from coel_model.checkpoint import load_model
        from coel_model.evaluate import find_tokenizer, base_model_dir, routing_stats
        tok = find_tokenizer(args.model, base_model_dir(args.model), args.reference)
        ids = tok.encode_documents(corpus.split_texts(args.split))
        res["routing"] = routing_stats(load_model(args.model), ids[:args.max_tokens] if args.max_tokens else ids)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{res['model']} on {res['split']} ({res['tokens']:,} tokens): perplexity {res['perplexity']:.3f} "
          f"(unigram baseline {res['unigram_perplexity']:.2f}, ratio "
          f"{res['perplexity'] / res['unigram_perplexity']:.3f}); expert bytes {res['expert_bytes']:,}")
    if "top1_agreement" in res:
        print(f"top-1 agreement with {res['reference']}: {res['top1_agreement']:.4f}")
    for layer in res.get("routing", {}).get("layers", []):
        print(f"layer {layer['layer']}: H/logE {layer['normalised_entropy']:.3f}  popularity "
              + " ".join(f"{p:.3f}" for p in layer["popularity"]))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from coel_model.checkpoint import load_model
    from coel_model.evaluate import base_model_dir, find_tokenizer
    from coel_model.generate import generate
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    tok = find_tokenizer(args.model, base_model_dir(args.model))
    prompt = tok.encode(args.prompt)
    stamps: list[int] = []
    streamed: list[int] = []

    def on_token(step: int, token: int) -> None:
        stamps.append(time.perf_counter_ns())
        if not args.json:
            if step == 0:  # the prompt once generate has accepted it
                sys.stdout.write(args.prompt)
            streamed.append(token)
            # decode the whole tail so multi-byte characters split across tokens print correctly
            text = tok.decode(streamed)
            prev = tok.decode(streamed[:-1])
            sys.stdout.write(text[len(prev):])
            sys.stdout.flush()

    t0 = time.perf_counter_ns()
    out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, on_token=on_token)
    prefill_ms = (stamps[0] - t0) / 1e6 if stamps else 0.0
    decode_ms = ((stamps[-1] - stamps[0]) / 1e6 / (len(stamps) - 1)) if len(stamps) > 1 else prefill_ms
    if args.json:
        print(json.dumps({"tokens": out, "text": tok.decode(out), "prompt_tokens": prompt,
                          "ms_per_token": round(decode_ms, 3), "prefill_ms": round(prefill_ms, 3)}))
    else:
        sys.stdout.write("\n")
        print(f"[{len(out)} tokens, {decode_ms:.1f} ms/token, prefill {prefill_ms:.1f} ms]", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from coel_model.checkpoint import load_model
    path = Path(args.model)
    model = load_model(path)
    cfg = model.cfg
    counts = cfg.param_counts()
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    info = {"model": str(path), "config": cfg.to_dict(), "param_counts": counts,
            "expert_fraction": round(counts["experts"] / counts["total"], 4),
            "expert_params_each": cfg.expert_params(), "expert_bytes": model.expert_bytes(),
            "files_bytes": files}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{path}: {cfg.n_layers} layers x {cfg.n_experts} experts (top-{cfg.top_k}), d_model {cfg.d_model}, "
          f"expert_hidden {cfg.expert_hidden}, {cfg.n_heads} heads / {cfg.n_kv_heads} kv, vocab {cfg.vocab_size}")
    print(f"parameters: total {counts['total']:,} = experts {counts['experts']:,} "
          f"({info['expert_fraction']:.1%}) + backbone {counts['backbone']:,}; "
          f"active per token {counts['active_per_token']:,}")
    print(f"expert bytes in memory: {info['expert_bytes']:,}; files: "
          + ", ".join(f"{k} {v:,} B" for k, v in files.items()))
    return 0
