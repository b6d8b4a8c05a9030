#!/usr/bin/env bash
# A local hub cluster in one command: a private Redis, three `hub serve` nodes sharing it, and
# nginx in front as the load balancer, all on 127.0.0.1. Ctrl-C (or SIGTERM) stops exactly the
# processes this script started, nodes first so they drain (PROTOCOL §7), then nginx, then Redis.
#
#   deploy/local-cluster.sh                  start, print "cluster ready: ..." and run until stopped
#   deploy/local-cluster.sh --print-env      print `export` lines for clients (token secret, API key, URLs)
#   deploy/local-cluster.sh --check-config   render the nginx config and check it with `nginx -t`
#
# Environment (defaults in brackets):
#   HUB_CMD                    command that runs the hub, split on spaces [hub]; e.g. "python -m hub"
#   HUB_LB_PORT                nginx port [8000]
#   HUB_NODE_PORTS             node ports, one node each, space-separated ["8001 8002 8003"]
#   HUB_REDIS_PORT             private redis-server port [a free port; never the machine's 6379]
#   HUB_JWT_SECRET             shared token secret [local-cluster-jwt-secret-not-for-production]
#   HUB_API_KEY                shared API key [local-cluster-api-key]
#   HUB_DRAIN_DELAY            drain delay on stop [0]; HUB_DRAIN_SECONDS drain spread on stop [2]
#   HUB_CLUSTER_DIR            state dir: pids, ports, logs, cluster.env [a new mktemp dir, removed
#                              on a clean stop; a given dir is kept]
#   HUB_CLUSTER_READY_TIMEOUT  seconds to wait for every /readyz [30]
#   HUB_CLUSTER_LIFETIME       stop by itself after this many seconds once ready [0 = run until stopped]
#   Every other HUB_* variable (HUB_CONFIG, HUB_LOG_FORMAT, ...) reaches the nodes unchanged.
#
# State dir layout: cluster.env (the --print-env lines, with the real Redis URL), pids ("name pid
# port" per line), <name>.pid, <name>.log, nginx/{nginx.conf,error.log,access.log}.
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true # bash 5.2: '&' in ${x//a/b} stays literal

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
TEMPLATE="$HERE/nginx.conf.template"

HUB_CMD=${HUB_CMD:-hub}
LB_PORT=${HUB_LB_PORT:-8000}
read -r -a NODE_PORTS <<<"${HUB_NODE_PORTS:-8001 8002 8003}"
REDIS_PORT=${HUB_REDIS_PORT:-}
READY_TIMEOUT=${HUB_CLUSTER_READY_TIMEOUT:-30}
LIFETIME=${HUB_CLUSTER_LIFETIME:-0}
PYTHON=${PYTHON:-python3}
export HUB_JWT_SECRET=${HUB_JWT_SECRET:-local-cluster-jwt-secret-not-for-production}
export HUB_API_KEY=${HUB_API_KEY:-local-cluster-api-key}
export HUB_DRAIN_DELAY=${HUB_DRAIN_DELAY:-0}
export HUB_DRAIN_SECONDS=${HUB_DRAIN_SECONDS:-2}
# A relative HUB_CONFIG means relative to where the script was called from, not to $REPO.
if [[ -n ${HUB_CONFIG:-} && ${HUB_CONFIG} != /* ]]; then
    HUB_CONFIG="$PWD/$HUB_CONFIG"
    export HUB_CONFIG
fi

STATE=""
STATE_IS_TEMP=0
NAMES=()
PIDS=()
STOPPING=0

log() { printf 'local-cluster: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

# --- small helpers ------------------------------------------------------------------------

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_is_free() {
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
# As the servers do: a port held only by TIME_WAIT connections of a previous run is free.
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

# The HTTP status of a GET, or 000 when nothing answered.
http_status() {
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" || true
    else
        "$PYTHON" - "$1" <<'EOF'
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except OSError:
    print("000")
EOF
    fi
}

redis_answers() {
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1) as s:
        s.sendall(b"PING\r\n")
        sys.exit(0 if s.recv(64).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
EOF
}

# Find a binary, installing its Debian package when it is missing and we may (root + apt-get).
ensure_binary() {
    local bin=$1 package=$2 found
    found=$(command -v "$bin" 2>/dev/null || true)
    [[ -z $found && -x /usr/sbin/$bin ]] && found=/usr/sbin/$bin
    if [[ -z $found ]]; then
        if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
            die "$bin not found: install the Debian package '$package' (sudo apt-get install -y $package)"
        fi
        log "$bin not found: apt-get install -y $package"
        # We never use the package's own service (nginx on :80, redis on :6379); where the
        # machine's policy-rc.d lets the postinst start one, it is simply left alone.
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$package" >&2; then
            apt-get update -q >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$package" >&2
        fi
        found=$(command -v "$bin" 2>/dev/null || echo "/usr/sbin/$bin")
        [[ -x $found ]] || die "$bin still not found after installing $package"
    fi
    printf '%s\n' "$found"
}

# --- state dir ----------------------------------------------------------------------------

make_state_dir() {
    if [[ -n ${HUB_CLUSTER_DIR:-} ]]; then
        STATE=$HUB_CLUSTER_DIR
        mkdir -p "$STATE"
        STATE=$(cd "$STATE" && pwd)
    else
        STATE=$(mktemp -d "${TMPDIR:-/tmp}/hub-cluster.XXXXXX")
        STATE_IS_TEMP=1
        # nginx workers drop to an unprivileged user when started as root; they need to
        # traverse (not list) this dir to reach their temp files.
        chmod 0711 "$STATE"
    fi
    mkdir -p "$STATE/nginx/tmp"
}

render_nginx_conf() {
    local servers="" port conf
    for port in "${NODE_PORTS[@]}"; do
        servers+="        server 127.0.0.1:$port max_fails=2 fail_timeout=5s;"$'\n'
    done
    conf=$(<"$TEMPLATE")
    conf=${conf//@UPSTREAM_SERVERS@/${servers%$'\n'}}
    conf=${conf//@LISTEN@/127.0.0.1:$LB_PORT}
    conf=${conf//@STATE_DIR@/$STATE}
    printf '%s\n' "$conf" >"$STATE/nginx/nginx.conf"
}

nginx_args() { printf '%s\n' -p "$STATE/nginx/" -c "$STATE/nginx/nginx.conf" -e "$STATE/nginx/error.log"; }

client_env() {
    local redis_url=$1 i urls=""
    for i in "${NODE_PORTS[@]}"; do urls+="http://127.0.0.1:$i "; done
    printf 'export HUB_URL=%q\n' "http://127.0.0.1:$LB_PORT"
    printf 'export HUB_WS_URL=%q\n' "ws://127.0.0.1:$LB_PORT/ws"
    printf 'export HUB_API_KEY=%q\n' "$HUB_API_KEY"
    printf 'export HUB_JWT_SECRET=%q\n' "$HUB_JWT_SECRET"
    printf 'export HUB_NODE_URLS=%q\n' "${urls% }"
    [[ -n $redis_url ]] && printf 'export HUB_CLUSTER_REDIS_URL=%q\n' "$redis_url"
    [[ -n $STATE ]] && printf 'export HUB_CLUSTER_DIR=%q\n' "$STATE"
    return 0
}

# --- processes ----------------------------------------------------------------------------

# Start "$@" in the background from the repository root (so `python -m hub` finds the package),
# in its own session (so a Ctrl-C on the terminal reaches only this script, which then stops
# everything in order), and remember its pid under a name. The subshell execs `setsid`, which
# execs the program without forking (a background child is never a process group leader), so
# $! is the pid of the program itself and its parent is this script.
start_bg() {
    local name=$1 port=$2 setsid=()
    shift 2
    command -v setsid >/dev/null 2>&1 && setsid=(setsid)
    (cd "$REPO" && exec ${setsid[@]+"${setsid[@]}"} "$@" >"$STATE/$name.log" 2>&1 </dev/null) &
    local pid=$!
    NAMES+=("$name")
    PIDS+=("$pid")
    echo "$pid" >"$STATE/$name.pid"
    echo "$name $pid $port" >>"$STATE/pids"
    log "started $name (pid $pid, port $port)"
}

# True while pid is alive and still our own child (guards against a recycled pid).
is_ours() {
    local pid=$1 stat ppid
    kill -0 "$pid" 2>/dev/null || return 1
    [[ -r /proc/$pid/stat ]] || return 0
    stat=$(</proc/"$pid"/stat) || return 1
    stat=${stat##*) } # fields after "pid (comm) ": state ppid ...
    read -r _ ppid _ <<<"$stat"
    [[ $ppid == "$$" ]]
}

pid_of() {
    local i
    for i in "${!NAMES[@]}"; do [[ ${NAMES[$i]} == "$1" ]] && echo "${PIDS[$i]}"; done
    return 0
}

# TERM the given pids, wait up to $1 seconds for them to exit, then KILL what is left.
stop_pids() {
    local timeout=$1 pid deadline alive
    shift
    [[ $# -gt 0 ]] || return 0
    for pid in "$@"; do is_ours "$pid" && kill -TERM "$pid" 2>/dev/null; done
    deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        alive=0
        for pid in "$@"; do is_ours "$pid" && alive=1; done
        ((alive)) || break
        sleep 0.2
    done
    for pid in "$@"; do
        if is_ours "$pid"; then
            log "pid $pid did not stop within ${timeout}s: KILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    ((STOPPING)) && rc=0
    local nodes=() others=() name i drain_budget
    for i in "${!NAMES[@]}"; do
        name=${NAMES[$i]}
        [[ $name == node* ]] && nodes+=("${PIDS[$i]}")
    done
    if ((${#PIDS[@]})); then
        log "stopping (nodes drain first, then nginx, then redis)"
        # A node exits within HUB_DRAIN_DELAY + HUB_DRAIN_SECONDS + 5 s (PROTOCOL §7).
        drain_budget=$(awk -v a="$HUB_DRAIN_DELAY" -v b="$HUB_DRAIN_SECONDS" 'BEGIN { printf "%d", a + b + 6.999 }')
        stop_pids "$drain_budget" ${nodes[@]+"${nodes[@]}"}
        # nginx: TERM is its fast shutdown (QUIT would wait for every WebSocket to end).
        mapfile -t others < <(pid_of nginx)
        stop_pids 5 ${others[@]+"${others[@]}"}
        mapfile -t others < <(pid_of redis)
        stop_pids 5 ${others[@]+"${others[@]}"}
    fi
    if ((STATE_IS_TEMP && (rc == 0 || ${#PIDS[@]} == 0))); then
        rm -rf "$STATE"
    elif [[ -n $STATE ]]; then
        log "state and logs kept in $STATE"
    fi
    exit "$rc"
}

on_signal() {
    STOPPING=1
    exit 0
}

show_log_tail() {
    [[ -f $1 ]] || return 0
    log "--- last lines of $1"
    tail -n 20 "$1" >&2 || true
}

# --- main -----------------------------------------------------------------------------------

start_cluster() {
    local hub_cmd nginx redis_server redis_url port i name deadline all_ready
    read -r -a hub_cmd <<<"$HUB_CMD"
    ((${#NODE_PORTS[@]} >= 1)) || die "HUB_NODE_PORTS names no port"
    command -v "${hub_cmd[0]}" >/dev/null 2>&1 ||
        die "'${hub_cmd[0]}' not found: pip install -e . first, or set HUB_CMD='python -m hub'"
    redis_server=$(ensure_binary redis-server redis-server)
    nginx=$(ensure_binary nginx nginx)

    make_state_dir
    trap cleanup EXIT
    trap on_signal INT TERM HUP

    [[ -n $REDIS_PORT ]] || REDIS_PORT=$(free_port)
    for port in "$LB_PORT" "${NODE_PORTS[@]}" "$REDIS_PORT"; do
        port_is_free "$port" || die "port $port on 127.0.0.1 is in use (see HUB_LB_PORT, HUB_NODE_PORTS, HUB_REDIS_PORT)"
    done
    redis_url="redis://127.0.0.1:$REDIS_PORT/0"
    client_env "$redis_url" >"$STATE/cluster.env"
    chmod 0600 "$STATE/cluster.env"
    : >"$STATE/pids"

    log "state dir $STATE"
    log "HUB_JWT_SECRET=$HUB_JWT_SECRET"
    log "HUB_API_KEY=$HUB_API_KEY"

    start_bg redis "$REDIS_PORT" "$redis_server" --bind 127.0.0.1 --port "$REDIS_PORT" \
        --save '' --appendonly no --daemonize no --dir "$STATE" --protected-mode yes
    deadline=$((SECONDS + 10))
    until redis_answers "$REDIS_PORT"; do
        is_ours "$(pid_of redis)" || { show_log_tail "$STATE/redis.log"; die "redis-server exited"; }
        ((SECONDS < deadline)) || { show_log_tail "$STATE/redis.log"; die "redis-server did not answer within 10 s"; }
        sleep 0.1
    done

    i=0
    for port in "${NODE_PORTS[@]}"; do
        i=$((i + 1))
        start_bg "node$i" "$port" env HUB_HOST=127.0.0.1 HUB_PORT="$port" HUB_NODE_ID="node$i" \
            HUB_REDIS_URL="$redis_url" "${hub_cmd[@]}" serve
    done

    render_nginx_conf
    mapfile -t args < <(nginx_args)
    "$nginx" -t -q "${args[@]}" 2>"$STATE/nginx/check.log" ||
        { show_log_tail "$STATE/nginx/check.log"; die "nginx rejected $STATE/nginx/nginx.conf"; }
    start_bg nginx "$LB_PORT" "$nginx" "${args[@]}" -g 'daemon off;'

    deadline=$((SECONDS + READY_TIMEOUT))
    while :; do
        all_ready=1
        for i in "${!NAMES[@]}"; do
            name=${NAMES[$i]}
            if ! is_ours "${PIDS[$i]}"; then
                if [[ $name == nginx ]]; then show_log_tail "$STATE/nginx/error.log"; fi
                show_log_tail "$STATE/$name.log"
                die "$name exited during start-up"
            fi
        done
        for port in "${NODE_PORTS[@]}" "$LB_PORT"; do
            [[ $(http_status "http://127.0.0.1:$port/readyz") == 200 ]] || { all_ready=0 && break; }
        done
        ((all_ready)) && break
        if ((SECONDS >= deadline)); then
            for port in "${NODE_PORTS[@]}" "$LB_PORT"; do
                log "http://127.0.0.1:$port/readyz -> $(http_status "http://127.0.0.1:$port/readyz")"
            done
            for name in "${NAMES[@]}"; do [[ $name == node* ]] && show_log_tail "$STATE/$name.log"; done
            die "cluster not ready within ${READY_TIMEOUT}s"
        fi
        sleep 0.2
    done

    log "nodes: ${NODE_PORTS[*]/#/http://127.0.0.1:}   redis: $redis_url"
    log "client env: source $STATE/cluster.env   (or: $0 --print-env)"
    log "drain one node: kill -TERM \$(cat $STATE/node1.pid)   stop all: Ctrl-C"
    echo "cluster ready: ws://127.0.0.1:$LB_PORT/ws api http://127.0.0.1:$LB_PORT"
}

# Run until a signal, HUB_CLUSTER_LIFETIME, or the loss of Redis, nginx or every node.
supervise() {
    local started=$SECONDS i name reported=() nodes_alive
    while :; do
        nodes_alive=0
        for i in "${!NAMES[@]}"; do
            name=${NAMES[$i]}
            if is_ours "${PIDS[$i]}"; then
                [[ $name == node* ]] && nodes_alive=1
                continue
            fi
            [[ " ${reported[*]-} " == *" $name "* ]] && continue
            reported+=("$name")
            local code=0
            wait "${PIDS[$i]}" 2>/dev/null || code=$?
            log "$name (pid ${PIDS[$i]}) exited with status $code"
            if [[ $name == redis || $name == nginx ]]; then
                show_log_tail "$STATE/$name.log"
                die "$name is gone: stopping the cluster"
            fi
        done
        ((nodes_alive)) || die "every node has exited: stopping the cluster"
        if ((LIFETIME > 0 && SECONDS - started >= LIFETIME)); then
            log "HUB_CLUSTER_LIFETIME=${LIFETIME}s reached"
            STOPPING=1
            exit 0
        fi
        sleep 1 &
        wait $! || true
    done
}

main() {
    case ${1:-} in
    -h | --help)
        usage
        ;;
    --print-env)
        if [[ -n ${HUB_CLUSTER_DIR:-} && -f $HUB_CLUSTER_DIR/cluster.env ]]; then
            cat "$HUB_CLUSTER_DIR/cluster.env"
        else
            client_env "${REDIS_PORT:+redis://127.0.0.1:$REDIS_PORT/0}"
        fi
        ;;
    --check-config)
        local nginx
        nginx=$(ensure_binary nginx nginx)
        make_state_dir
        render_nginx_conf
        mapfile -t args < <(nginx_args)
        "$nginx" -t "${args[@]}"
        if ((STATE_IS_TEMP)); then
            rm -rf "$STATE"
        else
            echo "nginx config: $STATE/nginx/nginx.conf"
        fi
        ;;
    "")
        start_cluster
        supervise
        ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
