# One image for every role (api, worker, beat, migrate, flower); the command picks the role.
#
#   scripts/build-base-image.sh                        # brainscan-base:bookworm, debootstrapped locally
#   docker build -t brainscan:latest .                 # CPU (tensorflow-cpu)
#   docker build -t brainscan:gpu --build-arg TF_VARIANT=cuda .   # CUDA (tensorflow[and-cuda] only)
#
# Where an image registry is reachable, --build-arg BASE_IMAGE=python:3.11-slim-bookworm works too.
ARG BASE_IMAGE=brainscan-base:bookworm
FROM ${BASE_IMAGE}

# cpu: the project's own tensorflow-cpu. cuda: tensorflow[and-cuda] from the [gpu] extra INSTEAD of
# tensorflow-cpu (both ship the `tensorflow` package; installing one over the other breaks both).
ARG TF_VARIANT=cpu
# The unprivileged user every role runs as; it owns /data (storage, var files). Build with
# --build-arg BRAINSCAN_UID=$(id -u) to share a bind-mounted inbox with a host user.
ARG BRAINSCAN_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PATH=/opt/venv/bin:$PATH \
    BRAINSCAN_VAR_DIR=/data \
    BRAINSCAN_MODEL_DIR=/app/models \
    BRAINSCAN_NIGHTLY_INBOX_DIR=/inbox \
    MPLCONFIGDIR=/opt/matplotlib

# Dependencies first (from pyproject.toml alone), so a code edit does not reinstall TensorFlow.
# Flower is installed here, once, not at every container start.
WORKDIR /src
COPY pyproject.toml ./
COPY scripts/docker/requirements.py scripts/docker/requirements.py
RUN python3 -m venv /opt/venv \
    && python scripts/docker/requirements.py --variant "$TF_VARIANT" >/tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt 'flower>=2,<3' \
    && rm /tmp/requirements.txt

# The project itself, without its dependencies (they are all there; for cuda this keeps pip from
# pulling tensorflow-cpu back in).
COPY . /src
RUN pip install --no-deps /src \
    && if [ "$TF_VARIANT" = cpu ]; then pip check; fi \
    && mkdir -p /app \
    && cp -r /src/migrations /src/alembic.ini /src/models /app/ \
    && install -m 0755 /src/scripts/docker/entrypoint.sh /usr/local/bin/brainscan-entrypoint \
    && rm -rf /src

# Matplotlib's font cache is built here, once, not by every container at start-up.
RUN groupadd --gid "$BRAINSCAN_UID" brainscan \
    && useradd --uid "$BRAINSCAN_UID" --gid brainscan --no-create-home --home-dir /data brainscan \
    && python -c "import matplotlib.font_manager" \
    && mkdir -p /data /inbox \
    && chown -R brainscan:brainscan /data /inbox "$MPLCONFIGDIR"

WORKDIR /app
USER brainscan
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["brainscan-entrypoint"]
CMD ["brainscan", "api", "--host", "0.0.0.0"]
