"""The controller's configuration: a frozen ControllerConfig validated at the edge, and the
`coel controller` / `python -m controller.service` command-line options that build it."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from coel_model.errors import ConfigError
from controller import liveness as L
from controller import monitor as M
from controller.deployer import DeployConfig


@dataclass(frozen=True)
class ControllerConfig:
    topology: str
    model_dir: str
    listen: str
    control: str
    expect_agents: tuple[str, ...]
    expect_entries: tuple[str, ...] = ()
    strategy: str = "coel"
    objective: str = "latency"  # controller.plan.OBJECTIVES: what the coel strategy optimises
    profile_path: str | None = None
    keys_dir: str | None = None
    run_dir: str | None = None
    static: bool = False
    replan_interval_s: float | None = None
    trace_path: str | None = None
    register_timeout_s: float = 120.0
    compression: bool = True  # send the negotiated token compression to entries (off = fp32 passthrough)
    monitor: M.MonitorConfig = field(default_factory=M.MonitorConfig)
    liveness: L.LivenessConfig = field(default_factory=L.LivenessConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)

    def __post_init__(self) -> None:
        if not self.expect_agents:
            raise ConfigError("controller: --expect-agents lists no agent")
        if self.replan_interval_s is not None and self.replan_interval_s <= 0:
            raise ConfigError(f"--replan-interval-s must be > 0 (got {self.replan_interval_s})")
        for ep, flag in ((self.listen, "--listen"), (self.control, "--control")):
            if "://" not in ep:
                raise ConfigError(f"{flag} {ep!r} must look like tcp://IP:PORT or ipc://PATH")



def add_controller_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=None, help="run folder (for relative defaults)")
    p.add_argument("--topology", required=True, help="bundled topology name or YAML path")
    p.add_argument("--model", required=True, help="checkpoint directory (expert weights are quantized from it)")
    p.add_argument("--profile", default=None, help="coel-profile JSON (default MODEL/profile.json)")
    p.add_argument("--strategy", default="coel", help="planner strategy: coel | uniform | pipeline | offload | random")
    p.add_argument("--objective", default="latency", choices=("latency", "quality"),
                   help="what coel optimises under the SLOs and quality floor (default: latency)")
    p.add_argument("--listen", required=True, help="ROUTER endpoint for REGISTER/HEARTBEAT, e.g. tcp://10.0.0.9:7000")
    p.add_argument("--control", required=True, help="control API endpoint, e.g. ipc://RUN/control.sock")
    p.add_argument("--keys", default=None, help="CURVE key directory (default: plain text)")
    p.add_argument("--expect-agents", required=True, help="comma-separated server names")
    p.add_argument("--expect-entries", default="", help="comma-separated entry server names")
    p.add_argument("--static", action="store_true", help="keep the initial plan: monitor, never migrate")
    p.add_argument("--replan-interval-s", type=float, default=None, help="re-plan on this schedule too")
    p.add_argument("--heartbeat-s", type=float, default=0.2,
                   help="heartbeat period assumed for a peer whose REGISTER does not state one")
    p.add_argument("--suspect-after-s", type=float, default=0.5,
                   help="silence that always makes a peer suspect (earlier when its own gaps say so)")
    p.add_argument("--suspect-probe-timeout-s", type=float, default=0.3,
                   help="timeout of the direct and indirect probes of a suspect")
    p.add_argument("--indirect-probes", type=int, default=2, help="other agents asked to probe a suspect")
    p.add_argument("--rejoin-stable-s", type=float, default=0.6,
                   help="a lost peer heard again is back after this long heard on time")
    p.add_argument("--probe-interval-s", type=float, default=0.5, help="RTT + goodput probe period per agent")
    p.add_argument("--probe-window", type=int, default=3, help="recent probes compared with the baseline "
                   "(delay changes, recoveries)")
    p.add_argument("--probe-confirm", type=int, default=2, help="consecutive low-goodput probes that declare a "
                   "bandwidth drop (a suspect agent is re-probed after --probe-recheck-s)")
    p.add_argument("--probe-recheck-s", type=float, default=0.05, help="re-probe delay for an agent whose last "
                   "probe looked changed")
    p.add_argument("--probe-bytes", type=int, default=32 * 1024,
                   help="full goodput probe payload (echoed back; sent only when the quick probe looks changed)")
    p.add_argument("--quick-probe-bytes", type=int, default=48 * 1024,
                   help="payload of the every-interval quick probe (echoed back)")
    p.add_argument("--bw-drop-ratio", type=float, default=0.3, help="goodput below this x baseline triggers")
    p.add_argument("--rtt-rise-ratio", type=float, default=2.5, help="RTT above this x baseline triggers")
    p.add_argument("--rtt-rise-min-ms", type=float, default=5.0, help="... and at least this many ms above it")
    p.add_argument("--no-compression", action="store_true", help="fp32 passthrough on every link")
    p.add_argument("--register-timeout-s", type=float, default=120.0)
    p.add_argument("--trace", default=None, help="append events/spans (JSONL)")
    p.add_argument("--delay-file", default=None, help="emulated path delays (default $COEL_DELAY_FILE)")
    p.add_argument("--metrics", default=None, metavar="HOST:PORT", help="serve Prometheus GET /metrics here "
                   "(controller/metrics.py)")


def config_from_args(args: argparse.Namespace) -> ControllerConfig:
    split = lambda s: tuple(x.strip() for x in (s or "").split(",") if x.strip())  # noqa: E731
    live = L.LivenessConfig(default_period_s=args.heartbeat_s, max_suspect_s=args.suspect_after_s,
                            probe_timeout_s=args.suspect_probe_timeout_s, indirect_probes=args.indirect_probes,
                            rejoin_stable_s=args.rejoin_stable_s)
    mon = M.MonitorConfig(probe_interval_s=args.probe_interval_s,
                          probe_bytes=args.probe_bytes, probe_window=args.probe_window,
                          probe_confirm=args.probe_confirm, probe_recheck_s=args.probe_recheck_s,
                          quick_probe_bytes=args.quick_probe_bytes,
                          bw_drop_ratio=args.bw_drop_ratio,
                          rtt_rise_ratio=args.rtt_rise_ratio, rtt_rise_min_ms=args.rtt_rise_min_ms)
    return ControllerConfig(topology=args.topology, model_dir=args.model, listen=args.listen, control=args.control,
                            expect_agents=split(args.expect_agents), expect_entries=split(args.expect_entries),
                            strategy=args.strategy, objective=args.objective, profile_path=args.profile,
                            keys_dir=args.keys,
                            run_dir=args.run_dir, static=args.static, replan_interval_s=args.replan_interval_s,
                            trace_path=args.trace, register_timeout_s=args.register_timeout_s,
                            compression=not args.no_compression, monitor=mon, liveness=live)


def run_profile(cfg: ControllerConfig, mc) -> tuple:
    """(profile, note) for the run: --profile, else MODEL/profile.json, else synthetic statistics;
    raises ConfigError when the profile does not describe the model's shape."""
    from pathlib import Path
    from coel_model.profile_format import load_profile
    from controller.profile import synthetic_profile
    path = cfg.profile_path or str(Path(cfg.model_dir) / "profile.json")
    if Path(path).exists() or cfg.profile_path:
        prof = load_profile(path)
        note = f"profile {path}"
    else:
        bb = mc.param_counts().get("backbone")
        prof = synthetic_profile(mc, backbone_params=bb, source=f"synthetic for {cfg.model_dir}")
        note = f"no profile at {path}: synthetic statistics (measured ones come from `coel profile`)"
    pc = prof.cfg
    if (pc.n_layers, pc.n_experts, pc.d_model, pc.expert_hidden) != \
            (mc.n_layers, mc.n_experts, mc.d_model, mc.expert_hidden):
        raise ConfigError(f"{path}: profile is for {pc.n_layers} layers x {pc.n_experts} experts d={pc.d_model} "
                          f"hidden={pc.expert_hidden}, the model {cfg.model_dir} has {mc.n_layers} x "
                          f"{mc.n_experts} d={mc.d_model} hidden={mc.expert_hidden}")
    return prof, note
