#!/usr/bin/env bash
# From the host, once `vagrant up` has provisioned the VMs: join the workers to the
# control plane (a fresh bootstrap token each time) and fetch the admin kubeconfig to
# vagrant/.kube/config. Idempotent: a joined worker is left alone.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

workers=(worker-1 worker-2)
join=$(vagrant ssh cp -c 'sudo kubeadm token create --print-join-command --ttl 30m' | tr -d '\r')
case $join in
    "kubeadm join "*) ;;
    *) die "no join command from the control plane VM (got: $join)" ;;
esac
for w in "${workers[@]}"; do
    if vagrant ssh "$w" -c 'test -f /etc/kubernetes/kubelet.conf' >/dev/null 2>&1; then
        say "$w: already joined"
    else
        say "$w: joining"
        vagrant ssh "$w" -c "sudo $join"
    fi
done
mkdir -p .kube
vagrant ssh cp -c 'sudo cat /etc/kubernetes/admin.conf' | tr -d '\r' > .kube/config
chmod 600 .kube/config
say "kubeconfig: $(pwd)/.kube/config"
kubectl --kubeconfig .kube/config wait --for=condition=Ready nodes --all --timeout=300s
