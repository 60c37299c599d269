"""Dequantizing matmuls for the packed expert format (see coel_model/quant.py).

Native path: qmatmul.cpp (AVX2 + FMA + F16C, OpenMP), compiled with the system g++ by the installer
(`python -m coel_model.kernels --build`, run by install.sh; idempotent) into a cache dir
(COEL_KERNEL_CACHE, default ~/.cache/coel/kernels) under a name that hashes the source and flags,
and loaded with ctypes (a plain C ABI: no torch headers, ~4 s to build). A running process never
compiles: a compile takes seconds of both cores, and when it happened at first use it starved the
heartbeats of every process on the machine mid-traffic (issue 12). A process that finds no built
library uses the torch fallback and its status() says so (COEL_KERNELS_BUILD=1 allows the build at
first use, for development outside the testbed).
It shares torch's OpenMP runtime (libgomp.so.1 is already loaded by torch).
  small batches: fused unpack + dequant + dot over the packed weight (read once per 8 rows of
      x), K-blocked so the slice of x stays in L1; AVX-512 variant where the CPU has it; a whole
      expert (gate, up, SiLU, down) in one call (qexpert);
  larger batches (use_gemm): dequantize in C (row tiles, or a small expert whole) + torch GEMMs.
Fallback (no compiler, no AVX2, or COEL_KERNELS=off): the same tiling in pure torch.
Threads: torch.get_num_threads() (set 1 where processes share cores: a descheduled helper thread
stalls every parallel region).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from coel_model.packing import QuantSpec, dequantize_weight, padded_in_features
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("qmatmul.cpp")
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
GEMM_MIN_BATCH = 64  # from this many rows of x on: tile-dequantize + torch GEMM instead of the fused kernel
GEMM_MIN_BATCH_SMALL = 16  # ... already from this many when the whole layer is one tile (small experts)
TILE_FLOATS = 1 << 20  # fp32 elements per dequantized tile (4 MiB)
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
AVX512_FLAGS = ("avx512f",)  # when present, the fused GEMV is built in its AVX-512 variant

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: str = "not loaded"  # "native (<path>)" or "fallback: <reason>"


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_ok() -> str | None:
    try:
        flags = _cpu_flags()
    except OSError as exc:
        return f"cannot read /proc/cpuinfo ({exc})"
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in flags]
    return f"CPU lacks {missing}" if missing else None


def build_flags() -> list[str]:
    """Compiler flags for this CPU: AVX2/FMA/F16C always, AVX-512F where the CPU has it
    (COEL_KERNELS_ISA=avx2 forces the AVX2 variant)."""
    flags = list(CFLAGS)
    try:
        has512 = all(f in _cpu_flags() for f in AVX512_FLAGS)
    except OSError:
        has512 = False
    if has512 and os.environ.get("COEL_KERNELS_ISA", "").lower() != "avx2":
        flags.append("-mavx512f")
    return flags


def cache_dir() -> Path:
    return Path(os.environ.get("COEL_KERNEL_CACHE") or Path.home() / ".cache" / "coel" / "kernels")


def library_path(cxx: str) -> Path:
    """Where the library for this source, these flags and this compiler lives (built or not)."""
    src = SOURCE.read_bytes()
    flags = build_flags()
    ver = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    tag = hashlib.sha256(src + " ".join(flags + ver).encode()).hexdigest()[:16]
    return cache_dir() / f"qmatmul-{tag}.so"


def _build(cxx: str) -> Path:
    out = library_path(cxx)
    flags = build_flags()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cxx, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {SOURCE}: {r.stderr.strip()[:2000]}")
        os.replace(tmp, out)  # atomic: concurrent builders never see a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build() -> Path:
    """Compile the native library into the cache unless it is there (the installer's step); raises
    RuntimeError naming what is missing (no compiler, CPU without AVX2, compile error)."""
    cxx = _compiler()
    reason = _cpu_ok() or (None if cxx else "no C++ compiler (g++) on PATH")
    if reason:
        raise RuntimeError(reason)
    return _build(cxx)


def _load() -> ctypes.CDLL | None:
    """Load the built native library (built at first use only with COEL_KERNELS_BUILD=1); None
    (with _status saying why) if not."""
    global _lib, _status
    if _status != "not loaded":
        return _lib
    with _lock:
        if _status != "not loaded":
            return _lib
        reason = None
        if os.environ.get("COEL_KERNELS", "").lower() in ("off", "0", "torch", "fallback"):
            reason = "disabled by COEL_KERNELS"
        reason = reason or _cpu_ok()
        cxx = _compiler()
        if reason is None and not cxx:
            reason = "no C++ compiler (g++) on PATH"
        if reason is None:
            path = library_path(cxx)
            if not path.exists() and os.environ.get("COEL_KERNELS_BUILD", "") not in ("1", "yes", "on"):
                reason = (f"native library not built ({path} missing; run `python -m coel_model.kernels "
                          f"--build`, which install.sh does)")
        if reason is None:
            try:
                lib = ctypes.CDLL(str(_build(cxx)))
                i64, vp, ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
                lib.coel_qgemv.argtypes = [vp, i64, i64, vp, vp, vp, vp, i64, i64, i64, ci, vp, ci]
                lib.coel_dequant_rows.argtypes = [vp, vp, vp, vp, i64, i64, i64, ci, i64, i64, vp, ci]
                lib.coel_hgemv.argtypes = [vp, i64, i64, vp, i64, ci, vp, ci]
                lib.coel_isa.restype = ctypes.c_char_p
                lib.coel_qexpert.argtypes = [vp, vp, i64, vp, vp, ci]
                lib.coel_qexpert.restype = ci
                lib.coel_qexpert_dequant.argtypes = [vp, vp, ci]
                lib.coel_qexpert_dequant.restype = ci
                for f in (lib.coel_qgemv, lib.coel_dequant_rows, lib.coel_hgemv):
                    f.restype = ci
                _lib = lib
                _status = f"native {lib.coel_isa().decode()} ({lib._name})"
                return _lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                reason = f"native build/load failed: {exc}"
        _status = f"fallback: {reason}"
        return None


def status() -> str:
    """Which implementation runs ("native (...)" or "fallback: reason"); builds on first call."""
    _load()
    return _status


def native_available() -> bool:
    return _load() is not None


def use_gemm(n_rows: int, out_features: int, kp: int) -> bool:
    """Tile-dequantize + GEMM (True) or the fused kernel (False) for an (out, kp) layer and a batch
    of n_rows: the fused kernel re-unpacks the weight for every 8 rows of x, the GEMM path once."""
    if n_rows >= GEMM_MIN_BATCH:
        return True
    return n_rows >= GEMM_MIN_BATCH_SMALL and out_features * kp <= TILE_FLOATS


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _dequant_rows_torch(t: dict[str, torch.Tensor], bits: int, gs: int, o0: int, o1: int) -> torch.Tensor:
    """Rows o0:o1 of the packed weight as fp32 (o1 - o0, padded in) (the reference dequantize)."""
    part = {k: v[o0:o1] for k, v in t.items()}
    return dequantize_weight(part, QuantSpec(bits, gs), part["scales"].shape[1] * gs)


def qmatmul(x: torch.Tensor, t: dict[str, torch.Tensor], bits: int, group_size: int,
            in_features: int, out_features: int, force: str | None = None) -> torch.Tensor:
    """x (N, in) -> (N, out) fp32 with the packed weight `t` (quant.py format).
    force: None (best available), "native", "torch" (fallback path; for tests/benchmarks)."""
    lib = None if force == "torch" else _load()
    if force == "native" and lib is None:
        raise RuntimeError(f"native kernels unavailable: {_status}")
    O = out_features
    G = t["scales"].shape[1]
    kp = G * group_size
    x = x.float()
    if x.shape[1] != kp:
        x = F.pad(x, (0, kp - x.shape[1]))
    x = x.contiguous()
    N = x.shape[0]
    nt = torch.get_num_threads()
    if lib is not None and not use_gemm(N, O, kp):
        y = torch.empty(N, O, dtype=torch.float32)
        rc = lib.coel_qgemv(x.data_ptr(), N, kp, t["qweight"].data_ptr(), _ptr(t.get("qweight_hi")),
                            t["scales"].data_ptr(), t["zeros"].data_ptr(), O, G, group_size, bits,
                            y.data_ptr(), nt)
        if rc != 0:
            raise RuntimeError(f"coel_qgemv failed (rc={rc}, bits={bits}, group={group_size}, kp={kp})")
        return y
    rows = max(8, min(O, TILE_FLOATS // kp) // 8 * 8)
    if N < GEMM_MIN_BATCH:  # fallback GEMV: small tiles keep the transient fp32 copy small
        rows = max(8, min(O, (1 << 16) // kp) // 8 * 8)
    yt = torch.empty(O, N, dtype=torch.float32)  # y^T: row tiles of it are contiguous
    xt = x.t()
    buf = torch.empty(rows, kp, dtype=torch.float32) if lib is not None else None
    for o0 in range(0, O, rows):
        o1 = min(O, o0 + rows)
        if lib is not None:
            w = buf[: o1 - o0]
            rc = lib.coel_dequant_rows(t["qweight"].data_ptr(), _ptr(t.get("qweight_hi")),
                                       t["scales"].data_ptr(), t["zeros"].data_ptr(), kp, G, group_size,
                                       bits, o0, o1, w.data_ptr(), nt)
            if rc != 0:
                raise RuntimeError(f"coel_dequant_rows failed (rc={rc}, bits={bits}, group={group_size})")
        else:
            w = _dequant_rows_torch(t, bits, group_size, o0, o1)
        torch.mm(w, xt, out=yt[o0:o1])
    return yt.t()


def float_matmul(x: torch.Tensor, w: torch.Tensor, force: str | None = None) -> torch.Tensor:
    """x (N, K) fp32 @ w^T for a 16-bit float weight w (O, K), exact in fp32 (x is not rounded):
    native fused convert + dot for small batches, else fp32 row tiles + torch.mm."""
    lib = None if force == "torch" else _load()
    x = x.float().contiguous()
    N, K = x.shape
    O = w.shape[0]
    if lib is not None and not use_gemm(N, O, K) and w.dtype in (torch.float16, torch.bfloat16):
        w = w.contiguous()
        y = torch.empty(N, O, dtype=torch.float32)
        lib.coel_hgemv(x.data_ptr(), N, K, w.data_ptr(), O, int(w.dtype == torch.bfloat16), y.data_ptr(),
                       torch.get_num_threads())
        return y
    rows = max(8, min(O, TILE_FLOATS // max(K, 1)) // 8 * 8)
    yt = torch.empty(O, N, dtype=torch.float32)
    for o0 in range(0, O, rows):
        torch.mm(w[o0:o0 + rows].float(), x.t(), out=yt[o0:o0 + rows])
    return yt.t()


def _expert_params(expert) -> tuple:
    """(params tensor, its pointer, kp_d, kp_h) for coel_qexpert, cached on the QuantizedExpert and
    rebuilt when any buffer moved (e.g. after .to() or load_state_dict(assign=True)). Reads the
    buffers through _buffers (nn.Module.__getattr__ costs ~1 us per access)."""
    bits = expert.spec.bits
    names = ("weight",) if bits == 16 else ("qweight", "qweight_hi", "scales", "zeros") if bits == 3 \
        else ("qweight", "scales", "zeros")
    ptrs = [lin._buffers[n].data_ptr() for lin in (expert.w_gate, expert.w_up, expert.w_down) for n in names]
    cached = expert.__dict__.get("_native_params")
    if cached is not None and cached[0] == ptrs:
        return cached[1]
    full = []
    for i in range(3):
        got = dict(zip(names, ptrs[i * len(names):(i + 1) * len(names)]))
        full += [got.get("weight", got.get("qweight")), got.get("qweight_hi", 0), got.get("scales", 0),
                 got.get("zeros", 0)]
    spec = expert.spec
    d, h = expert.d_model, expert.hidden
    kpd = padded_in_features(d, spec.group_size) if bits < 16 else d
    kph = padded_in_features(h, spec.group_size) if bits < 16 else h
    bf16 = int(bits == 16 and expert.w_gate._buffers["weight"].dtype == torch.bfloat16)
    params = torch.tensor([bits, spec.group_size, d, h, kpd, kph, bf16, *full], dtype=torch.int64)
    info = (params, params.data_ptr(), kpd, kph)
    expert.__dict__["_native_params"] = (ptrs, info)
    return info


def qexpert(expert, x: torch.Tensor) -> torch.Tensor | None:
    """Whole QuantizedExpert forward in one native call (x (N, d) fp32, N < GEMM_MIN_BATCH);
    None when the native library is unavailable (the caller then runs the generic path)."""
    lib = _lib if _lib is not None else _load()
    if lib is None:
        return None
    _params, pptr, kpd, kph = _expert_params(expert)
    x = x.contiguous()
    N = x.shape[0]
    y = torch.empty(N, expert.d_model, dtype=torch.float32)
    work = torch.empty(N * (kpd + 3 * kph), dtype=torch.float32)
    rc = lib.coel_qexpert(pptr, x.data_ptr(), N, y.data_ptr(), work.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"coel_qexpert failed (rc={rc}, bits={expert.spec.bits}, group={expert.spec.group_size})")
    return y


_tls = threading.local()  # per-thread scratch for dequantized small experts (no page faults per call)


def qexpert_weights(expert) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """fp32 (gate, up, down) of a small integer-format QuantizedExpert, dequantized in one native
    call into a per-thread scratch buffer (valid until this thread's next call); None without
    the native library. For batches where a GEMM beats the fused kernel."""
    lib = _lib if _lib is not None else _load()
    if lib is None:
        return None
    _params, pptr, kpd, kph = _expert_params(expert)
    d, h = expert.d_model, expert.hidden
    need = 2 * h * kpd + d * kph
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.numel() < need:
        buf = _tls.buf = torch.empty(need, dtype=torch.float32)
    rc = lib.coel_qexpert_dequant(pptr, buf.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"coel_qexpert_dequant failed (rc={rc}, bits={expert.spec.bits})")
    wg = buf[: h * kpd].view(h, kpd)[:, :d]
    wu = buf[h * kpd: 2 * h * kpd].view(h, kpd)[:, :d]
    wd = buf[2 * h * kpd: need].view(d, kph)[:, :h]
    return wg, wu, wd
