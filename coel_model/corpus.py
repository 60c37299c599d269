"""The training corpus: the Python standard library of the running interpreter, split by module.

Why this corpus: it is on every machine that runs CoEL (no download), it is real, varied text
(code, docstrings, comments), and a deterministic split makes every number reproducible.

Split rule (documented in docs/model.md): every `*.py` file under
`sysconfig.get_paths()["stdlib"]` is one document, named by its dotted module path
(`email/mime/text.py` -> `email.mime.text`). Skipped: any `test`/`tests` directory, `idlelib`,
`site-packages`/`dist-packages`, `__pycache__`, `pydoc_data` (one huge generated string) and
the generated charmap codec tables in `encodings` (files made by gencodec.py). The bucket of a module is
`int(sha256(name)[:8], 16) % 100`: buckets 0-2 are held-out, 3-5 calibration, the rest training.
The held-out and calibration splits are shipped in `data/` (so eval and profiling give the same
numbers on any interpreter); `training_documents()` rebuilds the training split from the local
stdlib and drops every module that is listed in the shipped splits, so nothing leaks.
"""
from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from coel_model.errors import CheckpointError

SPLITS = ("train", "calib", "heldout")
HELDOUT_BUCKETS = range(0, 3)  # 3% of modules
CALIB_BUCKETS = range(3, 6)  # 3% of modules
EOS_TEXT = "<|endoftext|>"  # document separator in the shipped text files and the tokenizer
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}
REPO_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class Document:
    module: str  # dotted module path, e.g. "email.mime.text"
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_codec_table(rel: Path, text: str) -> bool:
    """Generated charmap codecs (encodings/cp1252.py ...) are tables, not language: skip them."""
    return rel.parts[0] == "encodings" and "gencodec.py" in text


def split_of(module: str) -> str:
    """Deterministic split of a module by the hash of its dotted name."""
    bucket = int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) % 100
    if bucket in HELDOUT_BUCKETS:
        return "heldout"
    if bucket in CALIB_BUCKETS:
        return "calib"
    return "train"


def stdlib_documents(root: Path | None = None) -> list[Document]:
    """Every eligible stdlib module, sorted by module name."""
    root = root or stdlib_dir()
    if not root.is_dir():
        raise CheckpointError(f"{root}: Python standard library directory not found")
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or _is_codec_table(rel, text):
            continue
        docs.append(Document(module_name(rel), text))
    return docs


def write_split_file(docs: list[Document], path: Path) -> None:
    """Documents joined by the EOS marker line; the module names go to the manifest."""
    path.write_text("".join(d.text.rstrip("\n") + "\n" + EOS_TEXT + "\n" for d in docs), encoding="utf-8")


def read_split_file(path: Path) -> list[str]:
    """Document texts of a shipped split file (inverse of write_split_file)."""
    if not path.exists():
        raise CheckpointError(f"{path}: corpus split file not found (expected data/heldout.txt "
                              f"and data/calib.txt from the repository)")
    raw = path.read_text(encoding="utf-8")
    return [t for t in raw.split("\n" + EOS_TEXT + "\n") if t.strip()]


def export_splits(data_dir: Path = REPO_DATA_DIR, root: Path | None = None) -> dict:
    """Write data/heldout.txt, data/calib.txt and data/manifest.json from the local stdlib."""
    data_dir.mkdir(parents=True, exist_ok=True)
    docs = stdlib_documents(root)
    manifest = {"source": "python-stdlib", "python": sys.version.split()[0],
                "stdlib": str(root or stdlib_dir()), "rule": "sha256(module)[:8] % 100: 0-2 heldout, 3-5 calib",
                "splits": {}}
    for split in ("heldout", "calib"):
        part = [d for d in docs if split_of(d.module) == split]
        f = data_dir / f"{split}.txt"
        write_split_file(part, f)
        manifest["splits"][split] = {"file": f.name, "modules": [d.module for d in part],
                                     "bytes": f.stat().st_size,
                                     "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    train = [d for d in docs if split_of(d.module) == "train"]
    manifest["splits"]["train"] = {"modules": len(train), "bytes": sum(len(d.text.encode()) for d in train)}
    (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def shipped_modules(data_dir: Path = REPO_DATA_DIR) -> set[str]:
    mf = data_dir / "manifest.json"
    if not mf.exists():
        return set()
    m = json.loads(mf.read_text())
    return {mod for s in ("heldout", "calib") for mod in m["splits"].get(s, {}).get("modules", [])}


def training_documents(data_dir: Path = REPO_DATA_DIR, root: Path | None = None) -> list[Document]:
    """The training split rebuilt from the local stdlib, minus every shipped held-out/calib module."""
    held = shipped_modules(data_dir)
    return [d for d in stdlib_documents(root) if split_of(d.module) == "train" and d.module not in held]


def split_texts(split: str, data_dir: Path = REPO_DATA_DIR) -> list[str]:
    """Document texts of a split: calib/heldout from the shipped files, train from the stdlib."""
    if split == "train":
        return [d.text for d in training_documents(data_dir)]
    if split not in ("calib", "heldout"):
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return read_split_file(data_dir / f"{split}.txt")
