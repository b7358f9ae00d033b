# radgate, CPU image. The model directory and config.yaml are mounted as volumes:
#   docker run -v $PWD/models:/srv/radgate/models -v $PWD/config.yaml:/srv/radgate/config.yaml \
#              -v radgate-var:/srv/radgate/var -p 11112:11112 radgate
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dcmtk \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/radgate
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY inference inference
COPY training training
COPY db db
COPY config.yaml config.yaml
RUN pip install --no-cache-dir . \
    && useradd --system --home /srv/radgate radgate \
    && mkdir -p var models && chown -R radgate var models

USER radgate
EXPOSE 11112
VOLUME ["/srv/radgate/var", "/srv/radgate/models"]
HEALTHCHECK --interval=30s --timeout=10s CMD echoscu -to 5 127.0.0.1 11112 || exit 1
ENTRYPOINT ["radgate", "serve"]
CMD ["--config", "/srv/radgate/config.yaml"]
