"""Assemble docs/benchmarks.md from the headline summary and every per-topic page in docs/bench/.

Each benchmark script writes (or its author updates) docs/bench/<topic>.md with its latest table and
the command that produced it; this script stitches them into the one page people read, in a fixed
order, demoting each page's headings by one level. Run it after updating any page:

    .venv/bin/python benchmarks/collect_docs.py
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "bench"
ORDER = ["quant_kernels", "quant_quality", "nodes", "compression", "planner", "compare", "net",
         "runtime_failover", "redeploy", "api"]


def demote(text: str) -> str:
    return re.sub(r"^(#{1,5}) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)


def main() -> int:
    summary = BENCH / "_summary.md"
    if not summary.exists():
        print(f"missing {summary}", file=sys.stderr)
        return 2
    pages = [BENCH / f"{name}.md" for name in ORDER if (BENCH / f"{name}.md").exists()]
    pages += sorted(p for p in BENCH.glob("*.md") if p.stem not in ORDER and not p.stem.startswith("_"))
    parts = [summary.read_text().rstrip() + "\n"]
    for p in pages:
        parts.append(f"\n<!-- from docs/bench/{p.name} -->\n" + demote(p.read_text().rstrip()) + "\n")
    out = ROOT / "docs" / "benchmarks.md"
    out.write_text("\n".join(parts))
    print(f"wrote {out} from {1 + len(pages)} pages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
