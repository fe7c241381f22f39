"""What the benchmark scripts say about the machine they ran on."""

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def capabilities() -> str:
    """One line for every benchmark's header: the CPU, torch's vector ISA and whether bf16 is native.
    A number is never to be read against another kind of machine."""
    import torch

    from lbdl_cli.kernels import cpu_capabilities

    c = cpu_capabilities()
    return (f"{cpu_name()}; torch {c['torch']} CPU capability {c['capability']}, "
            f"AVX-512 {'yes' if c['avx512'] else 'no'}, native bf16 {'yes' if c['native_bf16'] else 'no'}, "
            f"{c['threads']} threads" + (f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
