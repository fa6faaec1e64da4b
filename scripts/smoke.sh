#!/usr/bin/env bash
# The mesh smoke test shared by vagrant/, kind/ and the lab: one client pod makes HTTP
# requests to the echo service through the mesh, then the node agents' metrics
# (:15020/metrics) must show those requests with both identities — the client's and the
# server's SPIFFE IDs on one `request_total` series with tls="true" — as seen by the
# caller's node (direction="outbound") and the server's node (direction="inbound").
#
# It knows nothing of where it runs: it is told how to run a command in a pod and in a
# node agent. Both are command prefixes that take `TARGET -- COMMAND...`, the shape of
# `weft lab exec POD -- CMD` and `kubectl exec POD -- CMD`.
#
#   SMOKE_TARGET      preset: `lab` (default) or `kube`; the variables below override it
#   SMOKE_EXEC        runs `POD -- CMD...` in a demo pod    (lab: "weft lab exec";
#                                                          kube: "kubectl -n weft-demo exec")
#   SMOKE_AGENT_EXEC  runs `AGENT -- CMD...` where 127.0.0.1:15020 is a node agent's admin
#                     port (lab: "weft lab exec", the node's namespace;
#                     kube: "kubectl -n weft-system exec", the hostNetwork agent pod)
#   SMOKE_AGENTS      the agents, space separated (lab: "node-1 node-2";
#                     kube: the pods labelled app.kubernetes.io/name=weft-agent)
#   SMOKE_CLIENT      the client pod (lab: client-1; kube: deploy/client)
#   SMOKE_URL         what the client asks for (default http://echo/)
#   SMOKE_NAMESPACE   the demo's namespace (lab: default; kube: weft-demo), for the IDs
#   SMOKE_CLIENT_ID / SMOKE_SERVER_ID
#                     the expected SPIFFE IDs (default spiffe://$SMOKE_TRUST_DOMAIN/ns/
#                     $SMOKE_NAMESPACE/sa/client and .../sa/echo)
#   SMOKE_TRUST_DOMAIN  default cluster.local
#   SMOKE_REQUESTS    requests per try (default 8), SMOKE_TIMEOUT seconds per step (60)
#   SMOKE_WEFT        how to call the weft CLI in the lab preset (default "weft")
#   SMOKE_KUBECTL     how to call kubectl in the kube preset (default "kubectl")
#   SMOKE_PYTHON      the Python inside pods and agents (default python3: Debian's, in the
#                     lab's pods and in the Weft image alike)
#
# Exit 0: the mesh carried the requests and measured them. Exit 1: it did not; the last
# lines say which step failed and what was seen. Exit 2: a usage error.
set -euo pipefail

say() { printf '==> smoke: %s\n' "$*"; }
fail() { printf 'smoke: FAILED: %s\n' "$*" >&2; exit 1; }

target=${SMOKE_TARGET:-lab}
case $target in
    lab)
        weft=${SMOKE_WEFT:-weft}
        default_exec="$weft lab exec"
        default_agent_exec="$weft lab exec"
        default_client="client-1"
        default_namespace=default
        ;;
    kube)
        kubectl=${SMOKE_KUBECTL:-kubectl}
        default_namespace=${SMOKE_NAMESPACE:-weft-demo}
        default_exec="$kubectl -n $default_namespace exec"
        default_agent_exec="$kubectl -n weft-system exec"
        default_client=deploy/client
        ;;
    *)
        printf 'smoke: SMOKE_TARGET must be lab or kube, got %q\n' "$target" >&2
        exit 2
        ;;
esac

read -r -a exec_cmd <<< "${SMOKE_EXEC:-$default_exec}"
read -r -a agent_exec_cmd <<< "${SMOKE_AGENT_EXEC:-$default_agent_exec}"
client=${SMOKE_CLIENT:-$default_client}
url=${SMOKE_URL:-http://echo/}
namespace=${SMOKE_NAMESPACE:-$default_namespace}
trust_domain=${SMOKE_TRUST_DOMAIN:-cluster.local}
client_id=${SMOKE_CLIENT_ID:-spiffe://$trust_domain/ns/$namespace/sa/client}
server_id=${SMOKE_SERVER_ID:-spiffe://$trust_domain/ns/$namespace/sa/echo}
requests=${SMOKE_REQUESTS:-8}
timeout=${SMOKE_TIMEOUT:-60}
python=${SMOKE_PYTHON:-python3}

if [ -n "${SMOKE_AGENTS:-}" ]; then
    read -r -a agents <<< "$SMOKE_AGENTS"
elif [ "$target" = lab ]; then
    agents=(node-1 node-2)
else
    read -r -a kubectl_cmd <<< "$kubectl"
    mapfile -t agents < <("${kubectl_cmd[@]}" -n weft-system get pods \
        -l app.kubernetes.io/name=weft-agent -o name)
fi
[ ${#agents[@]} -gt 0 ] || fail "no node agents to read metrics from (SMOKE_AGENTS is empty)"

# Runs in the client pod: REQUESTS GETs, a new connection each (so the balancer may pick
# every replica); prints the pod that answered each; exits 1 on any error or non-200.
# shellcheck disable=SC2016  # Python source, not shell: nothing to expand
client_py='
import json, sys, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
for _ in range(n):
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
        print(r.status, body.get("pod", "?"))
'
# Runs where an agent's admin port is 127.0.0.1:15020 (its node's network namespace).
metrics_py='
import sys, urllib.request
sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:15020/metrics", timeout=5).read().decode())
'

# 1. Requests through the mesh. Retried until the timeout: the agents may still be
#    applying the first discovery state or fetching certificates.
say "client $client: $requests requests to $url"
deadline=$((SECONDS + timeout))
while :; do
    if answers=$("${exec_cmd[@]}" "$client" -- "$python" -c "$client_py" "$url" "$requests" 2>&1); then
        break
    fi
    if [ $SECONDS -ge $deadline ]; then
        printf '%s\n' "$answers" | tail -n 5 >&2
        fail "requests from $client to $url did not succeed within ${timeout}s"
    fi
    sleep 2
done
served=$(printf '%s\n' "$answers" | awk '$1 == 200 { print $2 }' | sort -u | tr '\n' ' ')
say "answered by: $served"

# 2. The agents measured them, with both identities. Counted when each request ends, and
#    scraped from every agent: the outbound series is on the client's node, the inbound
#    one on the serving replica's node.
sum_series() {  # sum_series DIRECTION < metrics text (awk: no match is 0, not a failure)
    awk -v dir="direction=\"$1\"" -v cid="client_id=\"$client_id\"" \
        -v sid="server_id=\"$server_id\"" '
        index($0, "request_total{") == 1 && index($0, dir) && index($0, cid) \
            && index($0, sid) && index($0, "tls=\"true\"") { total += $NF }
        END { printf "%d\n", total }'
}
say "agents: ${agents[*]}: request_total with client_id=$client_id server_id=$server_id"
deadline=$((SECONDS + timeout))
while :; do
    scraped=""
    unreachable=()
    for agent in "${agents[@]}"; do
        if text=$("${agent_exec_cmd[@]}" "$agent" -- "$python" -c "$metrics_py" 2>/dev/null); then
            scraped+=$text$'\n'
        else
            unreachable+=("$agent")
        fi
    done
    outbound=$(printf '%s' "$scraped" | sum_series outbound)
    inbound=$(printf '%s' "$scraped" | sum_series inbound)
    if [ ${#unreachable[@]} -eq 0 ] && [ "$outbound" -ge 1 ] && [ "$inbound" -ge 1 ]; then
        break
    fi
    if [ $SECONDS -ge $deadline ]; then
        [ ${#unreachable[@]} -eq 0 ] \
            || fail "no metrics from agent(s) ${unreachable[*]} (is the mesh installed and ready?)"
        fail "request_total with both identities: outbound $outbound, inbound $inbound" \
            "(each must be >= 1: the requests did not go through the mesh's mTLS tunnel)"
    fi
    sleep 2
done
say "request_total{tls=\"true\"} with both identities: outbound $outbound, inbound $inbound"
say "PASSED"
