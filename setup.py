"""exo: a peer-to-peer inference cluster."""

from setuptools import find_packages, setup

install_requires = [
    "aiohttp>=3.9",
    "grpcio>=1.85.1",
    "cryptography>=42",  # mutual TLS of a cluster with a secret (exo/networking/grpc/tls.py)
    "protobuf>=7.35.1",
    "numpy>=1.26",
    "zeroconf>=0.131",
    "ifaddr>=0.2",
    "tqdm>=4.66",
    "gguf>=0.17",
    "tokenizers>=0.20",
    "jinja2>=3.1",
    "pydantic>=2.7",
    "psutil>=5.9",
    "pyyaml>=6.0",
    "prometheus-client>=0.20",
    "huggingface_hub>=2.4,<3",  # hub downloads (exo/models/hub/; its HTTP client is httpx2)
    "llguidance>=1.9,<2",  # grammar-constrained sampling (exo/inference/grammar.py)
    "tomli>=1.1; python_version < '3.11'",  # exo/models/catalogue.toml (tomllib from 3.11)
    "Pillow>=10",  # the image endpoints: pictures given to /v1/images/edits, PNGs drawn
]

extras_require = {
    # torch is pinned: an unpinned torch resolves to the newest CUDA build (gigabytes)
    # ninja builds the engine's native kernels at first use (exo/inference/torch/kernels)
    "torch": ["torch==2.13.0", "ninja>=1.11"],
    # image models (exo/inference/diffusion): Stable Diffusion pipelines through diffusers, their
    # CLIP text encoders through transformers (install with the torch extra: torch stays pinned)
    "images": ["diffusers>=0.42,<0.43", "transformers>=4.46", "Pillow>=10"],
    # tinygrad changes its API between minor versions; its CPU device needs a system clang
    "tinygrad": ["tinygrad>=0.14,<0.15"],
    # Metal on macOS; the CPU build on Linux (exo.inference.mlx preloads the system OpenBLAS)
    "mlx": ["mlx>=0.32,<0.33; sys_platform == 'darwin'", "mlx[cpu]>=0.32,<0.33; sys_platform == 'linux'"],
    "test": [
        "pytest>=8",
        "pytest-asyncio>=0.24",
        "pytest-timeout>=2.3",
        "openai>=1.50",
        "ollama>=0.4",
        "anthropic>=0.40",
        "grpcio-tools>=1.85.1",
        "transformers>=4.46",
        "accelerate>=1.0",
        "jsonschema>=4",  # structured output is checked against its schema
        "outlines-core>=0.2",  # the alternative grammar library, measured in bench/grammar_libraries.py
        "playwright>=1.49",  # drives Debian's chromium (scripts/test.sh); never `playwright install`
    ],
}

setup(
    name="exo",
    version="0.1.0",
    description="Run one model across many machines: a peer-to-peer inference cluster",
    packages=find_packages(include=["exo", "exo.*"]),
    package_data={"exo": ["networking/grpc/*.proto", "inference/torch/kernels/*.cpp", "models/catalogue.toml"]},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["exo = exo.main:main"]},
)
