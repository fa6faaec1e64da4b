#!/usr/bin/env bash
# Provisioning of the control-plane VM, after common.sh: `kubeadm init` on the private
# address. Workers join from the host (../join.sh), which also fetches the kubeconfig:
# nothing has to travel through a synced folder.
set -euo pipefail

say() { printf '==> %s: %s\n' "$(hostname)" "$*"; }

: "${KUBERNETES_VERSION:?set by the Vagrantfile}"
: "${NODE_IP:?set by the Vagrantfile}"

if [ -f /etc/kubernetes/admin.conf ]; then
    say "kubeadm: already initialised"
else
    say "kubeadm init (Kubernetes v$KUBERNETES_VERSION, API server on $NODE_IP:6443)"
    kubeadm init \
        --kubernetes-version "v$KUBERNETES_VERSION" \
        --apiserver-advertise-address "$NODE_IP" \
        --apiserver-cert-extra-sans "$NODE_IP" \
        --node-name "$(hostname)" \
        --service-cidr 10.96.0.0/12
fi
mkdir -p /home/vagrant/.kube
cp /etc/kubernetes/admin.conf /home/vagrant/.kube/config
chown -R vagrant:vagrant /home/vagrant/.kube
say "kubectl works for the vagrant user: vagrant ssh cp -c 'kubectl get nodes'"
