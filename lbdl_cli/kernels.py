"""Which hardware path runs what: the device, the compute dtype and the CPU products, in one place.

- Devices: `resolve_device` (the one device resolver) and `cpu_capabilities` (what torch sees of this CPU).
- Products: `linear(x, weight, bias)` is F.linear through the kernel that multiplies fastest for the call
  (its rows, the weight's size, dtype and layout), `inference_layout(matrices)` lays a model's matrices out
  for it; `split_gemv`, `gemv_without_onednn` and `onednn_available` are its parts.
- The machine probe: `probe()` times, once per CPU model and torch version (cached on disk, see
  `cache_dir`), the products whose speed differs most between CPUs: float32 against bfloat16, and torch's
  packed int4 kernel against dequantizing. `compute_dtype` and `quant_backend` turn it into what the
  loaders use; `system_info` is what `lbdl info --system` shows.

The rules are in the docstrings; the measurements behind them are in docs/BENCHMARKS.md ("Kernel choice").
Importing this module does not import torch (the CLI's start-up): torch is bound on first use.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

LARGE_MATRIX = 1 << 18  # entries: 1 MiB of float32
PROBE_VERSION = 1  # bump when what the probe measures changes: older cache files are then not read
CACHE_ENV = "LBDL_CACHE_DIR"
CONTENDED_US = 5000  # a probe whose float32 1024 x 1024 row took longer (under 1 GB/s) is not written to disk

torch = F = None  # bound by _bind_torch() on first use
_PLAIN: tuple = ()  # the weight types `linear` routes (not a quantized module's packed weight)
_F32 = _BF16 = None  # torch.float32 and torch.bfloat16, the dtypes it routes
_onednn_enabled = _enable_onednn = None
_ONEDNN: list[bool] = []
ONEDNN_LOCK = threading.Lock()  # held by every bfloat16 CPU product of `linear`: see gemv_without_onednn


def _bind_torch():
    global torch, F, _PLAIN, _F32, _BF16, _onednn_enabled, _enable_onednn
    import torch as t
    import torch.nn.functional as f

    torch, F, _PLAIN, _F32, _BF16 = t, f, (t.Tensor, t.nn.Parameter), t.float32, t.bfloat16
    # torch.backends.mkldnn.enabled's getter and setter, without its Python property (a product's overhead)
    _onednn_enabled, _enable_onednn = t._C._get_mkldnn_enabled, t._C._set_mkldnn_enabled


# --- devices ------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    """auto (or None) = cuda when torch sees one, else cpu; cpu, cuda and cuda:N as asked; cuda asked for
    without one is refused."""
    import torch

    if isinstance(device, torch.device):
        return device
    name = device or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device; use --device cpu "
                          "or install a CUDA build of torch")
    return torch.device(name)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def cpu_capabilities() -> dict:
    """What this CPU offers torch: the vector ISA torch dispatches to and whether bfloat16 is native."""
    import torch

    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    native_bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return {
        "model": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_bf16" in flags,
        "native_bf16": native_bf16,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


# --- products ----------------------------------------------------------------------------------------------


def linear(x, weight, bias=None):
    """F.linear through the fastest kernel for inference on a CPU (no gradients, not under torch.compile, a
    plain weight of the input's dtype laid out by `inference_layout`; in float32 a contiguous input and no
    autocast):

    - float32, one row (a decoding step) by a column-major matrix of LARGE_MATRIX entries or more:
      `split_gemv`, a slice of the outputs per thread (F.linear's MKL product runs on one thread);
    - float32, one row by a large row-major matrix, or several rows by a row-major matrix or a large
      column-major one: oneDNN's linear (torch.ops.mkldnn._linear_pointwise, the kernel torch.compile's
      CPU freezing picks);
    - float32, one row by a smaller matrix, or several by a smaller column-major one: F.linear (MKL);
    - bfloat16, one row by a row-major matrix: `gemv_without_onednn`, torch's own matrix-vector kernel
      (faster than oneDNN's for one row); anything else in bfloat16: F.linear (oneDNN), under the same
      lock.

    Anything else (gradients, other dtypes or devices, a packed quantized weight, a torch without oneDNN)
    is F.linear."""
    if F is None:
        _bind_torch()
    if type(weight) in _PLAIN and x.is_cpu and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        dtype = x.dtype
        if dtype is _BF16 and weight.dtype is _BF16:
            if x.numel() == weight.shape[1] and weight.is_contiguous():
                return gemv_without_onednn(x, weight, bias)
            with ONEDNN_LOCK:  # never while gemv_without_onednn has oneDNN off
                return F.linear(x, weight, bias)
        if dtype is _F32 and weight.dtype is _F32 and x.is_contiguous() and not torch.is_autocast_enabled("cpu"):
            out_features, in_features = weight.shape
            one_row, large = x.numel() == in_features, weight.numel() >= LARGE_MATRIX
            column_major = weight.stride() == (1, out_features)
            if one_row and column_major and large:
                threads = torch.get_num_threads()
                if 1 < threads <= out_features:
                    return split_gemv(x, weight, bias, threads)
            elif (column_major and large or weight.is_contiguous() and (large or not one_row)) and onednn_available():
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def split_gemv(x, weight, bias, parts: int):
    """One row x (..., in) by a column-major weight (out, in) with at least `parts` outputs, as `parts`
    products of a slice of the outputs each: one batched product (torch.bmm runs one per thread) over
    strided views of the weight, no copy; outputs left over when `parts` does not divide them (GPT-2's
    50257-token head) take one more small product."""
    if F is None:
        _bind_torch()
    out_features, in_features = weight.shape
    n = out_features // parts
    split = n * parts
    slices = weight.as_strided((parts, in_features, n), (n, weight.stride(1), 1))  # slice j: W^T[:, j*n:(j+1)*n]
    xs = x.as_strided((parts, 1, in_features), (0, in_features, 1))  # x, once per slice
    if bias is None:
        y = torch.bmm(xs, slices)
    else:
        y = torch.baddbmm(bias[:split].view(parts, 1, n), xs, slices)
    y = y.view(*x.shape[:-1], split)  # (parts, 1, n) holds the outputs in order
    if split < out_features:
        rest = F.linear(x, weight[split:], None if bias is None else bias[split:])
        y = torch.cat((y, rest), dim=-1)
    return y


def gemv_without_onednn(x, weight, bias=None):
    """F.linear of one bfloat16 row by a row-major weight through torch's own matrix-vector kernel
    (float32 accumulation over each weight row, split over threads), which reads bfloat16 weights faster
    than the oneDNN product F.linear picks on CPUs with native bfloat16. torch reaches that
    kernel only while its process-wide oneDNN switch is off, so the switch is turned off for this one
    product and back on after it, under ONEDNN_LOCK: every other bfloat16 inference product of `linear`
    takes the same lock, so none of them (another generation's, in another thread) ever runs while it is
    off, and between products it is on. (A torch op called outside them in another thread during that
    product, a training step's, would see it off.) Where the caller turned oneDNN off, it stays off."""
    if F is None:
        _bind_torch()
    with ONEDNN_LOCK:
        if not _onednn_enabled():
            return F.linear(x, weight, bias)
        _enable_onednn(False)
        try:
            return F.linear(x, weight, bias)
        finally:
            _enable_onednn(True)


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear and it agrees with F.linear (checked once)."""
    if not _ONEDNN:
        if F is None:
            _bind_torch()
        ok = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        if ok:
            try:
                g = torch.Generator().manual_seed(0)  # not the global RNG: a training run's dropout draws from it
                x, w, b = (torch.randn(shape, generator=g) for shape in ((3, 8), (5, 8), (5,)))
                ok = torch.allclose(torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
                                    F.linear(x, w, b), atol=1e-5)
            except RuntimeError:
                ok = False
        _ONEDNN.append(ok)
    return _ONEDNN[0]


def inference_layout(matrices) -> None:
    """Lay out, in place, the matrices a model multiplies by (same values, same shapes), for the kernel
    `linear` runs for one row: decoding reads every weight once per token. A CPU float32 matrix goes
    column-major (a transposed view of an (in, out) tensor, as Hugging Face's GPT-2 keeps its Conv1D
    weights) when it has fewer than LARGE_MATRIX entries (MKL's product) or at least as many outputs as
    inputs (`split_gemv`), and stays row-major when larger with fewer outputs than inputs (an MLP's down
    projection: oneDNN's linear); without oneDNN every float32 matrix goes column-major. A CPU bfloat16
    matrix goes row-major (`gemv_without_onednn`). Anything else is left as it is: other dtypes and
    devices, and whatever is not a plain 2-D tensor (a quantized module's packed weight). The rule depends
    on shapes only, so a model computes the same numbers on every run."""
    if F is None:
        _bind_torch()
    with torch.no_grad():
        for p in matrices:
            if type(p) not in _PLAIN or p.dim() != 2 or p.device.type != "cpu":
                continue
            if p.dtype == torch.bfloat16 and not p.is_contiguous():
                p.data = p.data.contiguous()
            elif p.dtype == torch.float32 and p.stride(0) != 1 and (
                    not onednn_available() or p.numel() < LARGE_MATRIX or p.shape[0] >= p.shape[1]):
                p.data = p.data.t().contiguous().t()


# --- the machine probe -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """What one CPU model with one torch version measured, microseconds per product, and what follows."""

    cpu: str
    torch: str
    timings_us: dict  # float32_prompt, bfloat16_prompt, float32_row, bfloat16_row, dequantize_row[, int4pack_row]

    @property
    def bfloat16_fast(self) -> bool:
        """bfloat16 products beat float32 ones here, a prompt's and one row's alike (native bfloat16)."""
        t = self.timings_us
        return t["bfloat16_prompt"] < t["float32_prompt"] and t["bfloat16_row"] < t["float32_row"]

    @property
    def quant_backend(self) -> str:
        """"int4pack" where torch's packed int4 kernel multiplies one row faster than dequantizing does."""
        t = self.timings_us
        return "int4pack" if t.get("int4pack_row", math.inf) < t["dequantize_row"] else "dequantize"

    def to_dict(self) -> dict:
        return {"version": PROBE_VERSION, "cpu": self.cpu, "torch": self.torch, "timings_us": dict(self.timings_us)}

    @classmethod
    def from_dict(cls, d: dict) -> "Probe":
        needed = ("float32_prompt", "bfloat16_prompt", "float32_row", "bfloat16_row", "dequantize_row")
        timings = d["timings_us"]
        if d["version"] != PROBE_VERSION or not all(isinstance(timings[k], (int, float)) for k in needed):
            raise ValueError("not this version's probe")
        return cls(cpu=str(d["cpu"]), torch=str(d["torch"]), timings_us={k: float(v) for k, v in timings.items()})


_PROBES: dict[Path, Probe] = {}  # this process's probes, by cache file


def cache_dir() -> Path:
    """Where lbdl keeps what it measured of this machine: $LBDL_CACHE_DIR, else $XDG_CACHE_HOME/lbdl,
    else ~/.cache/lbdl."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lbdl"


def probe_path() -> Path:
    """This machine's cache file: one per CPU model, torch version and PROBE_VERSION."""
    import torch

    key = hashlib.sha256(f"{cpu_model()}\n{torch.__version__}".encode()).hexdigest()[:16]
    return cache_dir() / f"probe-v{PROBE_VERSION}-{key}.json"


def probe(refresh: bool = False) -> Probe:
    """This machine's probe: from memory, else from its cache file, else measured now (a few hundred
    milliseconds) and written there. A cache file that cannot be read or is not this machine's is measured
    again and rewritten; one that cannot be written leaves the probe in memory only, and so does a
    measurement that other processes visibly slowed down (CONTENDED_US). `refresh` measures again."""
    import torch

    path = probe_path()
    if not refresh and path in _PROBES:
        return _PROBES[path]
    found = None
    if not refresh:
        try:
            found = Probe.from_dict(json.loads(path.read_text(encoding="utf-8")))
            if (found.cpu, found.torch) != (cpu_model(), torch.__version__):
                found = None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            found = None
    if found is None:
        found = Probe(cpu=cpu_model(), torch=torch.__version__, timings_us=_measure())
        if found.timings_us["float32_row"] > CONTENDED_US:  # other processes held the cores: measure next time
            _PROBES[path] = found
            return found
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(found.to_dict(), indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass
    _PROBES[path] = found
    return found


def _time_pair(first, second, calls: int = 15, budget_s: float = 0.08) -> tuple[float, float]:
    """The fastest of up to `calls` calls of each (after one warm-up), alternating, so that both see the same
    machine (other processes come and go), stopping once `budget_s` is spent; microseconds."""
    best = [math.inf, math.inf]
    first(), second()
    start = time.perf_counter()
    for _ in range(calls):
        for i, fn in enumerate((first, second)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best[0] * 1e6, best[1] * 1e6


def _measure() -> dict[str, float]:
    """Microseconds per product on 1024 x 1024 matrices laid out as `inference_layout` lays them out, through
    `linear`: a 32-row prompt (one matrix: compute-bound), and one row (a decoding step: 16 matrices in
    turn, 64 MiB of float32, more than a CPU's caches, as a model's weights are), float32 against bfloat16;
    and one float32 row by a 4-bit matrix (16 in turn) as quant.linear's backends multiply it: the codes
    dequantized into a float32 buffer (x = s q + z per group of 32) then F.linear, against torch's packed
    int4 kernel (bfloat16 activations)."""
    if F is None:
        _bind_torch()
    n, group, copies = 1024, 32, 16
    g = torch.Generator().manual_seed(0)
    timings = {}
    with torch.inference_mode():
        base = torch.randn(n, n, generator=g) * 0.02
        sets = {dtype: [base.to(dtype, copy=True) for _ in range(copies)] for dtype in (torch.float32, torch.bfloat16)}
        for weights in sets.values():
            inference_layout(weights)
        prompt = {dtype: torch.randn(32, n, generator=g).to(dtype) for dtype in sets}
        row = {dtype: torch.randn(1, n, generator=g).to(dtype) for dtype in sets}
        timings["float32_prompt"], timings["bfloat16_prompt"] = _time_pair(
            *(lambda dtype=dtype: linear(prompt[dtype], sets[dtype][0]) for dtype in sets))
        rows = _time_pair(*(lambda dtype=dtype: [linear(row[dtype], w) for w in sets[dtype]] for dtype in sets))
        timings["float32_row"], timings["bfloat16_row"] = (t / copies for t in rows)
        sets.clear()
        x = row[torch.float32]
        q = torch.randint(0, 16, (n, n), generator=g, dtype=torch.int32)
        scales = torch.rand(n // group, 1, n, generator=g) * 0.01
        zeros = -8 * scales
        codes = [q.t().contiguous().to(torch.uint8).view(n // group, group, n) for _ in range(copies)]
        buffer = torch.empty(n // group, group, n)

        def dequantize():
            for c in codes:
                torch.addcmul(zeros, c, scales, out=buffer)
                F.linear(x, buffer.view(n, n).t())

        int4pack = None
        ops = torch.ops.aten
        if hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu"):
            try:
                packed = ops._convert_weight_to_int4pack_for_cpu(q, 1)
                packs = [packed.clone() for _ in range(copies)]
                pairs = torch.stack([scales[:, 0], zeros[:, 0]], dim=-1).to(torch.bfloat16)  # (n/32, n, 2)

                def int4pack():
                    for p in packs:
                        ops._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), p, group, pairs).float()

                int4pack()
            except RuntimeError:
                int4pack = None
        if int4pack is None:
            timings["dequantize_row"] = _time_pair(dequantize, lambda: None)[0] / copies
        else:
            timings["dequantize_row"], timings["int4pack_row"] = (t / copies for t in _time_pair(dequantize, int4pack))
    return timings


def compute_dtype(stored: torch.dtype, requested: torch.dtype | None, device) -> tuple[torch.dtype, str | None]:
    """The dtype a model whose float weights are stored in `stored` computes in, and a one-line note when an
    explicitly requested dtype is the slow choice on this machine (None otherwise).

    On a CPU, float16 is refused (hundreds of times slower than float32); `requested` None (auto) keeps
    float32, turns float16 into float32, and keeps bfloat16 only where the probe measured bfloat16 products
    faster than float32 ones (native bfloat16), float32 elsewhere; an explicit float32 or bfloat16 is
    honoured. On other devices: as requested, else as stored."""
    import torch

    if resolve_device(device).type != "cpu":
        return requested or stored, None
    if requested == torch.float16:
        raise ConfigError("float16 is hundreds of times slower on a CPU; use --compute-dtype float32 or bfloat16")
    if requested is None:
        if stored == torch.bfloat16 and probe().bfloat16_fast:
            return torch.bfloat16, None
        return torch.float32, None
    if requested == torch.bfloat16 and not probe().bfloat16_fast:
        t = probe().timings_us
        return requested, (f"bfloat16 is slow on this CPU (one row {t['bfloat16_row'] / t['float32_row']:.1f}x "
                           f"float32's time, a prompt {t['bfloat16_prompt'] / t['float32_prompt']:.1f}x); "
                           f"--compute-dtype auto or float32 runs faster")
    return requested, None


def quant_backend(device) -> str:
    """quant.linear's backend for a quantized model on `device`: on a CPU the faster of "int4pack" (torch's
    packed int4 kernel) and "dequantize" (the weight dequantized into a reused buffer, then F.linear), as the
    probe measured them; elsewhere "int4pack", which keeps the block bytes where the kernel does not apply."""
    if resolve_device(device).type != "cpu":
        return "int4pack"
    return probe().quant_backend


def system_info() -> dict:
    """What `lbdl info --system` shows: the CPU's capabilities, this machine's probe and what it chose."""
    p = probe()
    return {
        "cpu": cpu_capabilities(),
        "probe": {"cache": str(probe_path()), **p.to_dict()},
        "choices": {
            "compute_dtype_for_bfloat16_weights": "bfloat16" if p.bfloat16_fast else "float32",
            "quant_backend": p.quant_backend,
            "onednn_linear": onednn_available(),
        },
    }
