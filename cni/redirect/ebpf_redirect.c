// In-pod redirection without netfilter: the eBPF alternative to the rules of spec 3.2.
//
// Compiled by BCC in the node agent and attached with tc (clsact, direct action) inside each
// enrolled pod's network namespace. Nothing here uses conntrack, so a pod in this mode has no
// netfilter hook on its packets at all.
//
//   ambient_egress   eth0 (every non-loopback link) egress
//     - ztunnel's own sockets (mark 0x539) and replies to kubelet probes (169.254.7.127) pass;
//     - a packet that belongs to a socket in the pod whose local end is the packet's destination
//       (ztunnel's socket accepted on 15001, or ztunnel's spoofed-source socket towards the app)
//       is turned back into the pod: mark 0x111 (the ip rule routes it to the local table), the
//       destination MAC set to lo's, redirected to lo's ingress;
//     - an app's SYN goes the same way, and ambient_lo_in hands it to ztunnel's 15001 listener;
//       its socket cookie is remembered (in a pinned map), so that later packets of that
//       connection are dropped, not sent out in plaintext, if ztunnel's side of it is gone
//       (iptables' conntrack does the same: the flow stays redirected);
//     - anything else passes (connections from before enrolment, replies in ingress mode).
//   ambient_lo_in    lo ingress
//     - a SYN redirected above with no socket already waiting for it is assigned to the listener
//       on 15001 (bpf_sk_assign, which is TPROXY without netfilter: the accepted socket's local
//       address is the original destination); with no listener it is dropped (fail closed).
//   ambient_ingress  eth0 ingress (omitted in "ingress mode")
//     - a SYN to any port but 15008, not from 169.254.7.127, is assigned to the listener on
//       15006; with no listener it is dropped (fail closed).
//
// IPv4 only, like the iptables rules this project installs. The numbers come from the agent's
// Python side (cni/redirect/iptables.py), substituted as -D macros.

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>

#define LO_IFINDEX 1

// Pinned (CAPTURED_SOCKETS_PIN is a path in a bpf filesystem): a restarted agent's programs
// open this same map, so connections captured before the restart stay guarded.
BPF_TABLE_PINNED("lru_hash", u64, u8, captured_sockets, CAPTURED_SOCKETS, CAPTURED_SOCKETS_PIN);

struct flow {
    struct iphdr *ip;
    struct tcphdr *tcp;
};

// 1: a TCP/IPv4 packet, with its headers in `f`. 0: not TCP over IPv4, or a later fragment
// (nothing to capture). -1: TCP whose headers cannot be read (dropped by the callers).
static __always_inline int parse(struct __sk_buff *skb, struct flow *f) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return 0;
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return 0;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end)
        return 0;
    if (ip->protocol != IPPROTO_TCP)
        return 0;
    if (ip->frag_off & bpf_htons(0x1fff))
        return 0;
    u32 ihl = ip->ihl * 4;
    if (ihl < sizeof(struct iphdr))
        return -1;
    u32 need = sizeof(struct ethhdr) + ihl + sizeof(struct tcphdr);
    if (data + need > end) {
        if (bpf_skb_pull_data(skb, need))
            return -1;
        data = (void *)(long)skb->data;
        end = (void *)(long)skb->data_end;
        if (data + need > end)
            return -1;
    }
    ip = data + sizeof(struct ethhdr);
    if ((void *)(ip + 1) > end)
        return -1;
    struct tcphdr *tcp = data + sizeof(struct ethhdr) + (ihl & 0x3c);
    if ((void *)(tcp + 1) > end)
        return -1;
    f->ip = ip;
    f->tcp = tcp;
    return 1;
}

static __always_inline struct bpf_sock *lookup(struct __sk_buff *skb, __be32 saddr, __be16 sport,
                                               __be32 daddr, __be16 dport) {
    struct bpf_sock_tuple t = {};
    t.ipv4.saddr = saddr;
    t.ipv4.daddr = daddr;
    t.ipv4.sport = sport;
    t.ipv4.dport = dport;
    return bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
}

// Whether a socket in the pod would receive this packet if it were delivered locally: one
// whose local end is the destination, other than a listener (an app listening on the port it
// calls out to must not count).
static __always_inline int has_receiver(struct __sk_buff *skb, struct flow *f) {
    struct bpf_sock *sk = lookup(skb, f->ip->saddr, f->tcp->source, f->ip->daddr, f->tcp->dest);
    if (!sk)
        return 0;
    int found = sk->state != BPF_TCP_LISTEN;
    bpf_sk_release(sk);
    return found;
}

// Hand a SYN to ztunnel's listener on `port` at `addr`; drop it when there is none.
static __always_inline int assign_listener(struct __sk_buff *skb, struct flow *f, __be32 addr,
                                           u16 port) {
    struct bpf_sock *sk = lookup(skb, f->ip->saddr, f->tcp->source, addr, bpf_htons(port));
    if (!sk)
        return TC_ACT_SHOT;
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return TC_ACT_SHOT;
    }
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    return err ? TC_ACT_SHOT : TC_ACT_OK;
}

static __always_inline int into_pod(struct __sk_buff *skb) {
    char lo_mac[ETH_ALEN] = {};
    skb->mark = RETURN_MARK;
    if (bpf_skb_store_bytes(skb, 0, lo_mac, ETH_ALEN, 0))
        return TC_ACT_SHOT;
    return bpf_redirect(LO_IFINDEX, BPF_F_INGRESS);
}

int ambient_egress(struct __sk_buff *skb) {
    if ((skb->mark & MARK_MASK) == INPOD_MARK)
        return TC_ACT_OK;
    struct flow f;
    int parsed = parse(skb, &f);
    if (parsed <= 0)
        return parsed ? TC_ACT_SHOT : TC_ACT_OK;
    if (f.ip->daddr == bpf_htonl(PROBE_ADDR))
        return TC_ACT_OK;
    if (f.tcp->syn && !f.tcp->ack) {
        u64 cookie = bpf_get_socket_cookie(skb);
        u8 yes = 1;
        if (cookie)
            captured_sockets.update(&cookie, &yes);
        return into_pod(skb);
    }
    if (has_receiver(skb, &f))
        return into_pod(skb);
    u64 cookie = bpf_get_socket_cookie(skb);
    if (cookie && captured_sockets.lookup(&cookie))
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}

int ambient_lo_in(struct __sk_buff *skb) {
    if ((skb->mark & MARK_MASK) != RETURN_MARK)
        return TC_ACT_OK;
    struct flow f;
    int parsed = parse(skb, &f);
    if (parsed <= 0)
        return parsed ? TC_ACT_SHOT : TC_ACT_OK;
    if (!f.tcp->syn || f.tcp->ack || has_receiver(skb, &f))
        return TC_ACT_OK;
    return assign_listener(skb, &f, f.ip->saddr, OUTBOUND_PORT);
}

int ambient_ingress(struct __sk_buff *skb) {
    struct flow f;
    int parsed = parse(skb, &f);
    if (parsed <= 0)
        return parsed ? TC_ACT_SHOT : TC_ACT_OK;
    if (!f.tcp->syn || f.tcp->ack)
        return TC_ACT_OK;
    if (f.tcp->dest == bpf_htons(HBONE_PORT) || f.ip->saddr == bpf_htonl(PROBE_ADDR))
        return TC_ACT_OK;
    return assign_listener(skb, &f, f.ip->daddr, INBOUND_PORT);
}
