"""Packed-expert matmul speed: time per bit width vs fp32 / bf16, and bytes/s vs memory bandwidth;
plus the reconstruction error of the quantization methods (rtn, hqq, gptq) at 2-4 bits.

One SwiGLU expert forward (gate, up, down) per measurement, for the bundled model's expert shape
and Mixtral-8x7B's (d 4096, hidden 14336), at batch 1 (decode: bandwidth bound) and batch 32.
The memory read bandwidth is measured in the same run (sum over a large tensor), so the
"% of bandwidth" column compares like with like on a machine that others may be sharing.
Mixtral-sized packed weights are random bit patterns (every pattern is a valid code; speed does
not depend on the values); each format's output is checked against dequantize-then-matmul.

    .venv/bin/python benchmarks/quant_kernels.py [--json-out FILE | --json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coel_model import kernels, packing, quant  # noqa: E402
from coel_model.model import SwiGLUExpert  # noqa: E402

MIXTRAL = ("mixtral-8x7b", 4096, 14336)
CACHE_RESIDENT_BYTES = 8 << 20  # below this an expert's weights stay in L2/L3 between calls


MODEL_DIR = ROOT / "models" / "tiny-moe"  # --model overrides


def bundled_shape() -> tuple[str, int, int]:
    """The bundled model's expert shape: from the model folder if present, else the training default."""
    cfg_path = MODEL_DIR / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        return f"bundled {cfg['d_model']}x{cfg['expert_hidden']}", int(cfg["d_model"]), int(cfg["expert_hidden"])
    from coel_model.train import default_model_config
    cfg = default_model_config()
    return f"bundled {cfg.d_model}x{cfg.expert_hidden}*", cfg.d_model, cfg.expert_hidden


def routed_inputs(model, token_ids: list[int], layers: list[int], window: int = 256) -> dict:
    """(layer, expert) -> the MoE inputs (n, d) of the tokens routed to that expert."""
    n = len(token_ids) // window * window
    tokens = torch.tensor(token_ids[:n]).view(-1, window)
    hs, groups = {}, {}
    hooks = [model.layers[l].post_attn_norm.register_forward_hook(
        lambda m, i, o, l=l: hs.__setitem__(l, o.reshape(-1, o.shape[-1]))) for l in layers]

    def observer(layer, routing):
        if layer in layers:
            groups[layer] = routing.groups
    try:
        with torch.no_grad():
            model(tokens, observer=observer)
    finally:
        for h in hooks:
            h.remove()
    return {(l, e): hs[l].index_select(0, tok) for l in layers for e, (tok, _slot) in groups[l].items()}


def timeit(fn, reps: int, min_s: float = 0.0) -> dict:  # noqa: D103 (used by memory_bandwidth)
    """Median (and min) wall time in ms over `reps` calls after one warm-up call."""
    fn()
    ts = []
    t_end = time.perf_counter() + min_s
    while len(ts) < reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "reps": len(ts)}


def memory_bandwidth(mib: int, reps: int) -> dict:
    """Memory bandwidth in GB/s over a buffer far larger than the caches, by several probes, each
    its best of `reps` (the machine may be shared): float sum, int64 sum, copy (read + write) and an
    fp32 matrix-vector product (the bandwidth-bound op decode is made of). read_gbs = the highest
    read probe, so the "% of bandwidth" of the kernels is the conservative figure."""
    n = mib * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    mat = src.view(8192, -1)
    vec = torch.ones(mat.shape[1])
    nbytes = n * 4
    probes = {"sum_f32": timeit(lambda: src.sum(), reps), "sum_i64": timeit(lambda: src.view(torch.int64).sum(), reps),
              "mv_f32": timeit(lambda: torch.mv(mat, vec), reps)}
    out = {"buffer_mib": mib, **{f"{k}_gbs": nbytes / t["min_ms"] / 1e6 for k, t in probes.items()}}
    out["copy_gbs"] = 2 * nbytes / timeit(lambda: dst.copy_(src), reps)["min_ms"] / 1e6
    out["read_gbs"] = max(out[f"{k}_gbs"] for k in probes)
    return out


def random_packed_expert(spec: quant.QuantSpec, d: int, h: int, gen: torch.Generator) -> quant.QuantizedExpert:
    """A valid QuantizedExpert with random codes and plausible scales/zeros (fast for huge shapes)."""
    dims = {"w_gate": (h, d), "w_up": (h, d), "w_down": (d, h)}
    t = {}
    for p, (o, i) in dims.items():
        for name, (shape, dtype) in packing.packed_shapes(o, i, spec).items():
            if name == "scales":
                v = (torch.rand(shape, generator=gen) * 0.004 + 0.001).half()
            elif name == "zeros":
                v = (torch.rand(shape, generator=gen) * ((1 << spec.bits) - 1)).half()
            elif dtype == torch.float16:
                v = (torch.randn(shape, generator=gen) * 0.02).half()
            elif dtype == torch.uint8:
                v = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
            else:
                info = torch.iinfo(dtype)
                v = torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)
            t[f"{p}.{name}"] = v
    return quant.QuantizedExpert.from_tensors(spec, d, h, t)


def check_rows(q: quant.QuantizedExpert, x: torch.Tensor, rows: int = 64) -> float:
    """Max relative error of the kernel's gate projection vs dequantize-then-matmul (first rows)."""
    lin = q.w_gate
    y = lin(x)[:, :rows]
    if q.spec.bits == 16:
        w = lin.weight[:rows].float()
    else:
        w = kernels._dequant_rows_torch(lin.tensors(), q.spec.bits, q.spec.group_size, 0, rows)
        w = w[:, : lin.in_features]
    ref = x @ w.T
    return float((y - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def round_robin(fns: dict, reps: int) -> dict:
    """Median/min ms per callable, timed in interleaved rounds (one call of each per round, after a
    warm-up round), so load from other processes hits every candidate alike."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3, "reps": len(v)}
            for k, v in ts.items()}


def bench_shape(label: str, d: int, h: int, batches: list[int], bits_list: list[int], reps: int,
                real_weights: bool, with_fallback: bool, threads: int, probe_mib: int = 0) -> tuple[list[dict], dict]:
    """One expert forward per candidate format, timed round-robin. With probe_mib, an fp32
    matrix-vector product over that many MiB joins every round as the bandwidth reference."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    fp = SwiGLUExpert(d, h).eval()
    for p in fp.parameters():
        p.requires_grad_(False)
    bf = SwiGLUExpert(d, h).eval()
    bf.load_state_dict(fp.state_dict())
    bf = bf.to(torch.bfloat16)
    experts = {}
    for bits in bits_list:
        spec = quant.QuantSpec(bits, 64)
        experts[bits] = (quant.quantize_expert(fp, spec) if real_weights
                         else random_packed_expert(spec, d, h, gen))
    i8 = {}
    if hasattr(torch, "_weight_int8pack_mm"):  # torch's own packed CPU kernel (per-channel int8)
        for p in quant.PROJ_NAMES:
            o, i = getattr(fp, p).weight.shape
            i8[p] = (torch.randint(-127, 128, (o, i), generator=gen, dtype=torch.int8),
                     torch.rand(o, generator=gen) * 1e-3 + 1e-4)
    probe = None
    if probe_mib:
        mat = torch.ones(8192, probe_mib * (1 << 20) // 4 // 8192)
        vec = torch.ones(mat.shape[1])
        probe = (mat, vec)
    rows, bws = [], {}
    for n in batches:
        x = torch.randn(n, d, generator=gen)
        xb = x.bfloat16()
        cand = {"fp32 torch": (fp.nbytes, lambda: fp(x), None),
                "bf16 torch": (fp.nbytes // 2, lambda: bf(xb), None)}
        for bits, q in experts.items():
            name = "fp16 ours" if bits == 16 else f"int{bits} g64 ours"
            cand[name] = (q.nbytes, (lambda q=q: q(x)), check_rows(q, x))
        if i8:
            mm8 = torch._weight_int8pack_mm
            cand["int8 torch int8pack_mm"] = (
                sum(w.numel() + 4 * sc.numel() for w, sc in i8.values()),
                lambda: mm8(F.silu(mm8(x, *i8["w_gate"])) * mm8(x, *i8["w_up"]), *i8["w_down"]), None)
        if with_fallback and 4 in experts:
            q4 = experts[4]

            def fallback():
                t = [getattr(q4, p) for p in quant.PROJ_NAMES]
                mm = lambda lin, v: kernels.qmatmul(v, lin.tensors(), 4, 64, lin.in_features,  # noqa: E731
                                                    lin.out_features, force="torch")
                return mm(t[2], F.silu(mm(t[0], x)) * mm(t[1], x))
            cand["int4 g64 torch fallback"] = (q4.nbytes, fallback, None)
        fns = {k: v[1] for k, v in cand.items()}
        if probe is not None:
            fns["_probe"] = lambda: torch.mv(*probe)
        times = round_robin(fns, reps)
        bw_gbs = None
        if probe is not None:
            bw_gbs = probe[0].numel() * 4 / times["_probe"]["median_ms"] / 1e6
            bws[n] = {"probe": f"fp32 mv over {probe_mib} MiB, same rounds", "read_gbs": bw_gbs,
                      "read_gbs_best": probe[0].numel() * 4 / times["_probe"]["min_ms"] / 1e6}
        base = times["fp32 torch"]["median_ms"]
        for fmt, (nbytes, _fn, err) in cand.items():
            t = times[fmt]
            gbs = nbytes / t["median_ms"] / 1e6
            rows.append({"shape": label, "d_model": d, "hidden": h, "batch": n, "threads": threads, "format": fmt,
                         "weight_bytes": nbytes, "median_ms": round(t["median_ms"], 4),
                         "min_ms": round(t["min_ms"], 4), "speedup_vs_fp32": base / t["median_ms"],
                         "weight_gbs": gbs, "max_rel_err": err,
                         # weights that fit the caches are not read from memory: no bandwidth figure
                         "pct_of_read_bw": (100 * gbs / bw_gbs if bw_gbs and nbytes > CACHE_RESIDENT_BYTES
                                            else None)})
    return rows, bws


def method_errors(bits_list: list[int], seed: int = 0) -> dict:
    """Weight and output reconstruction error of rtn / hqq / gptq on expert weights.
    With the bundled model (--model, with its tokenizer): real experts of the first and last layer,
    each fed the tokens the router sends it (calib split to calibrate GPTQ, heldout split to
    measure); otherwise heavy-tailed synthetic weights and correlated activations with outlier
    channels. Errors are relative Frobenius norms, averaged over the experts."""
    g = torch.Generator().manual_seed(seed)
    model_dir = MODEL_DIR
    pairs = None
    if (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists():
        from coel_model.checkpoint import load_model
        from coel_model.corpus import split_texts
        from coel_model.tokenizer import Tokenizer
        model = load_model(model_dir)
        tok = Tokenizer.load(model_dir / "tokenizer.json")
        layers = sorted({0, model.cfg.n_layers - 1})
        calib = routed_inputs(model, tok.encode_documents(split_texts("calib"))[:8192], layers)
        held = routed_inputs(model, tok.encode_documents(split_texts("heldout"))[:8192], layers)
        keys = [(l, e) for l in layers for e in range(min(4, model.cfg.n_experts))
                if (l, e) in calib and (l, e) in held]
        pairs = [(model.expert(l, e), calib[(l, e)], held[(l, e)]) for (l, e) in keys]
        source = (f"{model_dir} (real weights): experts {keys}, inputs = the tokens the router sends "
                  f"them, calib split for calibration, heldout split for the error")
    if pairs is None:
        label, d, hid = bundled_shape()
        chan = torch.exp(torch.randn(d, generator=g))
        mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d ** 0.5
        h = (torch.randn(1024, d, generator=g) @ mix) * chan
        experts = []
        for _ in range(4):
            e = SwiGLUExpert(d, hid)
            with torch.no_grad():
                for p in e.parameters():
                    p.copy_(torch.distributions.StudentT(3.0).sample(p.shape) * 0.02)
            experts.append(e)
        source = f"synthetic {label} shape: Student-t(3) weights, correlated activations with outlier channels"
        perm = torch.randperm(h.shape[0], generator=g)
        pairs = [(e, h[perm[: h.shape[0] // 2]], h[perm[h.shape[0] // 2:]]) for e in experts]
    rows = []
    for bits in [b for b in bits_list if b <= 4]:
        for method in ("rtn", "hqq", "gptq"):
            werr, oerr, t = [], [], 0.0
            for exp, calib, held in pairs:
                t0 = time.perf_counter()
                q = quant.quantize_expert(exp, quant.QuantSpec(bits, 64, method), calib_x=calib)
                t += time.perf_counter() - t0
                w = exp.w_gate.weight.detach()
                werr.append(float((q.w_gate.dequantize() - w).norm() / w.norm()))
                with torch.no_grad():
                    ref = exp(held)
                    oerr.append(float((q(held) - ref).norm() / ref.norm()))
            rows.append({"bits": bits, "method": method, "weight_rel_err": statistics.mean(werr),
                         "expert_out_rel_err": statistics.mean(oerr), "quantize_s_per_expert": t / len(pairs)})
    return {"source": source, "group_size": 64, "rows": rows}


def fmt_errors(err: dict) -> str:
    out = [f"source: {err['source']} (group {err['group_size']})",
           "| bits | method | gate weight rel err | expert output rel err (held-out) | vs rtn | quantize s/expert |",
           "|------|--------|---------------------|----------------------------------|--------|-------------------|"]
    rtn = {r["bits"]: r["expert_out_rel_err"] for r in err["rows"] if r["method"] == "rtn"}
    for r in err["rows"]:
        out.append(f"| {r['bits']:>4} | {r['method']:<6} | {r['weight_rel_err']:>19.4f} | "
                   f"{r['expert_out_rel_err']:>32.4f} | {r['expert_out_rel_err'] / rtn[r['bits']]:>6.2f} | "
                   f"{r['quantize_s_per_expert']:>17.3f} |")
    return "\n".join(out)


def fmt_table(rows: list[dict]) -> str:
    head = (f"| {'shape':<22} | {'batch':>5} | {'thr':>3} | {'format':<24} | {'weights MB':>10} | {'ms (median)':>11} | "
            f"{'x fp32':>7} | {'GB/s':>6} | {'% read BW':>9} | {'max rel err':>11} |")
    sep = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    out = [head, sep]
    for r in rows:
        err = "" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        pct = "cache" if r["pct_of_read_bw"] is None else f"{r['pct_of_read_bw']:.0f}"
        out.append(f"| {r['shape']:<22} | {r['batch']:>5} | {r['threads']:>3} | {r['format']:<24} | {r['weight_bytes'] / 1e6:>10.2f} | "
                   f"{r['median_ms']:>11.3f} | {r['speedup_vs_fp32']:>7.2f} | {r['weight_gbs']:>6.1f} | "
                   f"{pct:>9} | {err:>11} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    global MODEL_DIR
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch / kernel threads for the Mixtral shape "
                    "(default 2; the bundled shape always runs on 1)")
    ap.add_argument("--reps", type=int, default=7, help="timed calls per measurement (median reported)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--bits", default="2,3,4,8,16")
    ap.add_argument("--shapes", default="bundled,mixtral", help="comma list of bundled, mixtral")
    ap.add_argument("--model", default=str(MODEL_DIR), help="bundled model folder (shape and method errors)")
    ap.add_argument("--no-errors", action="store_true", help="skip the quantization-method error table")
    ap.add_argument("--quick", action="store_true", help="bundled shape only, fewer reps (smoke test)")
    ap.add_argument("--json-out", help="write the results as JSON to this file")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    MODEL_DIR = Path(args.model)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    reps = 3 if args.quick else args.reps
    t_start = time.perf_counter()
    bw = memory_bandwidth(64 if args.quick else 512, reps)
    shapes = set(args.shapes.split(","))
    unknown = shapes - {"bundled", "mixtral"}
    if unknown:
        ap.error(f"--shapes: unknown {sorted(unknown)}; choose from bundled, mixtral")
    rows = []
    if "bundled" in shapes:
        label, d, h = bundled_shape()
        # small experts run single-threaded (as the kernels do below ~1M multiply-adds): torch's
        # 2-thread fork/join on a tiny matmul measures the scheduler, not the matmul
        rows += bench_shape(label, d, h, batches, bits_list, reps * 4, True, True, 1)[0]
    bw_mix = None
    if "mixtral" in shapes and not args.quick:
        torch.set_num_threads(args.threads)
        mix_rows, bw_mix = bench_shape(MIXTRAL[0], MIXTRAL[1], MIXTRAL[2], batches, bits_list, reps,
                                       False, False, args.threads, probe_mib=512)
        rows += mix_rows
    torch.set_num_threads(args.threads)
    bw_end = memory_bandwidth(64 if args.quick else 512, reps)
    errors = None if args.no_errors else method_errors(bits_list)
    result = {"benchmark": "quant_kernels", "kernels": kernels.status(), "threads": args.threads,
              "torch": torch.__version__, "memory_bandwidth": bw, "memory_bandwidth_mixtral": bw_mix,
              "memory_bandwidth_end": bw_end,
              "load_avg": list(__import__("os").getloadavg()), "seconds": time.perf_counter() - t_start,
              "rows": rows, "method_errors": errors}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"kernels: {result['kernels']}; threads {args.threads}; torch {torch.__version__}")
        def bw_line(name: str, b: dict | None) -> None:
            if b is not None:
                print(f"memory bandwidth, {name} ({args.threads} threads, best of {reps}): "
                      f"read {b['read_gbs']:.1f} GB/s (sum f32 {b['sum_f32_gbs']:.1f}, sum i64 {b['sum_i64_gbs']:.1f}, "
                      f"mv f32 {b['mv_f32_gbs']:.1f}), copy {b['copy_gbs']:.1f} GB/s")
        bw_line("start", bw)
        bw_line("end", bw_end)
        for n, b in (bw_mix or {}).items():
            print(f"bandwidth reference for the Mixtral batch-{n} rows: {b['read_gbs']:.1f} GB/s median "
                  f"({b['read_gbs_best']:.1f} best), {b['probe']}")
        print(f"load avg {result['load_avg'][0]:.1f} at the end; run {result['seconds']:.0f} s")
        print(fmt_table(rows))
        print("Candidates are timed round-robin (one call each per round), medians reported. % read BW = weight "
              "bytes/s / the fp32 mv probe's bytes/s in the same rounds; 'cache' = weights small enough to stay "
              "cached, no bandwidth figure.")
        if errors is not None:
            print()
            print(fmt_errors(errors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
