// Weft capture programs. Compiled by bcc from nodeagent/ebpf/loader.py, one instance per
// node agent; every map is pinned under the agent's bpffs directory (__PIN_DIR__ is
// substituted at load time) so a restarted agent finds the same maps.
//
// Byte orders, because each context field has its own:
//   bpf_sock_addr.user_ip4 / user_port ........ network order (port in the low 16 bits)
//   bpf_sock_ops.local_ip4 / remote_ip4 ....... network order
//   bpf_sock_ops.local_port ................... host order
//   bpf_sock_ops.remote_port .................. network-order u16 shifted left by 16 on
//                                               little-endian: bpf_ntohl() gives host order
//   sk_msg_md: same as bpf_sock_ops.
// Keys below keep IPs in network order and ports in host order, each in a u32 so the
// structs have no padding the Python side could get wrong.

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/if_ether.h>
#include <linux/socket.h>

// Connections the maps are sized for (the agent passes -DWEFT_MAP_ENTRIES, from
// `weft agent --ebpf-map-entries`): weft_cookie_dst and weft_orig_dst hold one entry per
// captured connection, the sockhash and its key mirror two (one per socket of a pair).
// LRU and sockhash entries are preallocated or bucketed by this size, so it is most of
// the kernel memory the agent costs: docs/ebpf.md "Map sizes".
#ifndef WEFT_MAP_ENTRIES
#define WEFT_MAP_ENTRIES 16384
#endif
#define WEFT_SOCK_ENTRIES (2 * WEFT_MAP_ENTRIES)

#define AF_INET_ 2
#define AF_INET6_ 10
#define SOCK_STREAM_ 1

// What the agent configures (array map, one element).
struct weft_config {
    u32 proxy_ip;     // outbound listener address, network order (the node's pod gateway)
    u32 proxy_port;   // outbound listener port, network order in the low 16 bits
    u32 sockmap;      // 1: shortcut pod<->proxy bytes with sk_msg redirects
    u32 pad;
};

struct orig_dst {
    u32 ip;           // network order
    u32 port;         // host order
};

struct addr_key {
    u32 ip;           // network order
    u32 port;         // host order
};

struct sock_key {
    u32 local_ip;
    u32 remote_ip;
    u32 local_port;   // host order
    u32 remote_port;  // host order
};

enum weft_stat {
    STAT_REDIRECTED = 0,     // connect4 rewrote a destination to the proxy
    STAT_PASSED = 1,         // connect4 left a TCP connect alone (loopback, excluded, proxy)
    STAT_RECORDED = 2,       // sockops recorded an original destination
    STAT_CLEANED = 3,        // a recorded entry was removed when its connection closed
    STAT_STRICT_DROP = 4,    // strict inbound dropped a SYN
    STAT_MSG_REDIRECT = 5,   // sk_msg shortcut a message to its peer socket
    STAT_MSG_PASS = 6,       // sk_msg found no local peer and let the stack carry it
    STAT_SOCKS_ADDED = 7,    // sockets added to the sockhash
    STAT_PLAIN_ALLOWED = 8,  // strict inbound let a plaintext SYN in: a policy allows it
    STAT_MAX = 9,
};

BPF_TABLE_PINNED("array", u32, struct weft_config, weft_config, 1, "__PIN_DIR__/weft_config");
BPF_TABLE_PINNED("array", u32, u64, weft_stats, STAT_MAX, "__PIN_DIR__/weft_stats");
// Destination ports never captured (host order), e.g. the API server's or the agent's.
BPF_TABLE_PINNED("hash", u32, u32, weft_skip_port, 256, "__PIN_DIR__/weft_skip_port");
// The node proxy's own addresses: never captured; the only sources strict pods accept.
BPF_TABLE_PINNED("hash", u32, u32, weft_node_addr, 16, "__PIN_DIR__/weft_node_addr");
// Strict pods' verdicts for plaintext callers, compiled from their policies by the agent
// (weft/policy/plaintext.py): (pod, generation, port, source prefix) -> 1 allow, 2 deny.
// Longest prefix wins; port 0 holds the entries for ports without their own. A pod's
// table is written whole under a new generation, then weft_plain_gen switches to it, so
// no SYN is judged by a half-written table.
struct plain_key {
    u32 prefixlen;    // bits of what follows that must match: 96 + the source prefix
    u32 pod;          // network order
    u32 gen;
    u32 port;         // host order
    u32 src;          // network order
};
#ifndef WEFT_PLAIN_ENTRIES
#define WEFT_PLAIN_ENTRIES 16384
#endif
BPF_TABLE_PINNED("lpm_trie", struct plain_key, u32, weft_plaintext, WEFT_PLAIN_ENTRIES,
                 "__PIN_DIR__/weft_plaintext", BPF_F_NO_PREALLOC);
// Pod address (network order) -> the generation of its table in force; absent: no
// policy lets plaintext in (strict: only the node, the pod itself and loopback).
BPF_TABLE_PINNED("hash", u32, u32, weft_plain_gen, 4096, "__PIN_DIR__/weft_plain_gen",
                 BPF_F_NO_PREALLOC);
// connect4 -> sockops hand-off, keyed by socket cookie (the source port is not known yet
// at connect4 time). LRU: a connect that never establishes leaves its entry to be evicted.
BPF_TABLE_PINNED("lru_hash", u64, struct orig_dst, weft_cookie_dst, WEFT_MAP_ENTRIES,
                 "__PIN_DIR__/weft_cookie_dst");
// What the proxy reads: the pod socket's (address, port) -> original destination. Removed
// by sockops when the pod socket closes; LRU as a backstop against missed close events.
BPF_TABLE_PINNED("lru_hash", struct addr_key, struct orig_dst, weft_orig_dst, WEFT_MAP_ENTRIES,
                 "__PIN_DIR__/weft_orig_dst");
// Sockets of the pod<->proxy pairs on this node, for sk_msg redirects.
// bcc has no pinned variant of BPF_SOCKHASH; this is its expansion with the pin path in the
// section name, which is how bcc's BPF_TABLE_PINNED marks a table as pinned.
struct weft_socks_table_t {
    struct sock_key key;
    int leaf;
    int (*update)(struct sock_key *, int *);
    int (*delete)(struct sock_key *);
    int (*sock_hash_update)(void *, void *, u64);
    int (*msg_redirect_hash)(void *, void *, u64);
    int (*sk_redirect_hash)(void *, void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/sockhash:__PIN_DIR__/weft_socks")))
struct weft_socks_table_t weft_socks = {.max_entries = WEFT_SOCK_ENTRIES};
// Which keys are in weft_socks: bpf_msg_redirect_hash drops the message when the peer is
// missing, so sk_msg checks this mirror first and otherwise lets the stack carry it.
BPF_TABLE_PINNED("lru_hash", struct sock_key, u32, weft_sock_keys, WEFT_SOCK_ENTRIES,
                 "__PIN_DIR__/weft_sock_keys");

static __always_inline void stat_inc(u32 idx) {
    u64 *v = weft_stats.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline u16 ntohs16(u16 x) { return __builtin_bswap16(x); }
static __always_inline u32 ntohl32(u32 x) { return __builtin_bswap32(x); }

// Shared by connect4 and connect6 (IPv4-mapped destinations): should this connect go to
// the proxy? If so, remember where it was going, keyed by the socket cookie.
static __always_inline struct weft_config *capture_dst(u64 cookie, u32 dst, u32 user_port) {
    u32 zero = 0;
    struct weft_config *cfg = weft_config.lookup(&zero);
    if (!cfg || cfg->proxy_ip == 0)
        return 0;
    u32 dport = ntohs16((u16)user_port);
    // 127.0.0.0/8 and 0.0.0.0 stay inside the pod.
    if ((ntohl32(dst) >> 24) == 127 || dst == 0) {
        stat_inc(STAT_PASSED);
        return 0;
    }
    if (weft_node_addr.lookup(&dst) || weft_skip_port.lookup(&dport)) {
        stat_inc(STAT_PASSED);
        return 0;
    }
    struct orig_dst od = {.ip = dst, .port = dport};
    weft_cookie_dst.update(&cookie, &od);
    stat_inc(STAT_REDIRECTED);
    return cfg;
}

int weft_connect4(struct bpf_sock_addr *ctx) {
    if (ctx->type != SOCK_STREAM_)
        return 1;
    struct weft_config *cfg = capture_dst(bpf_get_socket_cookie(ctx), ctx->user_ip4,
                                          ctx->user_port);
    if (cfg) {
        ctx->user_ip4 = cfg->proxy_ip;
        ctx->user_port = cfg->proxy_port;
    }
    return 1;
}

// ::ffff:a.b.c.d in network order, as four u32 read on a little-endian host.
#define V4MAPPED_WORD2 0xffff0000

// Dual-stack sockets (Java, Node, Go with "tcp") reach IPv4 destinations through AF_INET6
// sockets and IPv4-mapped addresses: without this hook they would bypass the mesh. Native
// IPv6 destinations are not captured yet (the lab and the proxy are IPv4-only).
int weft_connect6(struct bpf_sock_addr *ctx) {
    if (ctx->type != SOCK_STREAM_)
        return 1;
    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 || ctx->user_ip6[2] != V4MAPPED_WORD2)
        return 1;
    struct weft_config *cfg = capture_dst(bpf_get_socket_cookie(ctx), ctx->user_ip6[3],
                                          ctx->user_port);
    if (cfg) {
        ctx->user_ip6[3] = cfg->proxy_ip;
        ctx->user_port = cfg->proxy_port;
    }
    return 1;
}

static __always_inline void sock_key_of(struct bpf_sock_ops *skops, struct sock_key *k) {
    k->local_ip = skops->local_ip4;
    k->remote_ip = skops->remote_ip4;
    k->local_port = skops->local_port;
    k->remote_port = ntohl32(skops->remote_port);
}

static __always_inline void add_to_sockhash(struct bpf_sock_ops *skops) {
    struct sock_key k = {};
    sock_key_of(skops, &k);
    // bcc rewrites this call as a statement, so it cannot sit inside the condition.
    int err = weft_socks.sock_hash_update(skops, &k, BPF_ANY);
    if (err == 0) {
        u32 one = 1;
        weft_sock_keys.update(&k, &one);
        stat_inc(STAT_SOCKS_ADDED);
    }
}

int weft_sockops(struct bpf_sock_ops *skops) {
    // IPv4, or IPv6 sockets talking to IPv4-mapped peers: for those the kernel keeps the
    // IPv4 addresses in the same fields as for AF_INET sockets (tcp_v6_connect hands
    // mapped destinations to tcp_v4_connect), so local_ip4/remote_ip4 are valid.
    if (skops->family == AF_INET6_) {
        if (skops->remote_ip6[0] != 0 || skops->remote_ip6[1] != 0 ||
            skops->remote_ip6[2] != V4MAPPED_WORD2)
            return 1;
    } else if (skops->family != AF_INET_) {
        return 1;
    }
    u32 zero = 0;
    struct weft_config *cfg = weft_config.lookup(&zero);
    u32 op = skops->op;
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        // A pod's connection that connect4 redirected: move its original destination from
        // the cookie key to the (address, port) key the proxy can compute from accept().
        u64 cookie = bpf_get_socket_cookie(skops);
        struct orig_dst *od = weft_cookie_dst.lookup(&cookie);
        if (!od)
            return 1;  // not redirected: e.g. the proxy's own upstream connection
        struct orig_dst val = *od;
        struct addr_key ak = {.ip = skops->local_ip4, .port = skops->local_port};
        weft_orig_dst.update(&ak, &val);
        weft_cookie_dst.delete(&cookie);
        stat_inc(STAT_RECORDED);
        bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
        if (cfg && cfg->sockmap)
            add_to_sockhash(skops);
    } else if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
        // The proxy accepted a connection: shortcut it only if its peer is a pod socket
        // recorded above (a local captured pod), never for remote or uncaptured peers.
        if (!cfg || !cfg->sockmap)
            return 1;
        struct addr_key ak = {.ip = skops->remote_ip4, .port = ntohl32(skops->remote_port)};
        if (!weft_orig_dst.lookup(&ak))
            return 1;
        bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
        add_to_sockhash(skops);
    } else if (op == BPF_SOCK_OPS_STATE_CB) {
        if (skops->args[1] != BPF_TCP_CLOSE)
            return 1;
        struct addr_key ak = {.ip = skops->local_ip4, .port = skops->local_port};
        if (weft_orig_dst.delete(&ak) == 0)
            stat_inc(STAT_CLEANED);
        struct sock_key k = {};
        sock_key_of(skops, &k);
        weft_sock_keys.delete(&k);
    }
    return 1;
}

int weft_sk_msg(struct sk_msg_md *msg) {
    // The peer of this socket is the one whose key is ours with the ends swapped.
    struct sock_key peer = {
        .local_ip = msg->remote_ip4,
        .remote_ip = msg->local_ip4,
        .local_port = ntohl32(msg->remote_port),
        .remote_port = msg->local_port,
    };
    if (!weft_sock_keys.lookup(&peer)) {
        stat_inc(STAT_MSG_PASS);
        return SK_PASS;
    }
    stat_inc(STAT_MSG_REDIRECT);
    return weft_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
}

// Whether a TCP header at byte ``off`` of the packet starts a new connection (a bare SYN).
static __always_inline int bare_syn(struct __sk_buff *skb, u32 off) {
    u8 flags = 0;
    if (bpf_skb_load_bytes(skb, off + 13, &flags, 1) < 0)
        return 0;
    return (flags & 0x02) && !(flags & 0x10);  // SYN, not SYN+ACK
}

#define IPV6_MAX_EXT 4  // extension headers walked before a packet is judged unreadable

// Strict inbound over IPv6: the node proxy reaches pods over IPv4 only, so a new TCP
// connection over IPv6 is accepted from loopback and the pod itself only. The extension
// headers (hop-by-hop, routing, destination options) are walked, a few at most; a
// fragment or a chain longer than that may hide a SYN, so for TCP it fails closed.
static __always_inline int strict_ipv6(struct __sk_buff *skb) {
    struct ipv6hdr ip6 = {};
    if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
        return 1;
    u8 next = ip6.nexthdr;
    u32 off = sizeof(ip6);
#pragma unroll
    for (int i = 0; i < IPV6_MAX_EXT; i++) {
        if (next != 0 && next != 43 && next != 60)  // hop-by-hop, routing, dest options
            break;
        u8 ext[2] = {};
        if (bpf_skb_load_bytes(skb, off, ext, 2) < 0)
            return 0;
        next = ext[0];
        off += ((u32)ext[1] + 1) * 8;
    }
    if (next == 44 || next == 0 || next == 43 || next == 60)
        return 0;  // a fragment, or more extension headers than walked: cannot tell
    if (next != IPPROTO_TCP || !bare_syn(skb, off))
        return 1;
    u32 *s = ip6.saddr.in6_u.u6_addr32, *d = ip6.daddr.in6_u.u6_addr32;
    int loopback = s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == bpf_htonl(1);
    int self = s[0] == d[0] && s[1] == d[1] && s[2] == d[2] && s[3] == d[3];
    if (loopback || self)
        return 1;
    stat_inc(STAT_STRICT_DROP);
    return 0;
}

// Strict inbound: a captured pod accepts new TCP connections (bare SYNs) only from the
// node's own addresses (its proxy, kubelet-style probes), from itself and from loopback.
// Replies and established flows pass: the decision is made once, at the SYN.
int weft_ingress(struct __sk_buff *skb) {
    if (skb->protocol == bpf_htons(ETH_P_IPV6))
        return strict_ipv6(skb);
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return 1;
    struct iphdr iph = {};
    if (bpf_skb_load_bytes(skb, 0, &iph, sizeof(iph)) < 0)
        return 1;
    if (iph.protocol != IPPROTO_TCP)
        return 1;
    if (!bare_syn(skb, iph.ihl * 4))
        return 1;
    u32 src = iph.saddr;
    if (src == iph.daddr || (ntohl32(src) >> 24) == 127 || weft_node_addr.lookup(&src))
        return 1;
    u32 dst = iph.daddr;
    u32 *gen = weft_plain_gen.lookup(&dst);
    if (gen) {
        u16 dport = 0;
        if (bpf_skb_load_bytes(skb, iph.ihl * 4 + 2, &dport, 2) == 0) {
            struct plain_key k = {.prefixlen = 128, .pod = dst, .gen = *gen,
                                  .port = ntohs16(dport), .src = src};
            u32 *verdict = weft_plaintext.lookup(&k);
            if (!verdict) {
                k.port = 0;
                verdict = weft_plaintext.lookup(&k);
            }
            if (verdict && *verdict == 1) {
                stat_inc(STAT_PLAIN_ALLOWED);
                return 1;
            }
        }
    }
    stat_inc(STAT_STRICT_DROP);
    return 0;
}
