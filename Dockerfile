# radgate, CPU image: `radgate serve` (DICOM on 11112, dashboard on 8080).
# The model directory and the configuration are volumes; the spool and database live in
# /srv/radgate/var. The configuration must listen on 0.0.0.0 (ae.host, web.host) and the
# dashboard needs a token: give it as RADGATE_WEB_TOKEN. docker-compose.yml shows all of it.
#   docker build -t radgate .
#   docker run -v $PWD/models:/srv/radgate/models:ro -v $PWD/docker/config.yaml:/srv/radgate/config.yaml:ro \
#              -v radgate-var:/srv/radgate/var -e RADGATE_WEB_TOKEN=... -p 11112:11112 -p 8080:8080 radgate
FROM python:3.11-slim-bookworm

# PyTorch's CPU wheels: the CUDA ones are gigabytes this image does not use.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /srv/radgate
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY inference inference
COPY training training
COPY db db
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" . \
    && useradd --system --uid 10001 --home-dir /srv/radgate radgate \
    && mkdir -p var models \
    && chown -R radgate var

USER radgate
EXPOSE 11112 8080
VOLUME ["/srv/radgate/var", "/srv/radgate/models"]
# Ready: model loaded, database reachable, spool writable above its watermark, scheduler running.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=5)"]
ENTRYPOINT ["radgate", "serve"]
CMD ["--config", "/srv/radgate/config.yaml"]
