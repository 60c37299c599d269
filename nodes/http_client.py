"""The HTTP workload client (`coel http-client`): the same workload as nodes.client, sent through an
entry's OpenAI-compatible API with the official `openai` package, as serving benchmarks do.

Each request is a streamed /v1/completions call whose prompt is the token ids the native client
would send (so both clients load the entry identically); TTFT and time per output token come
from the arrival times of the streamed chunks (one chunk per token), and every request becomes
the same "request" span as the native client's (ok, ttft_ms, tpot_ms, prompt_tokens, new_tokens,
class, entry, client; plus api="openai"), so run reports read both alike. A request that fails is
lost (never retried).

Emulated link delay (testbed mode "emulated": no netem, see nodes.delayqueue): the HTTP bytes are
not held by our transport, so the client applies the path delay itself: the request leaves after
the one-way delay, and each chunk counts as arrived one one-way delay after it was read.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlparse

from coel_model.errors import ConfigError
from nodes.client import ClientConfig, add_workload_args, client_arrivals, config_from_args, run_until_signalled
from nodes.workload import Arrival, PromptSource, percentile


async def _run(cfg: ClientConfig, served_model: str | None, delay: Any, stop: Any, tokenizer: Any) -> dict[str, Any]:
    import openai
    tracer = None
    if cfg.trace_path:
        from common.tracing import TraceWriter
        tracer = TraceWriter(cfg.trace_path, cfg.name)
    host = urlparse(cfg.entry).hostname or ""
    client = openai.AsyncOpenAI(base_url=cfg.entry, api_key="coel", max_retries=0, timeout=cfg.request_timeout_s)
    results: dict[str, Any] = {"sent": 0, "ok": 0, "lost": 0, "ttft_ms": [], "tpot_ms": []}
    try:
        model = served_model
        if model is None:  # the one model the entry serves
            model = (await client.models.list()).data[0].id
        prompts = PromptSource(cfg.prompts_path, cfg.seed, tokenizer)
        arrivals = client_arrivals(cfg)

        def one_way_ns(nbytes: int) -> int:
            if delay is None:
                return 0
            now = time.monotonic_ns()
            return max(0, delay.hold_until_ns(host, now, nbytes) - now)

        async def request(a: Arrival) -> None:
            trace_id = f"{cfg.name}-{uuid.uuid4().hex[:12]}"
            ids = prompts.ids(a.prompt_tokens)
            t0 = time.monotonic_ns()
            token_ns: list[int] = []
            attrs: dict[str, Any] = {"ok": False, "prompt_tokens": len(ids), "class": cfg.slo_class,
                                     "entry": cfg.entry, "client": cfg.name, "api": "openai"}
            usage = None
            try:
                up = one_way_ns(8 * len(ids) + 200)
                if up:
                    await asyncio.sleep(up / 1e9)
                stream = await client.completions.create(
                    model=model, prompt=ids, max_tokens=a.max_new_tokens, temperature=cfg.temperature, stream=True,
                    stream_options={"include_usage": True}, extra_headers={"X-Request-Id": trace_id})
                async for chunk in stream:
                    now = time.monotonic_ns()
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if chunk.choices and chunk.choices[0].finish_reason is None:
                        token_ns.append(now + one_way_ns(300))
                attrs["ok"] = True
            except asyncio.CancelledError:
                attrs["error"] = f"not finished within the drain time ({cfg.drain_s:.0f} s after the last arrival window)"
            except openai.APIStatusError as exc:
                attrs["error"] = f"HTTP {exc.status_code}: {str(exc)[:250]}"
            except (openai.APIError, OSError) as exc:
                attrs["error"] = f"{type(exc).__name__}: {str(exc)[:250]}"
            attrs["new_tokens"] = usage.completion_tokens if usage is not None else len(token_ns)
            if token_ns:
                attrs["ttft_ms"] = round((token_ns[0] - t0) / 1e6, 3)
                results["ttft_ms"].append(attrs["ttft_ms"])
            if len(token_ns) > 1:
                attrs["tpot_ms"] = round((token_ns[-1] - token_ns[0]) / 1e6 / (len(token_ns) - 1), 3)
                results["tpot_ms"].append(attrs["tpot_ms"])
            results["ok" if attrs["ok"] else "lost"] += 1
            if tracer is not None:
                tracer.span(trace_id, "request", t0, time.monotonic_ns(), **attrs)

        loop = asyncio.get_running_loop()
        t_start = loop.time()
        tasks: list[asyncio.Task] = []
        stopped = (lambda: stop is not None and stop.is_set())  # noqa: E731  (SIGTERM / SIGINT)
        for a in arrivals:
            while not stopped() and loop.time() < t_start + a.t_s:
                await asyncio.sleep(min(0.2, t_start + a.t_s - loop.time()))
            if stopped():
                break
            tasks.append(asyncio.create_task(request(a)))
            results["sent"] += 1
        end = t_start + cfg.duration_s + cfg.drain_s
        pending = set(tasks)
        while pending and not stopped() and loop.time() < end:
            _, pending = await asyncio.wait(pending, timeout=min(0.2, max(0.0, end - loop.time())))
        for t in pending:  # lost: not finished within the drain time (or the client was stopped)
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
    finally:
        await client.close()
        if tracer is not None:
            tracer.close()
    return {"client": cfg.name, "api": "openai", "sent": results["sent"], "ok": results["ok"],
            "lost": results["lost"], "ttft_ms_p50": percentile(results["ttft_ms"], 50),
            "ttft_ms_p95": percentile(results["ttft_ms"], 95), "tpot_ms_p50": percentile(results["tpot_ms"], 50),
            "tpot_ms_p95": percentile(results["tpot_ms"], 95)}


def run_http_client(cfg: ClientConfig, served_model: str | None = None, delay: Any = None, stop: Any = None,
                    tokenizer: Any = None) -> dict[str, Any]:
    """Drive the workload against cfg.entry (an http://HOST:PORT/v1 base URL); returns a summary."""
    if not cfg.entry.startswith(("http://", "https://")):
        raise ConfigError(f"client {cfg.name}: --base-url {cfg.entry!r} must be an http:// URL, "
                          f"e.g. http://10.0.0.4:8000/v1")
    tok = tokenizer
    if tok is None:
        if not cfg.model_dir:
            raise ConfigError(f"client {cfg.name}: --model is needed to cut prompts of exact token counts")
        from coel_model.tokenizer import Tokenizer
        tok = Tokenizer.load(cfg.model_dir)
    return asyncio.run(_run(cfg, served_model, delay, stop, tok))


def add_http_client_args(p: argparse.ArgumentParser) -> None:
    add_workload_args(p)
    p.add_argument("--base-url", required=True, help="the entry's API, e.g. http://10.0.0.4:8000/v1")
    p.add_argument("--served-model", default=None, help="model id to request (default: the entry's, from /v1/models)")
    p.add_argument("--model", required=True, help="checkpoint whose tokenizer cuts the prompts")


def cmd_http_client(args: argparse.Namespace) -> int:
    from nodes.delayqueue import delay_hook_from_env
    cfg = config_from_args(args, args.base_url)
    return run_until_signalled(lambda stop: run_http_client(cfg, args.served_model,
                                                            delay_hook_from_env(args.delay_file), stop))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nodes.http_client")
    add_http_client_args(ap)
    return cmd_http_client(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
