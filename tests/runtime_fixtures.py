"""Shared helpers of the runtime tests: a tiny model on disk, a synthetic profile, a loopback
topology, CURVE keys, and process start/stop that always cleans up."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SERVERS = ("a1", "a2", "a3")

TOPOLOGY = """
name: loop-3
agent_overhead_mb: 700
link_defaults: {{bw_mbit: 1000, delay_ms: 0.5}}
sites:
  - {{name: s, kind: edge}}
  - {{name: users, kind: user}}
servers:
  - {{name: a1, site: s, memory_mb: {m1}, cpu_share: 0.3}}
  - {{name: a2, site: s, memory_mb: {m2}, cpu_share: 0.3}}
  - {{name: a3, site: s, memory_mb: {m3}, cpu_share: 0.3}}
controller: {{name: ctl, site: s}}
clients:
  - name: u1
    site: users
    entry: a1
    workload: {{rate_rps: 2, prompt_tokens: 8, max_new_tokens: 6, slo_ttft_ms: 5000, slo_tpot_ms: 2000, slo_class: interactive}}
switches:
  - {{name: hub, site: s}}
links:
  - {{a: a1, b: hub}}
  - {{a: a2, b: hub}}
  - {{a: a3, b: hub}}
  - {{a: ctl, b: hub}}
  - {{a: u1, b: hub}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_cfg():
    from coel_model.config import MoEConfig
    return MoEConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=8, top_k=2,
                     expert_hidden=128, max_seq_len=128, bos_token_id=-1, eos_token_id=-1)


def make_setup(tmp: Path, memory_mb=(0.2, 0.2, 0.2)) -> dict:
    """Model dir (fp16), profile JSON, topology YAML, keys."""
    from coel_model.checkpoint import save_model
    from coel_model.model import MoEModel, init_weights
    from controller.profile import synthetic_profile
    from nodes.security import make_keys
    cfg = tiny_cfg()
    model = MoEModel(cfg)
    init_weights(model, seed=3)
    mdir = tmp / "model"
    save_model(model, mdir, dtype=torch.float16)
    from coel_model.corpus import split_texts
    from coel_model.tokenizer import train_tokenizer
    train_tokenizer(split_texts("heldout")[:20], vocab_size=cfg.vocab_size).save(mdir)
    prof = synthetic_profile(cfg, seed=1)
    (tmp / "profile.json").write_text(json.dumps(prof.to_dict()))
    (tmp / "topo.yaml").write_text(TOPOLOGY.format(m1=memory_mb[0], m2=memory_mb[1], m3=memory_mb[2]))
    keys = make_keys(tmp / "keys")
    return {"model": str(mdir), "profile": str(tmp / "profile.json"), "topology": str(tmp / "topo.yaml"),
            "keys": str(keys), "tmp": tmp, "memory_mb": tuple(memory_mb)}


class Procs:
    """Started processes, stopped (SIGTERM, then SIGKILL) in reverse order even on failure."""

    def __init__(self):
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], log_dir: Path, env_extra: dict | None = None) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for k in ("COEL_LINKEMU_FILE", "COEL_DELAY_FILE"):
            env.pop(k, None)
        env.update(env_extra or {})
        log = open(log_dir / f"{name}.log", "w")
        p = subprocess.Popen([sys.executable, *args], cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = p
        return p

    def kill(self, name: str) -> None:
        p = self.procs[name]
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def stop_all(self) -> None:
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 8
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def start_cluster(procs: Procs, setup: dict, *, static: bool = False, replan_interval_s: float | None = None,
                  extra_ctl: list[str] | None = None, delay_files: dict[str, str] | None = None,
                  extra_entry: list[str] | None = None, compression: bool = False) -> dict:
    """Controller, agents a1-a3 and an entry on a1. delay_files: server -> nodes.delayqueue file
    its agent reads (COEL_DELAY_FILE), to emulate a slower link into that agent."""
    tmp = setup["tmp"]
    ctl_ep = f"tcp://127.0.0.1:{free_port()}"
    control = f"ipc://{tmp}/control.sock"
    raw = tmp / "raw"
    raw.mkdir(exist_ok=True)
    args = ["-m", "controller.service", "--topology", setup["topology"], "--model", setup["model"],
            "--profile", setup["profile"], "--strategy", "coel", "--listen", ctl_ep, "--control", control,
            "--keys", setup["keys"], "--expect-agents", ",".join(SERVERS), "--expect-entries", "a1",
            "--heartbeat-s", "0.2", "--trace", str(raw / "ctl-controller.jsonl"), "--register-timeout-s", "60",
            *([] if compression else ["--no-compression"]),  # off: entries send fp32 (token-exact tests)
            # loopback on a shared 2-core machine: scheduling hiccups of several ms are not link changes
            "--bw-drop-ratio", "0.05", "--rtt-rise-min-ms", "50",
            # these tests exercise inter-server mechanics: the quality objective spreads the experts
            # over a1-a3 (the latency objective may keep them all next to the entry)
            "--objective", "quality"]
    if static:
        args.append("--static")
    if replan_interval_s:
        args += ["--replan-interval-s", str(replan_interval_s)]
    args += extra_ctl or []
    procs.start("controller", args, tmp)
    agents = {}
    for s, mem in zip(SERVERS, setup["memory_mb"]):
        ep = f"tcp://127.0.0.1:{free_port()}"
        agents[s] = ep
        procs.start(f"agent-{s}", ["-m", "nodes.agent", "--endpoint", ep, "--memory-mb", str(mem), "--threads", "1",
                                   "--controller", ctl_ep, "--keys", setup["keys"], "--name", s,
                                   "--heartbeat-s", "0.2", "--trace-out", str(raw / f"{s}-agent.jsonl")], tmp,
                    {"COEL_DELAY_FILE": (delay_files or {})[s]} if s in (delay_files or {}) else None)
    entry_ep = f"tcp://127.0.0.1:{free_port()}"
    procs.start("entry-a1", ["-m", "nodes.entry", "--name", "a1", "--listen", entry_ep, "--controller", ctl_ep,
                             "--model", setup["model"], "--keys", setup["keys"], "--call-timeout-s", "1.0",
                             "--trace", str(raw / "a1-entry.jsonl"), *(extra_entry or [])], tmp)
    return {"controller": ctl_ep, "control": control, "agents": agents, "entry": entry_ep, "raw": raw}


def wait_serving(control: str, procs: Procs, timeout_s: float = 60.0) -> dict:
    from controller.api import ControlClient, ControlError
    deadline = time.monotonic() + timeout_s
    with ControlClient(control, timeout_s=2.0) as cc:
        last = None
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in procs.procs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"processes exited early: {dead}")
            try:
                last = cc.call("STATUS")
                if last["state"] == "serving":
                    return last
                if last["state"] == "failed":
                    raise RuntimeError(f"controller failed: {last['error']}")
            except ControlError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"controller not serving after {timeout_s} s; last status {last}")


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "event" in rec:
            out.append(rec)
    return out


def generate_remote(entry: str, keys_dir: str, prompt: list[int], max_new_tokens: int, timeout_s: float = 60.0,
                    req_id: int = 1) -> tuple[list[int], dict]:
    """One GENERATE to an entry: (tokens, final message body); raises on ERROR or timeout."""
    import zmq
    from nodes import protocol as P
    from nodes.security import load_keys, secure_client
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    secure_client(s, load_keys(keys_dir))
    s.connect(entry)
    try:
        s.send_multipart(P.encode(P.MsgType.GENERATE, req_id, {"max_new_tokens": max_new_tokens},
                                  {"prompt": torch.tensor(prompt, dtype=torch.int64)}, src="test"))
        toks = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not s.poll(200):
                continue
            m = P.decode(s.recv_multipart())
            if m.type == P.MsgType.TOKEN:
                toks.append(m.body["token"])
            elif m.type == P.MsgType.DONE:
                return toks, m.body
            elif m.type == P.MsgType.ERROR:
                raise RuntimeError(f"entry answered ERROR: {m.body}")
        raise TimeoutError(f"no DONE within {timeout_s} s ({len(toks)} tokens so far)")
    finally:
        s.close(0)


def reference_tokens(model_dir: str, plan: dict, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Single-process generate with every expert quantized as the plan says (what the agents hold)."""
    from coel_model import quant
    from coel_model.checkpoint import load_model
    from coel_model.generate import generate
    model = load_model(model_dir)
    for l, row in enumerate(plan["bits"]):
        for e, b in enumerate(row):
            if b < 16:
                model.set_expert(l, e, quant.quantize_expert(model.expert(l, e), quant.QuantSpec(bits=b)))
    return generate(model, prompt, max_new_tokens)
