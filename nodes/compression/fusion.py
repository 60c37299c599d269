"""The group step: ToMe-style bipartite merging of near-duplicate vectors bound for one remote
expert, then the codec (`compress_group`); the reply step (`compress_reply`) and the sender's
unmerge (`decompress_reply`). The merge map never leaves the sender: the remote side only sees rows.

Shapes: n rows bound for one expert, m rows after merging (m <= n), d model width."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nodes.compression.codec import WireTensor, decode_rows, encode_rows
from nodes.compression.settings import CompressionSettings


def fuse_rows(x: torch.Tensor, threshold: float, max_frac: float,
              protected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ToMe bipartite soft matching: (n, d) -> (merged (m, d), merge_map (n,) or None if none merged).

    Rows alternate into sets A (even) and B (odd); each A row picks its most cosine-similar B row;
    the best pairs with similarity >= threshold (at most floor(max_frac * n)) merge into the B row,
    which becomes the mean of its members. merged[merge_map[i]] is what row i is represented by.
    Protected rows neither merge nor absorb. The mean is b + sum(a - b) / count so that identical
    rows merge into bit-identical vectors.
    """
    n = x.shape[0]
    r_max = int(math.floor(max_frac * n + 1e-9))
    if n < 2 or r_max == 0 or threshold <= 0:
        return x, None
    xf = x.float()
    xn = F.normalize(xf, dim=-1, eps=1e-12)
    a_idx = torch.arange(0, n, 2)
    b_idx = torch.arange(1, n, 2)
    sim = xn[a_idx] @ xn[b_idx].T  # (na, nb)
    if protected is not None and bool(protected.any()):
        sim[protected[a_idx]] = -2.0
        sim[:, protected[b_idx]] = -2.0
    best, best_b = sim.max(dim=1)  # (na,)
    order = torch.sort(-best, stable=True).indices
    order = order[best[order] >= threshold - 1e-6][:r_max]
    if order.numel() == 0:
        return x, None
    src = a_idx[order]  # rows merged away
    dst = b_idx[best_b[order]]  # rows they merge into
    gone = torch.zeros(n, dtype=torch.bool)
    gone[src] = True
    kept = torch.nonzero(~gone).squeeze(1)  # (m,) ascending
    pos = torch.full((n,), -1, dtype=torch.long)
    pos[kept] = torch.arange(kept.numel())
    merge_map = pos.clone()
    merge_map[src] = pos[dst]
    merged = xf[kept].clone()
    delta = torch.zeros_like(merged)
    count = torch.ones(kept.numel())
    delta.index_add_(0, pos[dst], xf[src] - xf[dst])
    count.index_add_(0, pos[dst], torch.ones(src.numel()))
    merged = merged + delta / count.unsqueeze(1)
    return merged.to(x.dtype), merge_map


@dataclass
class CompressedGroup:
    """What the sender keeps (merge map) and sends (wire) for one remote expert's rows."""
    wire: WireTensor  # the (m, d) rows that travel
    merge_map: torch.Tensor | None  # (n,) row i -> wire row; None = identity; stays at the sender
    n_rows: int  # n, rows before merging
    n_merged: int = 0  # n - m

    @property
    def wire_bytes(self) -> int:
        return self.wire.nbytes


def compress_group(x: torch.Tensor, settings: CompressionSettings,
                   protected: torch.Tensor | None = None) -> CompressedGroup:
    """(n, d) rows bound for one remote expert -> CompressedGroup (fuse, then encode)."""
    n = x.shape[0]
    merged, merge_map = x, None
    if settings.fuses:
        merged, merge_map = fuse_rows(x, settings.fuse_threshold, settings.fuse_max_frac, protected)
    wire = encode_rows(merged, settings.act_dtype)
    return CompressedGroup(wire, merge_map, n, n - merged.shape[0])


def decompress_group(wire: WireTensor) -> torch.Tensor:
    """Receiver side: the (m, d) rows to run the expert on."""
    return decode_rows(wire)


def compress_reply(y: torch.Tensor, settings: CompressionSettings) -> WireTensor:
    """Receiver side: expert outputs (m, d) -> WireTensor in the link's act_dtype."""
    return encode_rows(y, settings.act_dtype)


def decompress_reply(reply: WireTensor, group: CompressedGroup) -> torch.Tensor:
    """Sender side: decode the reply and unmerge it -> (n, d), one output row per original row."""
    return unmerge(decode_rows(reply), group)


def unmerge(y: torch.Tensor, group: CompressedGroup) -> torch.Tensor:
    """Sender side: (m, d) outputs of the sent rows -> (n, d), copying a merged row to each member."""
    if y.shape[0] != group.wire.shape[0]:
        raise ValueError(f"reply has {y.shape[0]} rows, {group.wire.shape[0]} were sent")
    if group.merge_map is None:
        return y
    return y.index_select(0, group.merge_map)


def raw_bytes(n_rows: int, d: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of n rows sent uncompressed: the baseline every ratio is measured against."""
    return n_rows * d * torch.empty((), dtype=dtype).element_size()
