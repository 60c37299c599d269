"""What a load generator sends and when: Poisson arrivals or a replayed request trace, and the
prompts cut from the held-out split. Shared by the native client (nodes.client, ZeroMQ) and the
HTTP client (nodes.http_client, the `openai` package); no torch, no sockets.

Trace files are CSV with a header, one request per row: its arrival time and its prompt and
output lengths in tokens, the three columns public LLM serving traces carry. Accepted column
names (case, spaces and underscores ignored):
    arrival:  arrival_s, arrival_time, timestamp, time
    prompt:   prompt_tokens, input_tokens, context_tokens, request_tokens
    output:   output_tokens, generated_tokens, response_tokens, max_new_tokens
e.g. the Azure LLM inference trace (TIMESTAMP, ContextTokens, GeneratedTokens) or BurstGPT
(Timestamp, Request tokens, Response tokens). Arrival times are seconds (numbers) or ISO 8601
date-times; either way they are taken relative to the first row, and only rows before the
workload's duration are replayed.
"""
from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from coel_model.errors import ConfigError

ARRIVAL_COLUMNS = ("arrival_s", "arrival_time", "timestamp", "time")
PROMPT_COLUMNS = ("prompt_tokens", "input_tokens", "context_tokens", "request_tokens")
OUTPUT_COLUMNS = ("output_tokens", "generated_tokens", "response_tokens", "max_new_tokens")


@dataclass(frozen=True)
class Arrival:
    t_s: float  # seconds after the workload starts
    prompt_tokens: int
    max_new_tokens: int


def arrival_times(rate_rps: float, duration_s: float, seed: int) -> list[float]:
    """Poisson process: seeded exponential gaps, every arrival < duration_s (seconds from start)."""
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate_rps)
        if t >= duration_s:
            return out
        out.append(t)


def poisson_arrivals(rate_rps: float, duration_s: float, seed: int, prompt_tokens: int,
                     max_new_tokens: int) -> list[Arrival]:
    return [Arrival(t, prompt_tokens, max_new_tokens) for t in arrival_times(rate_rps, duration_s, seed)]


def _norm(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def _seconds(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value.strip()).timestamp()
    except ValueError:
        raise ConfigError(f"{where}: arrival time {value!r} is neither seconds nor an ISO 8601 date-time") from None


def read_trace_csv(path: str | Path, duration_s: float, max_seq_len: int | None = None) -> list[Arrival]:
    """The trace's requests that arrive within duration_s. With max_seq_len, prompts are cut so that
    prompt + output fits the model (real traces hold prompts far longer than small models' contexts)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"request trace {path}: cannot read: {exc}") from None
    rows = list(csv.reader(text.splitlines()))
    if len(rows) < 2:
        raise ConfigError(f"request trace {path}: needs a header line and at least one request")
    header = [_norm(h) for h in rows[0]]

    def col(names: tuple[str, ...], what: str) -> int:
        for n in names:
            if _norm(n) in header:
                return header.index(_norm(n))
        raise ConfigError(f"request trace {path}: no {what} column (one of {', '.join(names)}; "
                          f"header: {', '.join(rows[0])})")
    ia, ip, io = col(ARRIVAL_COLUMNS, "arrival time"), col(PROMPT_COLUMNS, "prompt tokens"), \
        col(OUTPUT_COLUMNS, "output tokens")
    out: list[Arrival] = []
    t0 = None
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{path}:{line}"
        if len(row) <= max(ia, ip, io):
            raise ConfigError(f"{where}: expected {len(header)} columns, got {len(row)}")
        t = _seconds(row[ia], where)
        try:
            n_in, n_out = int(float(row[ip])), int(float(row[io]))
        except ValueError:
            raise ConfigError(f"{where}: token counts must be numbers, got {row[ip]!r}, {row[io]!r}") from None
        if n_in < 1 or n_out < 1:
            raise ConfigError(f"{where}: prompt and output tokens must be >= 1, got {n_in}, {n_out}")
        t0 = t if t0 is None else t0
        rel = t - t0
        if rel < 0:
            raise ConfigError(f"{where}: arrival {row[ia]!r} is before the first row's: sort the trace by time")
        if rel >= duration_s:
            break
        if max_seq_len is not None:
            n_out = min(n_out, max_seq_len - 1)
            n_in = min(n_in, max_seq_len - n_out)
        out.append(Arrival(rel, n_in, n_out))
    if not out:
        raise ConfigError(f"request trace {path}: no request within the first {duration_s:g} s")
    return out


class PromptSource:
    """Seeded prompt cuts from the held-out split."""

    def __init__(self, path: str | None, seed: int, tokenizer: Any = None):
        from coel_model.corpus import REPO_DATA_DIR, read_split_file
        p = Path(path) if path else REPO_DATA_DIR / "heldout.txt"
        self.docs = [d for d in read_split_file(p) if len(d) >= 200]
        if not self.docs:
            raise ConfigError(f"{p}: no document of at least 200 characters to cut prompts from")
        self.rng = random.Random(seed ^ 0x5EED)
        self.tok = tokenizer

    def text(self, approx_tokens: int) -> str:
        doc = self.rng.choice(self.docs)
        n_chars = max(32, approx_tokens * 8)  # ~3-4 chars per BPE token of code: 8 is ample
        start = self.rng.randrange(0, max(1, len(doc) - n_chars))
        return doc[start:start + n_chars]

    def ids(self, n_tokens: int) -> list[int]:
        for _ in range(20):
            ids = self.tok.encode(self.text(n_tokens * 2))
            if len(ids) >= n_tokens:
                return ids[:n_tokens]
        ids = []  # longer than any one cut (a replayed trace's long prompts): whole documents
        for _ in range(10_000):
            ids += self.tok.encode(self.rng.choice(self.docs))
            if len(ids) >= n_tokens:
                return ids[:n_tokens]
        raise ConfigError(f"could not cut a prompt of {n_tokens} tokens from the held-out split")


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no data)."""
    if not xs:
        return None
    s = sorted(xs)
    k = min(len(s) - 1, max(0, int(math.ceil(q / 100 * len(s))) - 1))
    return s[k]
