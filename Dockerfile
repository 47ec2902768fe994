# Grand Challenge algorithm image for MIDOG 2025 track 2 (atypical vs normal mitotic figures).
#
#   ./build.sh     build the image (tag midog25-atypical)
#   ./test.sh      run it on test/input and compare with test/expected_output.json
#   ./export.sh    write the image and the weights as .tar.gz for upload
#
# The base is a slim Debian Python, not a PyTorch image: torch comes pinned from PyPI, and the
# PyPI wheel for Linux x86-64 bundles the CUDA libraries, so the same image runs on CPU or GPU.
# BASE_IMAGE can name any Debian-based image with `python` (and its pip) on PATH and useradd.
# test/container-check.sh builds such a base with debootstrap for the podman route.
ARG BASE_IMAGE=python:3.11.15-slim-bookworm
FROM ${BASE_IMAGE}

# The code also sets HF_HUB_OFFLINE and the cache folders itself; the image repeats them so that
# any other Python started in the container behaves the same. Grand Challenge gives no network,
# and only /tmp and /output are writable.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TORCH_HOME=/tmp/torch \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/matplotlib

RUN useradd --create-home --no-log-init --user-group --uid 1001 user

# Dependencies first, so that a code or weights change reuses this (large) layer.
COPY requirements.txt /tmp/requirements.txt
RUN python -m pip install --no-cache-dir --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

WORKDIR /opt/app
COPY model/ /opt/app/model/
COPY process.py /opt/app/process.py
COPY weights/ /opt/app/weights/

# The files stay owned by root, so the user that runs the algorithm cannot change them.
USER user

# process.py reads /input and writes /output by default. It takes the weights from /opt/ml/model
# when Grand Challenge unpacks an uploaded model there, else from /opt/app/weights.
ENTRYPOINT ["python", "/opt/app/process.py"]
