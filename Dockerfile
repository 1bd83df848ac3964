# One image for the API (gunicorn), the training and ingest workers (Celery), the reconciler and Flower.
#
#   docker build -t classifier .                                           # GPU image (CUDA wheels via pip)
#   docker build -t classifier --build-arg TENSORFLOW=tensorflow-cpu==2.21.0 .   # CPU image
#   docker build -t classifier --build-arg FETCH_WEIGHTS=0 .               # offline: no VGG19 download;
#                                                                          # run with BACKBONE_WEIGHTS=/path/to.h5
#
# The base is the official Python 3.11 slim image; the CUDA runtime comes with TensorFlow's pip wheels
# (tensorflow[and-cuda]), so the host needs only the NVIDIA driver and container toolkit.
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim

# --- builder: a virtual environment with every Python dependency ---------------------------------------
FROM ${PYTHON_IMAGE} AS builder
# The TensorFlow requirement, in place of requirements.txt's tensorflow-cpu line.
ARG TENSORFLOW="tensorflow[and-cuda]==2.21.0"
# Bytecode is kept (pip compiles it): each training job runs in a fresh process that imports TensorFlow.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /tmp/requirements.txt
# Every pin of requirements.txt but its TensorFlow line, then the TensorFlow chosen above, in one resolve.
RUN grep -v -E '^[[:space:]]*tensorflow(-cpu)?[[:space:]]*(\[|==|>|<|~|;|$)' /tmp/requirements.txt \
        > /tmp/requirements-image.txt \
    && ! grep -q -E '^[[:space:]]*tensorflow' /tmp/requirements-image.txt \
    && pip install --no-cache-dir -r /tmp/requirements-image.txt "${TENSORFLOW}" \
    && pip check

# --- weights: VGG19's ImageNet weights in the image's Keras cache (FETCH_WEIGHTS=0 skips) ----------------
FROM builder AS weights
# 1: the no-top weights (80 MB, the default feature layer); all: also the include-top file (fc2, 550 MB);
# 0: none (offline builds: set BACKBONE_WEIGHTS to a weights file, or none, when running the image).
ARG FETCH_WEIGHTS=1
WORKDIR /src
# Only the loader's modules: a change elsewhere in the code does not download the weights again.
COPY training/__init__.py training/backbone.py training/errors.py training/images.py training/
ENV KERAS_HOME=/opt/keras
# The project's own loading code downloads the file into KERAS_HOME/models and loads it into VGG19,
# so a truncated or wrong file fails the build rather than the first training job.
RUN mkdir -p /opt/keras/models \
    && case "${FETCH_WEIGHTS}" in \
         0|no|false) echo "FETCH_WEIGHTS=${FETCH_WEIGHTS}: no ImageNet weights in this image" ;; \
         1|yes|true|all) python -c "import sys; from pathlib import Path; \
from training.backbone import BackboneSpec, build_backbone; \
layers = ['avg', 'fc2'] if sys.argv[1] == 'all' else ['avg']; \
[build_backbone(BackboneSpec(feature_layer=layer), Path('/opt/keras')) for layer in layers]" "${FETCH_WEIGHTS}" \
           && ls -l /opt/keras/models ;; \
         *) echo "FETCH_WEIGHTS must be 1, all or 0, received: ${FETCH_WEIGHTS}" >&2; exit 1 ;; \
       esac \
    && rm -f /opt/keras/keras.json

# --- runtime: the venv, the weights and the code; no compilers, no pip cache, not root -------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID=10001
LABEL org.opencontainers.image.title="classifier" \
      org.opencontainers.image.description="Self-hosted transfer-learning image classifier: API, training and ingest workers"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KERAS_HOME=/opt/keras \
    MODEL_DIR=/var/lib/classifier/models \
    DATA_DIR=/var/lib/classifier/data \
    HOST=0.0.0.0 \
    PORT=8000
# The volumes' mount points exist and belong to the service user, so fresh named volumes start out
# writable by it (Docker and Podman copy the mount point's owner into an empty volume).
RUN groupadd --system --gid "${APP_UID}" classifier \
    && useradd --uid "${APP_UID}" --gid classifier --home-dir /home/classifier --create-home \
               --shell /usr/sbin/nologin classifier \
    && mkdir -p /var/lib/classifier/models /var/lib/classifier/data/datasets /var/lib/classifier/data/features \
       /var/lib/classifier/data/exports \
    && chown -R classifier:classifier /var/lib/classifier
COPY --from=builder /opt/venv /opt/venv
COPY --from=weights --chown=classifier:classifier /opt/keras /opt/keras
WORKDIR /app
COPY gunicorn.conf.py wsgi.py Procfile ./
COPY training/ training/
COPY service/ service/
# Bytecode made now, as root: the service user cannot write here, and every training job's fresh
# process would otherwise compile the project's modules again.
RUN python -m compileall -q training service
USER ${APP_UID}:${APP_UID}
EXPOSE 8000
# The API's liveness; the compose file gives the workers, reconciler and Flower checks of their own.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
