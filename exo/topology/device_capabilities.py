"""What a node's device can do: memory (bytes) and compute (TFLOPS)."""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import asdict, dataclass, field

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceFlops:
    """Peak compute estimates in TFLOPS."""

    fp32: float = 0.0
    fp16: float = 0.0
    int8: float = 0.0


@dataclass(frozen=True)
class DeviceCapabilities:
    """A node's device.

    Attributes:
        model: machine model (e.g. "Linux box", "MacBook Pro").
        chip: CPU or GPU name.
        memory: memory usable for weights, in bytes (total memory of the GPU when one is used).
        flops: compute estimate.
        available_memory: memory free when measured, in bytes.
        gpu: GPU name, empty without one.
        gpu_memory: GPU memory in bytes, 0 without one.
    """

    model: str
    chip: str
    memory: int
    flops: DeviceFlops = field(default_factory=DeviceFlops)
    available_memory: int = 0
    gpu: str = ""
    gpu_memory: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceCapabilities":
        d = dict(d)
        d["flops"] = DeviceFlops(**d.get("flops", {}))
        return cls(**d)


UNKNOWN_DEVICE_CAPABILITIES = DeviceCapabilities(model="Unknown", chip="Unknown", memory=0)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "Unknown CPU"


def device_capabilities(memory_override: int | None = None) -> DeviceCapabilities:
    """Detect this machine's capabilities.

    ``memory_override`` (bytes), or the environment variable ``EXO_MEMORY_BYTES``, replaces the
    detected memory (used to run several nodes with different weights on one machine).
    """
    import psutil

    vm = psutil.virtual_memory()
    memory = vm.total
    env = os.environ.get("EXO_MEMORY_BYTES")
    if memory_override is None and env:
        memory_override = int(env)
    if memory_override is not None:
        memory = memory_override
    cores = os.cpu_count() or 1
    # rough CPU estimate: cores * 3 GHz * 32 fp32 FLOP/cycle (AVX2 FMA)
    fp32 = cores * 3e9 * 32 / 1e12
    return DeviceCapabilities(
        model=f"{platform.system()} {platform.machine()}",
        chip=_cpu_name(),
        memory=int(memory),
        flops=DeviceFlops(fp32=fp32, fp16=fp32, int8=fp32 * 2),
        available_memory=int(vm.available),
    )
