"""Device capabilities: detection on this machine, and the FLOPS estimates."""

from __future__ import annotations

import platform

import pytest

from exo.topology.device_capabilities import (
    DeviceCapabilities,
    DeviceFlops,
    chip_flops,
    cpu_flops,
    cuda_flops,
    device_capabilities,
)


def test_this_machine() -> None:
    import psutil

    caps = device_capabilities()
    assert caps.chip and caps.chip != "Unknown" and caps.model
    assert caps.flops.fp32 > 0
    assert 0 < caps.available_memory <= psutil.virtual_memory().total
    import torch

    if torch.cuda.is_available():  # the weights live on the GPU: its memory is what counts
        props = torch.cuda.get_device_properties(0)
        assert caps.gpu == props.name and caps.gpu_memory == props.total_memory == caps.memory
    elif platform.system() != "Darwin":
        assert caps.gpu == "" and caps.gpu_memory == 0
        assert caps.memory == psutil.virtual_memory().total
    assert DeviceCapabilities.from_dict(caps.to_dict()) == caps


def test_memory_override_and_environment() -> None:
    """The override is the setting ``node.memory``, which ``EXO_MEMORY_BYTES`` sets (a flag beats it)."""
    from exo.config import load_settings

    assert device_capabilities(123_456_789).memory == 123_456_789
    env = {"EXO_MEMORY_BYTES": "987654321"}
    assert device_capabilities(load_settings(environ=env).node.memory).memory == 987_654_321
    assert device_capabilities(load_settings({"node.memory": 5}, environ=env).node.memory).memory == 5  # the flag wins
    with pytest.raises(ValueError, match="EXO_MEMORY_BYTES"):
        load_settings(environ={"EXO_MEMORY_BYTES": "8GB"})
    with pytest.raises(ValueError, match=">= 0"):
        device_capabilities(-1)


def test_cpu_flops_from_simd_width() -> None:
    # 8 cores at 2.5 GHz: AVX-512 does 64 fp32 FLOP per cycle, AVX2+FMA 32, NEON 16, SSE 8
    assert cpu_flops(8, 2.5, {"avx512f", "avx2", "fma"}).fp32 == pytest.approx(1.28)
    assert cpu_flops(8, 2.5, {"avx2", "fma"}) == DeviceFlops(0.64, 0.64, 1.28)
    assert cpu_flops(8, 2.5, {"asimd"}).fp32 == pytest.approx(0.32)
    assert cpu_flops(8, 2.5, set()).fp32 == pytest.approx(0.16)


def test_gpu_and_apple_chip_flops() -> None:
    assert cuda_flops("NVIDIA H100 80GB HBM3", 9, 132, 1_980_000) == chip_flops("H100")
    assert cuda_flops("NVIDIA H100 PCIe", 9, 114, 1_755_000).fp32 == 51.2
    assert chip_flops("Apple M2 Max").fp16 == 26.98 and chip_flops("Apple M2").fp32 == 3.55
    # an unknown GPU: SMs x cores per SM x 2 FLOP (FMA) x clock
    unknown = cuda_flops("Some Future GPU", 8, 10, 2_000_000)
    assert unknown.fp32 == pytest.approx(10 * 128 * 2 * 2e9 / 1e12)
    assert cuda_flops("Mystery", 8, 10, 0).fp32 == 0.0
