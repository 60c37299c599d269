"""`coel agent`, `coel keys` and `coel serve-local`: the nodes room's commands."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coel_model.errors import ConfigError


def cmd_keys(args: argparse.Namespace) -> int:
    from nodes.security import make_keys
    out = make_keys(args.out, overwrite=args.force)
    print(f"wrote server and client CURVE keypairs to {out} (authorized clients: {out / 'authorized'})")
    return 0


def _sigterm_as_interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # unwinds through LocalCluster.__exit__, which stops every agent


def cmd_serve_local(args: argparse.Namespace) -> int:
    import signal

    from nodes.local import ServeLocalConfig, serve_local
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    import torch
    torch.set_num_threads(args.threads)  # the coordinator shares the cores with its agents
    if args.http is None and args.prompt is None:
        raise ConfigError("serve-local needs --prompt (generate once) or --http HOST:PORT (serve the HTTP API)")
    cfg = ServeLocalConfig(model_dir=args.model, prompt=args.prompt or "", max_new_tokens=args.max_new_tokens,
                           n_agents=args.agents, plan_path=args.plan, bits=args.bits,
                           compression=args.compression, secure=not args.insecure,
                           memory_mb=args.memory_mb, trace_out=args.trace_out, call_timeout_s=args.timeout_s,
                           replicas=args.replicas, threads=args.threads)
    if args.http is not None:
        from nodes.local import serve_local_http
        try:
            serve_local_http(cfg, args.http, on_ready=lambda url: print(
                f"serving the OpenAI-compatible API at {url} (model {Path(args.model).resolve().name}); "
                f"/health and /metrics at {url[:-3]}; Ctrl-C stops", flush=True))
        except KeyboardInterrupt:
            pass
        return 0
    result = serve_local(cfg)
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"] if result.get("text") is not None else result["tokens"])
        print(f"{len(result['tokens'])} tokens, {result['ms_per_token']:.2f} ms/token, "
              f"{result['bytes_on_wire']} bytes on the wire", file=sys.stderr)
    return 0


def register(sub) -> None:
    from nodes.agent import add_agent_args, cmd_agent
    p = sub.add_parser("agent", help="run a node agent serving expert shards")
    add_agent_args(p)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("keys", help="create CURVE keypairs (server, client) and authorized/")
    p.add_argument("--out", required=True, help="key directory to create")
    p.add_argument("--force", action="store_true", help="replace existing keys")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("serve-local", help="start N agents + a coordinator on 127.0.0.1 and generate")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--prompt", default=None, help="prompt text to generate from once (needed without --http)")
    p.add_argument("--http", default=None, metavar="HOST:PORT",
                   help="instead of one generation, serve the OpenAI-compatible HTTP API here until Ctrl-C")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the coordinator and of each agent")
    p.add_argument("--replicas", type=int, default=1, help="holders per expert (round-robin)")
    p.add_argument("--plan", default=None, help="plan JSON with a placement (default: round-robin)")
    p.add_argument("--bits", type=int, default=16, help="expert bits when no plan gives them")
    p.add_argument("--compression", default=None,
                   help="activation/token compression, e.g. 'act=fp16' or a JSON object")
    p.add_argument("--memory-mb", type=float, default=0, help="per-agent budget (0 = just enough)")
    p.add_argument("--insecure", action="store_true", help="no CURVE (default: temporary keys)")
    p.add_argument("--timeout-s", type=float, default=5.0, help="per expert call before failover")
    p.add_argument("--trace-out", default=None, help="coordinator spans (JSONL)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_serve_local)

    # runtime commands: the entry service and the workload client
    from nodes.client import add_client_args, cmd_client
    from nodes.entry import add_entry_args, cmd_entry
    p = sub.add_parser("entry", help="run an entry service: backbone here, experts on the agents, streams tokens")
    add_entry_args(p)
    p.set_defaults(func=cmd_entry)
    p = sub.add_parser("client", help="send Poisson arrivals of held-out prompts to an entry; one span per request")
    add_client_args(p)
    p.set_defaults(func=cmd_client)
    from nodes.http_client import add_http_client_args, cmd_http_client
    p = sub.add_parser("http-client", help="the same workload through an entry's OpenAI-compatible API "
                                           "(the openai package, streamed completions)")
    add_http_client_args(p)
    p.set_defaults(func=cmd_http_client)
