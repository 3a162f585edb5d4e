# One image for every role (api, worker, beat, migrate); the command picks the role.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    BRAINSCAN_VAR_DIR=/data \
    BRAINSCAN_MODEL_DIR=/app/models

WORKDIR /app
# Dependencies first, so code edits do not reinstall TensorFlow.
COPY pyproject.toml README.md ./
COPY brainscan/__init__.py brainscan/__init__.py
RUN mkdir -p api worker training && touch api/__init__.py worker/__init__.py training/__init__.py \
    && pip install . && pip uninstall -y brainscan

COPY brainscan brainscan
COPY api api
COPY worker worker
COPY training training
COPY migrations migrations
COPY alembic.ini ./
# ARG GPU=0 builds the CUDA variant (tensorflow[and-cuda]) for the worker-gpu service.
ARG GPU=0
RUN pip install --no-deps . && if [ "$GPU" = "1" ]; then pip install '.[gpu]'; fi

RUN useradd --create-home --uid 1000 brainscan && mkdir -p /data && chown brainscan /data
USER brainscan
VOLUME ["/data"]
EXPOSE 8000
CMD ["brainscan", "api", "--host", "0.0.0.0"]
