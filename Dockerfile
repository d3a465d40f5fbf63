# One image for every lab component: `edge run <component> --config /etc/edge/lab.toml`.
# Used by docker-compose.yml (docker compose up, or docker stack deploy on a swarm).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY edge ./edge
COPY edge_c ./edge_c
COPY edge_e ./edge_e
COPY traversal ./traversal
COPY media_relay ./media_relay
COPY mock_ucm ./mock_ucm
COPY mra_client ./mra_client
# gcc builds the native fast paths (media_relay/_fastpath.c with libsrtp2 + OpenSSL for C's SRTP,
# edge/sip/_scan.c; the Python headers come with the image) and leaves again with the -dev
# packages; libsrtp2-1 stays (installed by name, so autoremove keeps it). Without them the relay
# and the SIP scans would run their pure-Python paths.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config \
        libsrtp2-dev libsrtp2-1 libssl-dev \
    && pip install . && cd / && rm -rf /src \
    && python -c "import media_relay._fastpath as f, edge.sip._scan; assert f.HAVE_SRTP" \
    && apt-get purge -y gcc libc6-dev pkg-config libsrtp2-dev libssl-dev \
    && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*

# The lab configuration of the compose deployment: each component on its own address of the
# inside / dmz / outside networks that docker-compose.yml declares (same subnets, same addresses);
# state (certificates) on the shared volume /var/lib/edge that the one-shot `certs` service fills.
RUN mkdir -p /etc/edge /var/lib/edge && edge config show \
    --set 'lab.state_dir="/var/lib/edge"' \
    --set 'lab.demo=false' \
    --set 'dns.address="172.28.3.53"' \
    --set 'dns.internal_clients=["172.28.2.0/24", "172.28.3.0/24"]' \
    --set 'expe.0.external_address="172.28.1.10"' \
    --set 'expe.0.internal_address="172.28.2.10"' \
    --set 'expc.address="172.28.3.10"' \
    --set 'ucm.0.address="172.28.3.20"' \
    --set 'imp.0.address="172.28.3.30"' \
    --set 'cuc.0.address="172.28.3.40"' \
    > /etc/edge/lab.toml

WORKDIR /var/lib/edge
VOLUME ["/var/lib/edge"]
ENTRYPOINT ["edge"]
CMD ["--help"]
