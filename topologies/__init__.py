"""Topology descriptions of the emulated edge network: YAML files, their schema and loader.

Pure data: loading, validating and path computations need neither root nor Mininet.
"""
from topologies.loader import (
    DEFAULT_TOPOLOGY, bundled_topologies, load_topology, parse_topology, resolve_topology_path,
    topology_from_dict,
)
from topologies.paths import (
    address_plan, bottleneck_bw_mbit, path_delay_ms, path_jitter_ms, peer_delays, shortest_path,
    static_routes,
)
from topologies.schema import (
    Client, Controller, Link, Router, Server, Site, Switch, Topology, Workload,
)

__all__ = [
    "DEFAULT_TOPOLOGY", "bundled_topologies", "load_topology", "parse_topology",
    "resolve_topology_path", "topology_from_dict", "address_plan", "bottleneck_bw_mbit",
    "path_delay_ms", "path_jitter_ms", "peer_delays", "shortest_path", "static_routes",
    "Client", "Controller", "Link", "Router", "Server", "Site", "Switch", "Topology", "Workload",
]
