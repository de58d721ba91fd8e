# The web app (or the API) in a container, in three stages:
#   models:  the model files: converted once (onnx, tflite2onnx and npm live only here; no torch), or
#            taken as they are from OFFLINE/models
#   build:   a virtual environment with ONNX Runtime, FAISS, Streamlit, FastAPI, pymilvus and lookalike,
#            from the registries or from the wheels in OFFLINE/wheels (no registry reached). Not Milvus
#            Lite (170 MB): a container's catalog is on the local store or on a Milvus server
#   runtime: the base image, that environment and the models; a non-root user; a health check
# Dependencies are installed before the source is copied (a code change rebuilds only the last layers),
# at the versions of requirements.lock (a constraints file: only what each stage needs is installed).
#
#   docker build -t lookalike .
#   docker run -p 8501:8501 -v "$PWD/catalogs/sneakers:/catalog" lookalike
#   docker run -p 8000:8000 -v "$PWD/catalogs/sneakers:/catalog" lookalike serve --catalog /catalog --host 0.0.0.0
#
# Offline (an air-gapped site, or a machine whose containers reach no registry): a base image with
# python3 and python3-venv, and a directory in the build context holding wheels/ (every wheel the
# runtime needs, lookalike's own included) and models/ (what `lookalike models pull` wrote):
#   docker build --build-arg BASE=debian-python:bookworm --build-arg OFFLINE=offline -t lookalike .
# `docker/check` does all of it from Debian's packages and checks the image it makes (README).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS models
ARG OFFLINE=docker/offline
WORKDIR /build
COPY ${OFFLINE}/ /offline/
COPY pyproject.toml requirements.lock ./
# only what the conversion reads, so editing the rest of the code does not convert again
COPY src/lookalike/models.py src/lookalike/errors.py pull/lookalike/
RUN if [ -f /offline/models/manifest.json ]; then \
      mkdir /models && cp /offline/models/*.onnx /offline/models/manifest.json /models/; \
    else \
      apt-get update && apt-get install -y --no-install-recommends nodejs npm && rm -rf /var/lib/apt/lists/* \
      && python3 -m venv /opt/pull \
      && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['models']))" > models.txt \
      && /opt/pull/bin/pip install --no-cache-dir -c requirements.lock -r models.txt \
      && touch pull/lookalike/__init__.py \
      && PYTHONPATH=pull LOOKALIKE_MODEL_DIR=/models /opt/pull/bin/python -c "from lookalike import models; print(models.pull())"; \
    fi

FROM ${BASE} AS build
ARG OFFLINE=docker/offline
WORKDIR /build
COPY ${OFFLINE}/ /offline/
COPY pyproject.toml requirements.lock ./
RUN python3 -m venv /opt/lookalike \
 && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; e = p['optional-dependencies']; \
print('\n'.join(p['dependencies'] + e['app'] + e['api'] + [r for r in e['milvus'] if not r.startswith('milvus-lite')]))" \
    > runtime.txt \
 && if ls /offline/wheels/*.whl >/dev/null 2>&1; then from="--no-index --find-links /offline/wheels"; else from=""; fi \
 && /opt/lookalike/bin/pip install --no-cache-dir $from -c requirements.lock -r runtime.txt
COPY README.md ./
COPY src src
# setuptools is already there (the milvus extra pins it), so the package builds without a registry
RUN /opt/lookalike/bin/pip install --no-cache-dir --no-deps --no-build-isolation . && rm -rf build src

FROM ${BASE} AS runtime
# /catalog belongs to the user, so a new named volume mounted there is writable by it
RUN useradd --create-home --uid 10001 lookalike && mkdir /catalog && chown lookalike:lookalike /catalog
COPY --from=build /opt/lookalike /opt/lookalike
COPY --from=models /models /opt/lookalike-models
COPY bin/healthcheck /usr/local/bin/lookalike-healthcheck
ENV PATH=/opt/lookalike/bin:$PATH LOOKALIKE_MODEL_DIR=/opt/lookalike-models PYTHONUNBUFFERED=1
USER lookalike
VOLUME /catalog
EXPOSE 8501 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD ["lookalike-healthcheck"]
ENTRYPOINT ["lookalike"]
CMD ["app", "--catalog", "/catalog", "--host", "0.0.0.0", "--port", "8501"]
