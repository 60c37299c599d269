"""Token compression on cross-server expert transfers, one concept per module:

  settings  what one link does (`CompressionSettings`, `NONE`), carried in message headers
  pruning   the routing step: which (token, expert) assignments still travel (MC-MoE beta rule,
            dropping unimportant tokens, sparing the most important ones)
  codec     activations on the wire: fp32 / fp16 / int8 with per-row scales, named tensors of an
            expert call or reply; the one codec of agents, entries and the coordinator
  fusion    the group step: ToMe-style merging of near-duplicate rows bound for one expert, the
            reply and the sender-side unmerge
  measure   the quality/bytes table the planner negotiates with (controller/negotiation.py)

Everything but `measure` is pure (tensors in, tensors out). This package's interface is the
names below.
"""
from nodes.compression.codec import WireTensor, decode_activations, decode_rows, encode_activations, encode_rows
from nodes.compression.fusion import (CompressedGroup, compress_group, compress_reply, decompress_group,
                                      decompress_reply, fuse_rows, raw_bytes, unmerge)
from nodes.compression.measure import CompressingExecutor, CompressionStats, measure_compression_cost
from nodes.compression.pruning import protected_mask, prune_in_place, prune_links, prune_routing, token_importance
from nodes.compression.settings import ACT_DTYPES, NONE, CompressionSettings

__all__ = ["ACT_DTYPES", "NONE", "CompressedGroup", "CompressingExecutor", "CompressionSettings", "CompressionStats",
           "WireTensor", "compress_group", "compress_reply", "decode_activations", "decode_rows",
           "decompress_group", "decompress_reply", "encode_activations", "encode_rows", "fuse_rows",
           "measure_compression_cost", "protected_mask", "prune_in_place", "prune_links", "prune_routing", "raw_bytes",
           "token_importance", "unmerge"]
