#!/usr/bin/env bash
# Provisioning of every VM (run by Vagrant as root): what a node needs for Kubernetes and
# for Weft's agent. Idempotent: `vagrant provision` may run it again.
#   containerd (Debian's) with the systemd cgroup driver and Debian's CNI plugins;
#   kubeadm, kubelet and kubectl pinned to $KUBERNETES_VERSION and held;
#   kubelet --node-ip set to the private address (not the NAT interface's);
#   cgroup v2 (checked), bpffs at /sys/fs/bpf (mounted, and in fstab), kernel headers at
#   /lib/modules/$(uname -r)/build for bcc; a bridge CNI with static routes between nodes.
set -euo pipefail

say() { printf '==> %s: %s\n' "$(hostname)" "$*"; }
die() { printf 'error: %s: %s\n' "$(hostname)" "$*" >&2; exit 1; }

: "${KUBERNETES_VERSION:?set by the Vagrantfile}"
: "${NODE_IP:?set by the Vagrantfile}"
: "${NODE_POD_CIDR:?set by the Vagrantfile}"
: "${POD_ROUTES:?set by the Vagrantfile}"
minor=${KUBERNETES_VERSION%.*}
export DEBIAN_FRONTEND=noninteractive

# cgroup v2: the agent attaches its capture programs to pods' cgroup v2 directories.
if [ "$(stat -f -c %T /sys/fs/cgroup)" != cgroup2fs ]; then
    sed -i 's/^GRUB_CMDLINE_LINUX="/&systemd.unified_cgroup_hierarchy=1 /' /etc/default/grub
    update-grub
    die "cgroup v2 was not the only hierarchy; enabled it for the next boot: vagrant reload --provision"
fi
say "cgroup v2 at /sys/fs/cgroup"

# Kernel: no swap (kubelet), bridged traffic through iptables, forwarding.
swapoff -a
sed -i '/\sswap\s/s/^/#/' /etc/fstab
printf 'overlay\nbr_netfilter\n' > /etc/modules-load.d/kubernetes.conf
modprobe overlay
modprobe br_netfilter
cat > /etc/sysctl.d/90-kubernetes.conf <<'CONF'
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
CONF
sysctl --system >/dev/null

# Debian's packages: the runtime, the CNI plugins, bcc's headers, tools.
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    containerd runc containernetworking-plugins iptables conntrack socat ebtables \
    ca-certificates curl gpg "linux-headers-$(uname -r)" >/dev/null
[ -d "/lib/modules/$(uname -r)/build/include" ] \
    || die "no kernel headers at /lib/modules/$(uname -r)/build (bcc needs them); install linux-headers-$(uname -r)"
say "kernel headers at /lib/modules/$(uname -r)/build -> $(readlink -f "/lib/modules/$(uname -r)/build")"

# bpffs: pinned maps outlive agent restarts only on a bpf filesystem.
if ! awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' /proc/mounts; then
    mount -t bpf bpffs /sys/fs/bpf
fi
grep -q '^bpffs /sys/fs/bpf ' /etc/fstab || echo 'bpffs /sys/fs/bpf bpf defaults 0 0' >> /etc/fstab
say "bpffs at /sys/fs/bpf"

# containerd: the systemd cgroup driver (as kubelet's), Debian's CNI plugin directory.
mkdir -p /etc/containerd
if [ ! -f /etc/containerd/config.toml ] || ! grep -q 'SystemdCgroup = true' /etc/containerd/config.toml; then
    containerd config default > /etc/containerd/config.toml
    sed -i -e 's/SystemdCgroup = false/SystemdCgroup = true/' \
        -e 's|bin_dir = "/opt/cni/bin"|bin_dir = "/usr/lib/cni"|' /etc/containerd/config.toml
fi
systemctl enable containerd >/dev/null
systemctl restart containerd
say "containerd $(containerd --version | awk '{ print $3 }') (systemd cgroups)"

# kubeadm, kubelet, kubectl: pinned, from the Kubernetes project's apt repository (Debian
# has none of the three), held so an upgrade never changes them under the cluster.
if ! dpkg-query -W -f='${Version}' kubeadm 2>/dev/null | grep -q "^$KUBERNETES_VERSION-"; then
    [ -n "${KUBEADM_APT_REPO:-}" ] || die "set WEFT_KUBEADM_APT_REPO to the Kubernetes" \
        "project's apt repository for v$minor (the kubeadm install guide names it), then: vagrant provision"
    mkdir -p /etc/apt/keyrings
    curl -fsSL "$KUBEADM_APT_REPO/Release.key" | gpg --dearmor --yes -o /etc/apt/keyrings/kubernetes.gpg
    echo "deb [signed-by=/etc/apt/keyrings/kubernetes.gpg] $KUBEADM_APT_REPO/ /" \
        > /etc/apt/sources.list.d/kubernetes.list
    apt-get update -qq
    pin=$(apt-cache madison kubeadm | awk -v v="$KUBERNETES_VERSION-" 'index($3, v) == 1 { print $3; exit }')
    [ -n "$pin" ] || die "kubeadm $KUBERNETES_VERSION is not in $KUBEADM_APT_REPO"
    apt-mark unhold kubelet kubeadm kubectl >/dev/null 2>&1 || true
    apt-get install -y -qq --allow-change-held-packages \
        "kubelet=$pin" "kubeadm=$pin" "kubectl=$pin" >/dev/null
    apt-mark hold kubelet kubeadm kubectl >/dev/null
fi
say "kubeadm $(kubeadm version -o short)"

# kubelet on the private address: the NAT interface's address is the same on every VM.
echo "KUBELET_EXTRA_ARGS=--node-ip=$NODE_IP" > /etc/default/kubelet
systemctl enable kubelet >/dev/null
systemctl restart kubelet || true  # crash-loops until kubeadm init/join configures it
say "kubelet --node-ip=$NODE_IP"

# Pod network: a bridge (cni0) with this node's range; the others' ranges are routed to
# their nodes over the private network; pods masquerade only leaving the pod network.
# A bridge CNI is also the case Weft's strict mode must handle: the host reaches its pods
# from cni0's address, not the node address.
mkdir -p /etc/cni/net.d
cat > /etc/cni/net.d/10-weft-vagrant.conflist <<CONF
{
  "cniVersion": "1.0.0",
  "name": "weft-vagrant",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$NODE_POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
CONF
routes=""
for entry in $POD_ROUTES; do
    cidr=${entry%%=*}
    via=${entry#*=}
    [ "$cidr" = "$NODE_POD_CIDR" ] && continue
    routes+="ExecStart=/sbin/ip route replace $cidr via $via"$'\n'
done
cat > /etc/systemd/system/weft-pod-network.service <<UNIT
[Unit]
Description=Routes to the other nodes' pod ranges, and masquerading out of the pod network
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
${routes}ExecStart=/bin/sh -c 'iptables -t nat -C POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE 2>/dev/null || iptables -t nat -A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE'

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable weft-pod-network >/dev/null
systemctl restart weft-pod-network
say "pod network: $NODE_POD_CIDR on cni0; routes: $POD_ROUTES"
