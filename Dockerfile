# execd in a container: `docker build -t execd .` (see docker-compose.yml).

# ---- build: the same `cargo build --locked` as CI, queries checked offline.
FROM rust:1-bookworm AS build
WORKDIR /src
ENV SQLX_OFFLINE=true
# Dependencies first, against a dummy main, so a source change does not
# rebuild them (this layer is cached while Cargo.toml/Cargo.lock stay the same).
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs \
 && cargo build --release --locked && rm -rf src
COPY .sqlx ./.sqlx
COPY migrations ./migrations
COPY src ./src
# touch: COPY keeps the files' mtimes, which may be older than the dummy build.
RUN touch src/main.rs && cargo build --release --locked \
 && ./target/release/execd --help >/dev/null

# ---- runtime: the interpreters jobs use (python3, node, bash), nothing else.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 nodejs bash ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*
# Jobs run as this user too. /data and /workspace must exist and be owned by it
# here: a new named volume on /data is initialised from the image (owner included).
RUN useradd --uid 10001 --user-group --create-home --shell /bin/bash execd \
 && mkdir /data /workspace && chown execd:execd /data /workspace
COPY --from=build /src/target/release/execd /usr/local/bin/execd
ENV EXECD_LISTEN=0.0.0.0:7070 EXECD_DATA_DIR=/data EXECD_WORKDIR=/workspace
# The data dir (database, callback outbox, run directories) must be a (named)
# volume, or a new container loses every job and pending callback. Programs do
# not outlive the container: on the next start the agent marks them lost (or
# queues them again, with `max_attempts`) and still delivers their callbacks.
VOLUME /data
EXPOSE 7070
USER execd
# curl is not installed; python3 is. /health needs no token.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['EXECD_LISTEN'].rsplit(':',1)[1], timeout=4)"]
# Each job runs under a supervisor process, forked by the agent's zygote
# (`execd supervise`); whatever is orphaned is re-parented to PID 1, which must reap it, and
# execd is no init: tini is. tini passes SIGTERM on to execd, which stops
# within a few seconds (jobs' programs are then ended with the container).
ENTRYPOINT ["tini", "--", "execd"]
CMD ["serve"]
