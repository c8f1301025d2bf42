"""What a node's device can do: memory (bytes) and compute (TFLOPS).

Detected on Linux (``/proc/cpuinfo``, DMI product name, ``psutil``) and macOS (``sysctl``,
``system_profiler``), with the GPU through torch when torch is installed (CUDA, or Apple's MPS).
FLOPS are peak estimates, not measurements: a table of known GPUs and Apple chips, else
``cores x clock x FLOP per cycle`` (SIMD width and FMA units from the CPU flags, or the GPU's
SM count and CUDA cores per SM).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field

logger = logging.getLogger(__name__)

TFLOPS = 1e12


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

#: Peak dense TFLOPS (fp32, fp16/bf16 tensor, int8 tensor) of GPUs and Apple chips, by a
#: substring of their name (first match wins, so longer names come first). Vendor datasheets.
CHIP_FLOPS: dict[str, DeviceFlops] = {
    # NVIDIA data centre
    "H200": DeviceFlops(66.9, 989.4, 1978.9),
    "H100 PCIe": DeviceFlops(51.2, 756.0, 1513.0),
    "H100": DeviceFlops(66.9, 989.4, 1978.9),
    "A100": DeviceFlops(19.5, 312.0, 624.0),
    "L40S": DeviceFlops(91.6, 362.1, 733.0),
    "L4": DeviceFlops(30.3, 121.0, 242.0),
    "A10G": DeviceFlops(31.2, 125.0, 250.0),
    "A10": DeviceFlops(31.2, 125.0, 250.0),
    "T4": DeviceFlops(8.1, 65.0, 130.0),
    "V100": DeviceFlops(15.7, 125.0, 62.8),
    # NVIDIA consumer
    "RTX 5090": DeviceFlops(104.8, 209.5, 838.0),
    "RTX 4090": DeviceFlops(82.6, 165.2, 660.6),
    "RTX 4080": DeviceFlops(48.7, 97.5, 389.9),
    "RTX 3090": DeviceFlops(35.6, 71.0, 284.0),
    "RTX 3080": DeviceFlops(29.8, 59.5, 238.0),
    # Apple silicon (GPU)
    "Apple M4 Max": DeviceFlops(18.4, 36.9, 73.7),
    "Apple M4 Pro": DeviceFlops(9.2, 18.4, 36.9),
    "Apple M4": DeviceFlops(4.3, 8.6, 17.2),
    "Apple M3 Max": DeviceFlops(14.2, 28.4, 56.8),
    "Apple M3 Pro": DeviceFlops(4.97, 9.94, 19.88),
    "Apple M3": DeviceFlops(3.55, 7.1, 14.2),
    "Apple M2 Ultra": DeviceFlops(27.2, 54.4, 108.8),
    "Apple M2 Max": DeviceFlops(13.49, 26.98, 53.96),
    "Apple M2 Pro": DeviceFlops(5.68, 11.36, 22.72),
    "Apple M2": DeviceFlops(3.55, 7.1, 14.2),
    "Apple M1 Ultra": DeviceFlops(21.23, 42.46, 84.92),
    "Apple M1 Max": DeviceFlops(10.6, 21.2, 42.4),
    "Apple M1 Pro": DeviceFlops(5.3, 10.6, 21.2),
    "Apple M1": DeviceFlops(2.29, 4.58, 9.16),
}

#: CUDA cores (fp32 lanes) per streaming multiprocessor, by compute capability major version.
_CUDA_CORES_PER_SM = {6: 64, 7: 64, 8: 128, 9: 128, 10: 128, 12: 128}


def chip_flops(name: str) -> DeviceFlops | None:
    """The peak FLOPS of a known GPU or Apple chip whose name contains a ``CHIP_FLOPS`` key."""
    for key, flops in CHIP_FLOPS.items():
        if key in name:
            return flops
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, a container's cpuset, a
    node pinned to one core), not the machine's core count; the machine's count where the
    platform has no affinity (macOS)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_flops(cores: int, ghz: float, flags: set[str]) -> DeviceFlops:
    """Peak CPU estimate: ``cores x GHz x fp32 FLOP per cycle``.

    FLOP per cycle: two FMA units of the widest SIMD (AVX-512: 2 x 16 lanes x 2 = 64; AVX2 with
    FMA: 32; NEON (aarch64): 16; otherwise SSE: 8). fp16 as fp32 (no native fp16 math assumed),
    int8 twice fp32.
    """
    if "avx512f" in flags:
        per_cycle = 64
    elif "avx2" in flags and "fma" in flags:
        per_cycle = 32
    elif "asimd" in flags or "neon" in flags:
        per_cycle = 16
    else:
        per_cycle = 8
    fp32 = max(cores, 1) * max(ghz, 0.0) * 1e9 * per_cycle / TFLOPS
    return DeviceFlops(fp32=fp32, fp16=fp32, int8=2 * fp32)


def cuda_flops(name: str, major: int, sm_count: int, clock_khz: int) -> DeviceFlops:
    """Peak estimate of a CUDA GPU: the ``CHIP_FLOPS`` entry, else ``SMs x cores/SM x 2 x clock``
    (fp16 and int8 at 2x and 4x fp32; 0 when the clock is unknown)."""
    known = chip_flops(name)
    if known is not None:
        return known
    fp32 = sm_count * _CUDA_CORES_PER_SM.get(major, 64) * 2 * clock_khz * 1e3 / TFLOPS
    return DeviceFlops(fp32=fp32, fp16=2 * fp32, int8=4 * fp32)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _linux_cpu() -> tuple[str, set[str]]:
    """CPU name and flags from /proc/cpuinfo (x86 "model name"/"flags", Arm "Features")."""
    name, flags = "", set()
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name or platform.processor() or platform.machine() or "Unknown CPU", flags


def _linux_model() -> str:
    product = _read("/sys/devices/virtual/dmi/id/product_name") or _read("/proc/device-tree/model").rstrip("\x00")
    return product or f"Linux {platform.machine()}"


def _cpu_ghz() -> float:
    import psutil

    try:
        freq = psutil.cpu_freq()
    except Exception:  # psutil raises on some virtual machines
        freq = None
    if freq is not None and (freq.max or freq.current):
        return (freq.max or freq.current) / 1000.0
    return 3.0  # unknown: a typical clock


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _mac_model() -> str:
    """Machine name from ``system_profiler SPHardwareDataType`` ("MacBook Pro"), else hw.model."""
    try:
        out = subprocess.run(["system_profiler", "SPHardwareDataType"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model Name" and value.strip():
            return value.strip()
    return _sysctl("hw.model") or "Mac"


@dataclass(frozen=True)
class _GPU:
    name: str
    memory: int
    flops: DeviceFlops


def _torch_gpu() -> _GPU | None:
    """The first CUDA GPU, or Apple's MPS device, as torch sees it; None without torch or a GPU."""
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return None
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            clock = int(getattr(props, "clock_rate", 0) or 0)  # kHz, where this torch build reports it
            return _GPU(props.name, int(props.total_memory),
                        cuda_flops(props.name, int(props.major), int(props.multi_processor_count), clock))
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            import psutil

            chip = _sysctl("machdep.cpu.brand_string") or "Apple GPU"
            return _GPU(chip, int(psutil.virtual_memory().total), chip_flops(chip) or DeviceFlops())
    except Exception:
        logger.warning("GPU detection through torch failed", exc_info=True)
    return None


def device_capabilities(memory_override: int | None = None, detect_gpu: bool = True) -> DeviceCapabilities:
    """Detect this machine's capabilities.

    ``memory`` is the GPU's memory when torch sees a CUDA GPU (the weights live there), else the
    machine's total memory (Apple silicon's unified memory included). ``memory_override``
    (bytes; the setting ``node.memory``) replaces it (used to run several nodes with different
    weights on one machine).

    Raises:
        ValueError: the memory is negative.
    """
    import psutil

    vm = psutil.virtual_memory()
    # physical cores, but no more than this process may use
    cores = min(psutil.cpu_count(logical=False) or os.cpu_count() or 1, usable_cpus())
    if platform.system() == "Darwin":
        chip = _sysctl("machdep.cpu.brand_string") or platform.processor() or "Apple"
        model = _mac_model()
        flags = {"neon"} if platform.machine() == "arm64" else set(_sysctl("machdep.cpu.features").lower().split())
    else:
        chip, flags = _linux_cpu()
        model = _linux_model()
    memory = int(vm.total)
    flops = chip_flops(chip) or cpu_flops(cores, _cpu_ghz(), flags)
    gpu = _torch_gpu() if detect_gpu else None
    if gpu is not None:
        flops = gpu.flops if gpu.flops.fp32 else flops
        if not gpu.name.startswith("Apple"):
            memory = gpu.memory
    if memory_override is not None:
        if memory_override < 0:
            raise ValueError(f"memory must be >= 0 bytes, got {memory_override}")
        memory = memory_override
    return DeviceCapabilities(
        model=model,
        chip=chip,
        memory=int(memory),
        flops=flops,
        available_memory=int(vm.available),
        gpu=gpu.name if gpu is not None else "",
        gpu_memory=gpu.memory if gpu is not None else 0,
    )
