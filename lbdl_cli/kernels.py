"""Which hardware path runs what: the device, the compute dtype, and the CPU matmul kernels, in one place.

(Skeleton: the matmul routing, the machine probe and the layout rules move here from model.py,
sample/ and quant/linear.py.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")


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
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_bf16" in flags,
        "native_bf16": native_bf16,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
