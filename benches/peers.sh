#!/usr/bin/env bash
# Peers for the side-by-side benchmark: NATS (core + JetStream) and Redis.
#
#   benches/peers.sh install      install nats-server and redis-server (Debian) if missing
#   benches/peers.sh start DIR    start both on loopback, non-default ports, data in DIR;
#                                 writes DIR/peers.env (NATS_URL, REDIS_URL, NATS_PID, REDIS_PID)
#   benches/peers.sh stop DIR     stop both by the PIDs in DIR
#   benches/peers.sh serve nats|redis DIR PORT
#                                 run one peer in the foreground (exec: the caller
#                                 holds its PID), data kept in DIR across restarts:
#                                 JetStream file storage; Redis with an append-only
#                                 file fsynced every second (the restart scenario)
#
# Ports: NATS_PORT (default 14222), REDIS_PORT (default 16379).
set -euo pipefail

nats_port=${NATS_PORT:-14222}
redis_port=${REDIS_PORT:-16379}

install() {
    local missing=()
    command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
    command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "peers: installing ${missing[*]}" >&2
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo ${sudo:+-n} env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        $sudo ${sudo:+-n} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
        # The Debian package starts a system redis on 6379; the benchmark runs its own.
        if [[ " ${missing[*]} " == *" redis-server "* ]]; then
            $sudo systemctl disable --now redis-server >/dev/null 2>&1 || true
        fi
    fi
}

wait_port() {
    local port=$1 name=$2
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "peers: $name did not open 127.0.0.1:$port" >&2
    return 1
}

start() {
    local dir=$1
    install
    for port in "$nats_port" "$redis_port"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "peers: 127.0.0.1:$port is already in use (a peer left running? benches/peers.sh stop DIR)" >&2
            return 1
        fi
    done
    mkdir -p "$dir/nats" "$dir/redis"
    local nats redis
    nats=$(command -v nats-server || echo /usr/sbin/nats-server)
    redis=$(command -v redis-server || echo /usr/bin/redis-server)
    # JetStream with file storage in DIR; the default 64 MB pending limit per
    # subscriber, as shipped.
    "$nats" -a 127.0.0.1 -p "$nats_port" -js -sd "$dir/nats" >"$dir/nats.log" 2>&1 &
    echo $! >"$dir/nats.pid"
    # No snapshots, no AOF: Pub/Sub and Streams in memory, as Redis is usually run
    # for this; output buffers unlimited so a slow benchmark subscriber is not cut.
    "$redis" --bind 127.0.0.1 --port "$redis_port" --dir "$dir/redis" --save "" \
        --appendonly no --protected-mode no \
        --client-output-buffer-limit "pubsub 0 0 0" >"$dir/redis.log" 2>&1 &
    echo $! >"$dir/redis.pid"
    if ! wait_port "$nats_port" nats-server || ! wait_port "$redis_port" redis-server \
        || ! kill -0 "$(cat "$dir/nats.pid")" 2>/dev/null || ! kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null; then
        echo "peers: start failed; logs in $dir/nats.log and $dir/redis.log" >&2
        stop "$dir"
        return 1
    fi
    cat >"$dir/peers.env" <<ENV
NATS_URL=nats://127.0.0.1:$nats_port
REDIS_URL=redis://127.0.0.1:$redis_port/
NATS_PID=$(cat "$dir/nats.pid")
REDIS_PID=$(cat "$dir/redis.pid")
ENV
    cat "$dir/peers.env"
}

stop() {
    local dir=$1 pid
    for name in nats redis; do
        [ -f "$dir/$name.pid" ] || continue
        pid=$(cat "$dir/$name.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/$name.pid"
    done
}

serve() {
    local name=$1 dir=$2 port=$3
    install
    mkdir -p "$dir"
    case "$name" in
        nats) exec "$(command -v nats-server || echo /usr/sbin/nats-server)" \
            -a 127.0.0.1 -p "$port" -js -sd "$dir" ;;
        redis) exec "$(command -v redis-server || echo /usr/bin/redis-server)" \
            --bind 127.0.0.1 --port "$port" --dir "$dir" --save "" \
            --appendonly yes --appendfsync everysec --protected-mode no ;;
        *) echo "peers: serve nats|redis DIR PORT" >&2; return 2 ;;
    esac
}

case "${1:-}" in
    install) install ;;
    start) start "${2:?usage: peers.sh start DIR}" ;;
    stop) stop "${2:?usage: peers.sh stop DIR}" ;;
    serve) serve "${2:?usage: peers.sh serve nats|redis DIR PORT}" "${3:?DIR}" "${4:?PORT}" ;;
    *) echo "usage: peers.sh install | start DIR | stop DIR | serve nats|redis DIR PORT" >&2; exit 2 ;;
esac
