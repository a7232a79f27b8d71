FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY reconq reconq
COPY core core
COPY api api
COPY gateway gateway
COPY workers workers
COPY recon recon
COPY scheduler scheduler
COPY parametermaps parametermaps
ARG EXTRAS=""
RUN pip install --no-cache-dir ".${EXTRAS}"
ENTRYPOINT ["reconq"]
