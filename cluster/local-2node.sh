#!/usr/bin/env bash
# A real 2-node Ray cluster on one machine, for tests and demos: the head on 127.0.0.2, a worker on
# 127.0.0.3. Both are loopback addresses other than 127.0.0.1, which Ray 2.60 rewrites to the machine's
# external interface (so Ray's own traffic would leave loopback).
#
#   cluster/local-2node.sh start          # head + worker, then waits until both nodes are alive
#   pipeline submit ray configs/smoke.yaml --address http://127.0.0.2:8265
#   cluster/local-2node.sh stop           # stops both, by the PIDs this script recorded
#   cluster/local-2node.sh start-worker   # (re)start only the worker node; stop-worker stops it
#   cluster/local-2node.sh status
#
# Each node is `ray start --block` in the background in its own process group, so stopping it by
# that group stops exactly that node (`ray stop` would end every Ray process on the machine).
# Token authentication is on, with the cluster's own token in a 0600 file of the 0700 state dir (Ray 2.60's
# `ray start` makes none, and ~/.ray/auth_token would be written 0644): clients
#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$PIPELINE_RAY_STATE/auth_token
# (`pipeline submit ray` turns RAY_AUTH_MODE on by itself when RAY_AUTH_TOKEN_PATH is set).
# Settings (environment): PIPELINE_RAY_STATE (PIDs, logs, token; default /tmp/pipeline-ray-2node),
# RAY_AUTH_TOKEN_PATH (a token file of your own instead; made if missing),
# RAY_HEAD_PORT (6390), RAY_DASHBOARD_PORT (8265), CPUS_PER_NODE (1), RAY (the ray CLI; default: the
# one beside this checkout's .venv python, else the one on PATH).
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
STATE=${PIPELINE_RAY_STATE:-/tmp/pipeline-ray-2node}
HEAD_IP=127.0.0.2
WORKER_IP=127.0.0.3
HEAD_PORT=${RAY_HEAD_PORT:-6390}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
CPUS=${CPUS_PER_NODE:-1}
WORKER_TEMP=/tmp/ray-$WORKER_IP-$HEAD_PORT # short: Ray's socket paths under it have a length limit
if [[ -z ${RAY:-} ]]; then
    if [[ -x $HERE/.venv/bin/ray ]]; then RAY=$HERE/.venv/bin/ray; else RAY=$(command -v ray); fi
fi
# Jobs submitted to the cluster run `python -m pipeline ...`: the python beside this ray CLI.
export PATH="$(dirname "$RAY"):$PATH"
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 GLOO_SOCKET_IFNAME=lo
export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$STATE/auth_token}
unset RAY_AUTH_TOKEN # it would win over the token file
mkdir -p "$STATE"
chmod 700 "$STATE"

alive() { [[ -f $STATE/$1.pid ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

stop_node() {
    # Each node runs in its own process group (setsid below): SIGTERM to the group, then SIGKILL to
    # whatever is left after 10 s (Ray's agents outlive a raylet that died first).
    if [[ -f $STATE/$1.pid ]]; then
        local pid
        pid=$(cat "$STATE/$1.pid")
        kill -TERM -- "-$pid" 2>/dev/null || true
        for _ in $(seq 20); do
            pgrep -g "$pid" >/dev/null || break
            sleep 0.5
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/$1.pid"
}

alive_nodes() {
    "$(dirname "$RAY")/python" - "$HEAD_IP" "$HEAD_PORT" <<'PY' 2>/dev/null || echo 0
import sys, ray
ray.init(address=f"{sys.argv[1]}:{sys.argv[2]}", _node_ip_address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
PY
}

wait_for_nodes() {
    for _ in $(seq 120); do
        if [[ $(alive_nodes | tail -1) -ge $1 ]]; then return; fi
        sleep 1
    done
    echo "the cluster did not reach $1 alive node(s); see $STATE/*.log" >&2
    exit 1
}

make_token() {
    [[ -s $RAY_AUTH_TOKEN_PATH ]] && return
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$RAY_AUTH_TOKEN_PATH") # 256 random bits, hex
}

start_head() {
    alive head && return
    make_token
    setsid "$RAY" start --head --block --node-ip-address=$HEAD_IP --port="$HEAD_PORT" --num-cpus="$CPUS" \
        --dashboard-host=$HEAD_IP --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true \
        >"$STATE/head.log" 2>&1 &
    echo $! >"$STATE/head.pid"
    wait_for_nodes 1
}

start_worker() {
    alive worker && return
    # its own temp dir, as a second machine has: in the head's, the two nodes' runtime-env agents would
    # unpack, and delete, the same job's working dir under each other
    setsid "$RAY" start --block --address=$HEAD_IP:"$HEAD_PORT" --node-ip-address=$WORKER_IP --num-cpus="$CPUS" \
        --temp-dir="$WORKER_TEMP" >>"$STATE/worker.log" 2>&1 &
    echo $! >"$STATE/worker.pid"
}

case "${1:-}" in
start)
    start_head
    start_worker
    wait_for_nodes 2
    echo "2-node Ray cluster up: head $HEAD_IP:$HEAD_PORT, worker $WORKER_IP; dashboard / job API http://$HEAD_IP:$DASHBOARD_PORT; token: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    ;;
start-worker)
    start_worker
    wait_for_nodes 2
    ;;
stop-worker) stop_node worker ;;
stop)
    stop_node worker
    rm -rf "$WORKER_TEMP"
    stop_node head
    # Ray leaves the stopped head's address in /tmp/ray/ray_current_cluster, where a later
    # `ray.init()` would look for a cluster to join.
    if grep -qs "^$HEAD_IP:$HEAD_PORT\$" /tmp/ray/ray_current_cluster; then
        rm -f /tmp/ray/ray_current_cluster
    fi
    ;;
status) echo "alive nodes: $(alive_nodes | tail -1)" ;;
*)
    echo "usage: $0 start|stop|start-worker|stop-worker|status" >&2
    exit 2
    ;;
esac
