/* qkdnet XDP guard: drops, before the kernel builds an skb, the UDP datagrams to a link's
 * tunnel ports that the workers would refuse anyway (dataplane/wire.py parse and
 * acceptance): from an address that is not the link's peer, malformed, or naming a key
 * position the receiver has already passed; and any packet for a node address, which is
 * reachable only through the tunnels. Datagrams naming key beyond what the receiver has
 * stored (which only the MAC, whose key has not come, can judge) pass at a bounded rate:
 * a flood of them cannot take the workers' time. Everything else passes; the MAC check
 * in user space stays the authority. One build serves every link end (guard.py caches it): the
 * link end's own values are in the map `config`, filled before the program is attached.
 * -D constants: N_LANES, CONTROL_LANE, OVERHEAD, MAC_KEY_LEN, N_REASONS, the reason indices
 * R_*, AHEAD_INTERVAL_NS and AHEAD_BURST_NS.
 * Loaded with BPF_F_XDP_HAS_FRAGS: a 64 KiB datagram spans several buffers, so the header
 * is read with bpf_xdp_load_bytes, never assumed to be in the first one.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>

BPF_PERCPU_ARRAY(counters, u64, 2 * N_REASONS); /* [2r] packets, [2r+1] bytes */
BPF_ARRAY(floors, u64, N_LANES + 2);  /* lowest position per lane; [N_LANES]: release;
                                         [N_LANES + 1]: key stored (0: not known) */
BPF_ARRAY(ahead, u64, 1);  /* when the next datagram naming key beyond the stored may pass */

struct guard_config {
    u32 peer_ip;  /* network order */
    u32 port_lo;  /* the link end's control port; lane i of the pool: port_lo + 1 + i */
    u32 workers;  /* this end's pool size */
    u32 link;     /* the link's index */
    u32 dir;      /* direction of the datagrams this end receives */
    u32 node_net; /* network order; node addresses are (daddr & node_mask) == node_net */
    u32 node_mask;
    u32 tun_net;  /* the tunnels' own addresses, the same way */
    u32 tun_mask;
};
BPF_ARRAY(config, struct guard_config, 1);

struct qkd_header {
    u8 version, flags, direction, lane;
    u16 link, reserved1;
    u64 pos, release;
    u32 length, reserved2;
} __attribute__((packed));

static __always_inline int verdict(struct xdp_md *ctx, u32 reason, int action)
{
    u32 k = 2 * reason;
    u64 *v = counters.lookup(&k);
    if (v)
        *v += 1;
    k += 1;
    v = counters.lookup(&k);
    if (v)
        *v += bpf_xdp_get_buff_len(ctx);
    return action;
}

int qkd_guard(struct xdp_md *ctx)
{
    u32 zero = 0;
    struct guard_config *c = config.lookup(&zero);
    if (!c || c->workers == 0)  /* not configured yet: let everything through */
        return XDP_PASS;
    u32 workers = c->workers;
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != __builtin_bswap16(ETH_P_IP))
        return verdict(ctx, R_OTHER, XDP_PASS);
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end)
        return verdict(ctx, R_OTHER, XDP_PASS);
    /* Node and tunnel addresses, as destination or source: through the tunnels only. */
    if ((ip->daddr & c->node_mask) == c->node_net || (ip->daddr & c->tun_mask) == c->tun_net
        || (ip->saddr & c->node_mask) == c->node_net
        || (ip->saddr & c->tun_mask) == c->tun_net)
        return verdict(ctx, R_NODE, XDP_DROP);
    if (ip->protocol != IPPROTO_UDP || ip->ihl < 5)
        return verdict(ctx, R_OTHER, XDP_PASS);
    if (ip->frag_off & __builtin_bswap16(0x1fff))  /* a later fragment: no UDP header */
        return verdict(ctx, R_OTHER, XDP_PASS);
    u32 ihl = (ip->ihl & 0xf) * 4;
    struct udphdr *udp = (void *)ip + ihl;
    if ((void *)(udp + 1) > end)
        return verdict(ctx, R_OTHER, XDP_PASS);
    u32 port = __builtin_bswap16(udp->dest);
    if (port < c->port_lo || port > c->port_lo + workers)
        return verdict(ctx, R_OTHER, XDP_PASS);
    if (ip->saddr != c->peer_ip)
        return verdict(ctx, R_SOURCE, XDP_DROP);

    struct qkd_header h;
    u32 ulen = __builtin_bswap16(udp->len);
    if (ulen < sizeof(struct udphdr) + OVERHEAD ||
        bpf_xdp_load_bytes(ctx, sizeof(*eth) + ihl + sizeof(*udp), &h, sizeof(h)) != 0)
        return verdict(ctx, R_MALFORMED, XDP_DROP);
    u64 pos = __builtin_bswap64(h.pos);
    u32 lane = h.lane;
    int control = h.flags & 1;
    if (h.version != 1 || ulen - sizeof(struct udphdr) != OVERHEAD + __builtin_bswap32(h.length)
        || __builtin_bswap16(h.link) != c->link || h.direction != c->dir || h.reserved1
        || h.reserved2 || (h.flags & ~1) || lane >= N_LANES
        || control != (lane == CONTROL_LANE) || __builtin_bswap64(h.release) > pos)
        return verdict(ctx, R_MALFORMED, XDP_DROP);
    /* the port must be the one of the worker that owns the lane (control: the manager's) */
    if (port != (control ? c->port_lo : c->port_lo + 1 + lane % workers))
        return verdict(ctx, R_MALFORMED, XDP_DROP);

    u64 *floor = floors.lookup(&lane);
    if (floor && pos < *floor)
        return verdict(ctx, R_STALE, XDP_DROP);
    u32 release_slot = N_LANES;
    floor = floors.lookup(&release_slot);
    if (floor && pos < *floor)
        return verdict(ctx, R_STALE, XDP_DROP);
    /* key beyond what is stored (the mark lags a little: genuine datagrams pass too, well
     * within the rate): the generic cell rate algorithm, one deadline for the link end */
    u32 stored_slot = N_LANES + 1;
    floor = floors.lookup(&stored_slot);
    if (floor && *floor && pos + MAC_KEY_LEN + __builtin_bswap32(h.length) > *floor) {
        u64 *tat = ahead.lookup(&zero);
        if (tat) {
            u64 now = bpf_ktime_get_ns();
            u64 t = *tat > now ? *tat : now;
            if (t - now > AHEAD_BURST_NS)
                return verdict(ctx, R_AHEAD, XDP_DROP);
            *tat = t + AHEAD_INTERVAL_NS;
        }
    }
    return verdict(ctx, R_PASS, XDP_PASS);
}
