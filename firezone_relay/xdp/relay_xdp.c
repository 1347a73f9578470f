/* XDP fast path for TURN ChannelData (firezone-relay).
 *
 * Theory of operation
 * -------------------
 * The Python relay stays the source of truth: it mirrors every usable channel
 * binding into eight hash maps (one per client family x peer family x
 * direction, layouts as upstream Firezone's ebpf-turn-router, every field
 * big-endian bytes as on the wire) and removes it again on unbind or expiry.
 * For each UDP datagram arriving on the interface this program either
 *
 *   - relays it itself (XDP_TX, back out of the interface it came from, MAC
 *     addresses swapped: client and peer are reached through the same next
 *     hop, normally the gateway), or
 *   - hands it to the kernel stack unchanged (XDP_PASS), where the Python
 *     relay's sockets receive it and relay it (or drop it) as they would
 *     without this program.
 *
 * Nothing is dropped here (but a frame shorter than its own headers say
 * after the head moved, which the length checks rule out): anything we do
 * not fully understand is passed, so a map miss, STUN, padded ChannelData, a result longer than the
 * MTU, IPv4 options or fragments, IPv6 extension headers, a cross-family
 * relay without an interface address, inconsistent lengths, or an IPv4
 * datagram without a checksum that would have to become IPv6, all go to
 * userspace, which is always correct (only slower).
 *
 * Two directions, plus the hairpin:
 *   client -> peer: UDP to the listen port whose payload is ChannelData
 *     (first byte 0x40-0x7F) with length == UDP payload - 4; key
 *     {client ip, client port, channel} in chan_to_udp_<cf><pf>; the 4-byte
 *     header is removed and the datagram goes from the allocation port to
 *     the peer.
 *   peer -> client: UDP to a port in [lowest, highest]; key {peer ip,
 *     allocation port, peer port} in udp_to_chan_<pf><cf>; a ChannelData
 *     header is prepended and the datagram goes from the listen port to the
 *     client.
 *   hairpin: a client->peer datagram whose peer is the relay's own public
 *     address (both ends of a session use this relay) is delivered as if it
 *     had arrived on the peer's allocation port from {public ip, our
 *     allocation port}, i.e. straight to the other client as ChannelData.
 *
 * Same-family replies use the original destination address as the source;
 * a family change uses the interface address of the new family from the
 * config map (unset: PASS).  TTL/hop limit, TOS/traffic class, the IPv4 ID
 * and DF bit (and the IPv6 flow label, v6->v6) are kept.  The UDP checksum
 * is updated incrementally (RFC 1624) from the fields that change, so a
 * datagram that arrived corrupted leaves corrupted and the receiver drops it;
 * an IPv4 checksum of 0 ("none") stays 0 for IPv4.  The IPv4 header
 * checksum is recomputed from scratch (10 words).
 *
 * Self-contained on purpose: no kernel or libbpf headers, so that
 * `clang -O2 -g -target bpf -c relay_xdp.c` works wherever clang does.
 * Struct layouts are mirrored in loader.py (and checked against the BTF of
 * the compiled object by the tests).
 */

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

#define SEC(name) __attribute__((section(name), used))
#define __always_inline inline __attribute__((always_inline))
#define __noinline __attribute__((noinline))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_PERCPU_ARRAY 6

#define XDP_DROP 1
#define XDP_PASS 2
#define XDP_TX 3

struct xdp_md {
	__u32 data;
	__u32 data_end;
	__u32 data_meta;
	__u32 ingress_ifindex;
	__u32 rx_queue_index;
	__u32 egress_ifindex;
};

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_xdp_adjust_head)(struct xdp_md *ctx, int delta) = (void *)44;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)23;

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* --- maps (layouts mirrored in loader.py) ---------------------------------- */

struct client_chan_v4 {
	__u8 ip[4];
	__u8 port[2];
	__u8 chan[2];
};

struct client_chan_v6 {
	__u8 ip[16];
	__u8 port[2];
	__u8 chan[2];
};

struct port_peer_v4 {
	__u8 ip[4];
	__u8 alloc_port[2];
	__u8 peer_port[2];
};

struct port_peer_v6 {
	__u8 ip[16];
	__u8 alloc_port[2];
	__u8 peer_port[2];
};

#define CFG_ENABLED 1
#define CFG_PUBLIC4 2
#define CFG_PUBLIC6 4
#define CFG_INT4 8
#define CFG_INT6 16
/* Send with XDP_REDIRECT to the interface the frame came in on instead of
 * XDP_TX.  The loader sets it for native mode on a veth: there XDP_TX queues
 * the frame on the other end of the pair but only wakes that end up when it
 * has an XDP program of its own (GRO alone is not enough), while a redirect
 * is flushed at the end of the NAPI poll either way. */
#define CFG_REDIRECT 32

/* Ports and lengths in host byte order, addresses as on the wire. */
struct relay_config {
	__u8 public4[4];
	__u8 public6[16];
	__u8 int4[4];
	__u8 int6[16];
	__u16 listen_port;
	__u16 lowest_port;
	__u16 highest_port;
	__u16 mtu; /* the longest IP packet we may send; longer goes to userspace */
	__u32 flags;
};

/* Per-CPU counters.  Relayed packets and bytes are indexed by
 * direction (0 client->peer, 1 peer->client) * 4 + (client is v6) * 2 +
 * (peer is v6); bytes are the ChannelData payload / the peer datagram, as
 * the userspace relay counts them. */
enum {
	ST_PACKETS = 0,   /* 8 entries */
	ST_BYTES = 8,     /* 8 entries */
	ST_HAIRPIN = 16,
	ST_PASS_MISS,
	ST_PASS_PADDED,
	ST_PASS_TOO_BIG,
	ST_PASS_IP_OPTIONS,
	ST_PASS_FRAGMENT,
	ST_PASS_NO_ADDRESS,
	ST_PASS_NO_CHECKSUM,
	ST_PASS_MALFORMED,
	ST_PASS_ADJUST_FAILED,
	ST_DROP_SHORT,    /* after the head moved: cannot happen (lengths checked) */
	ST_PASS_NOT_LOCAL,
	ST_PASS_BAD_HEADER_CHECKSUM,
	ST_SIZES = 32,    /* 16 buckets: length // 100, the last from 1500 on */
	ST_COUNT = 48,
};

#define MAP_ENTRIES 65536

#define ROUTE_MAP(name, k, v)                                  \
	struct {                                               \
		__uint(type, BPF_MAP_TYPE_HASH);               \
		__uint(max_entries, MAP_ENTRIES);              \
		__type(key, struct k);                         \
		__type(value, struct v);                       \
	} name SEC(".maps")

ROUTE_MAP(chan_to_udp_44, client_chan_v4, port_peer_v4);
ROUTE_MAP(chan_to_udp_46, client_chan_v4, port_peer_v6);
ROUTE_MAP(chan_to_udp_64, client_chan_v6, port_peer_v4);
ROUTE_MAP(chan_to_udp_66, client_chan_v6, port_peer_v6);
ROUTE_MAP(udp_to_chan_44, port_peer_v4, client_chan_v4);
ROUTE_MAP(udp_to_chan_46, port_peer_v4, client_chan_v6);
ROUTE_MAP(udp_to_chan_64, port_peer_v6, client_chan_v4);
ROUTE_MAP(udp_to_chan_66, port_peer_v6, client_chan_v6);

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct relay_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ST_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* --- wire headers ------------------------------------------------------------ */

struct eth_hdr {
	__u8 dst[6];
	__u8 src[6];
	__u16 proto;
};

struct ip4_hdr {
	__u8 ver_ihl;
	__u8 tos;
	__u16 tot_len;
	__u16 id;
	__u16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__u16 check;
	__u8 saddr[4];
	__u8 daddr[4];
};

struct ip6_hdr {
	__u8 vtc_flow[4];
	__u16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

struct udp_hdr {
	__u16 source;
	__u16 dest;
	__u16 len;
	__u16 check;
};

#define ETH_P_IPV4 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_UDP 17

static __always_inline __u16 bswap16(__u16 x)
{
	return (__u16)((x << 8) | (x >> 8));
}

/* Network <-> host order for 16-bit values (BPF targets here are little
 * endian; bpfeb would need these to be identities). */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define ntoh16(x) bswap16(x)
#else
#define ntoh16(x) (x)
#endif
#define hton16(x) ntoh16(x)

static __always_inline __u16 get16(const __u8 *p)
{
	return (__u16)((p[0] << 8) | p[1]);
}

static __always_inline void put16(__u8 *p, __u16 v)
{
	p[0] = v >> 8;
	p[1] = v & 0xff;
}

/* Sum of the big-endian 16-bit words of an address (4 or 16 bytes). */
static __always_inline __u32 sum_ip(const __u8 *ip, int fam)
{
	__u32 s = 0;
	s += get16(ip) + get16(ip + 2);
	if (fam == 6) {
#pragma unroll
		for (int i = 4; i < 16; i += 2)
			s += get16(ip + i);
	}
	return s;
}

static __always_inline __u16 fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

static __always_inline void count(__u32 index, __u64 n)
{
	__u64 *c = bpf_map_lookup_elem(&stats, &index);
	if (c)
		*c += n;
}

/* As the userspace relay buckets sizes: length // 100, 15 from 1600 on. */
static __always_inline __u32 size_bucket(__u32 len)
{
	return len < 1600 ? len / 100 : 15;
}

static __always_inline int pass(__u32 reason)
{
	count(reason, 1);
	return XDP_PASS;
}

static __always_inline int drop(__u32 reason)
{
	count(reason, 1);
	return XDP_DROP;
}

static __always_inline int ip_eq(const __u8 *a, const __u8 *b, int fam)
{
	int n = fam == 4 ? 4 : 16;
	__u8 diff = 0;
#pragma unroll
	for (int i = 0; i < 16; i++)
		if (i < n)
			diff |= a[i] ^ b[i];
	return diff == 0;
}

/* Is dst one of the relay's addresses (interface or public) of family fam?
 * Only datagrams addressed to the relay are relayed; anything else is the
 * stack's business (and a corrupted destination must not become our
 * source address). */
static __always_inline int is_local(const __u8 *dst, int fam, const struct relay_config *cfg)
{
	if (fam == 4)
		return ((cfg->flags & CFG_INT4) && ip_eq(dst, cfg->int4, 4)) ||
		       ((cfg->flags & CFG_PUBLIC4) && ip_eq(dst, cfg->public4, 4));
	return ((cfg->flags & CFG_INT6) && ip_eq(dst, cfg->int6, 6)) ||
	       ((cfg->flags & CFG_PUBLIC6) && ip_eq(dst, cfg->public6, 6));
}

/* What we learned from the incoming datagram. */
struct in_pkt {
	__u8 src[16];
	__u8 dst[16];
	__u8 smac[6];
	__u8 dmac[6];
	__u16 sport;    /* host order */
	__u16 dport;
	__u16 udp_len;
	__u16 csum;     /* as the big-endian integer on the wire */
	__u16 ip_id;    /* v4, big-endian integer */
	__u16 df;       /* v4: 0x4000 when DF was set */
	__u32 flow;     /* v6 flow label */
	__u8 fam;
	__u8 tos;
	__u8 ttl;
};

/* Where the result goes. */
struct out_pkt {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport;
	__u16 dport;
	__u16 chan;     /* 0: no ChannelData header */
	__u8 fam;
	__u8 client_fam; /* for the counters */
	__u8 peer_fam;
};

/* A map key (or value) as the loader packs it: an address of family fam
 * (4 or 16 bytes) followed by two big-endian 16-bit fields; the two layouts
 * are the client_chan_* and port_peer_* structs (the same shapes). */
struct key_any {
	__u8 b[20];
};

static __always_inline void make_key(struct key_any *k, const __u8 *ip, int n, __u16 first, __u16 second)
{
	__builtin_memcpy(k->b, ip, n);
	put16(k->b + n, first);
	put16(k->b + n + 2, second);
}

/* The far end of a binding from a value of family fam: its address into
 * o->dst, the first field into *first, the second into *second. */
static __always_inline int take_value(struct out_pkt *o, const __u8 *v, int fam, __u16 *first, __u16 *second)
{
	const int n = fam == 4 ? 4 : 16;
	__builtin_memcpy(o->dst, v, n);
	*first = get16(v + n);
	*second = get16(v + n + 2);
	o->fam = fam;
	return 1;
}

/* A key into the pair of maps of its family whose values are v4 (to4) and
 * v6 (to6): the value found, copied into o; 0 on a miss.  Always inline so
 * that the verifier sees constant map pointers. */
static __always_inline int lookup_pair(void *to4, void *to6, const struct key_any *k, struct out_pkt *o,
				       __u16 *first, __u16 *second)
{
	const __u8 *v = bpf_map_lookup_elem(to4, k);
	if (v)
		return take_value(o, v, 4, first, second);
	v = bpf_map_lookup_elem(to6, k);
	if (v)
		return take_value(o, v, 6, first, second);
	return 0;
}

/* Look up a client->peer binding; fills o->dst/dport/sport(allocation port)
 * and o->fam.  Returns 0 on a miss. */
static __noinline int lookup_chan(const struct in_pkt *p, __u16 chan, struct out_pkt *o)
{
	struct key_any k;
	if (p->fam == 4) {
		make_key(&k, p->src, 4, p->sport, chan);
		return lookup_pair(&chan_to_udp_44, &chan_to_udp_46, &k, o, &o->sport, &o->dport);
	}
	make_key(&k, p->src, 16, p->sport, chan);
	return lookup_pair(&chan_to_udp_64, &chan_to_udp_66, &k, o, &o->sport, &o->dport);
}

/* Look up a peer->client binding for a datagram from {ip, peer_port} (of
 * family fam) arriving on alloc_port; fills o->dst/dport/chan/fam. */
static __noinline int lookup_udp(const __u8 *ip, int fam, __u16 alloc_port, __u16 peer_port,
				      struct out_pkt *o)
{
	struct key_any k;
	if (fam == 4) {
		make_key(&k, ip, 4, alloc_port, peer_port);
		return lookup_pair(&udp_to_chan_44, &udp_to_chan_46, &k, o, &o->dport, &o->chan);
	}
	make_key(&k, ip, 16, alloc_port, peer_port);
	return lookup_pair(&udp_to_chan_64, &udp_to_chan_66, &k, o, &o->dport, &o->chan);
}

/* Source address for a datagram of family o->fam: the address the incoming
 * one was sent to when the family is unchanged, else the interface address
 * of the new family.  Returns 0 when that is unset. */
static __always_inline int pick_source(const struct in_pkt *p, const struct relay_config *cfg,
				       struct out_pkt *o)
{
	if (o->fam == p->fam) {
		__builtin_memcpy(o->src, p->dst, 16);
		return 1;
	}
	if (o->fam == 4) {
		if (!(cfg->flags & CFG_INT4))
			return 0;
		__builtin_memcpy(o->src, cfg->int4, 4);
		return 1;
	}
	if (!(cfg->flags & CFG_INT6))
		return 0;
	__builtin_memcpy(o->src, cfg->int6, 16);
	return 1;
}

SEC("xdp")
int relay_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct relay_config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || !(cfg->flags & CFG_ENABLED))
		return XDP_PASS;

	struct eth_hdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;

	struct in_pkt p = {};
	__builtin_memcpy(p.smac, eth->src, 6);
	__builtin_memcpy(p.dmac, eth->dst, 6);
	__u32 ip_len;       /* IP header + UDP datagram, from the headers */
	__u32 ip_hdr_len;
	__u32 frame_ip_len = (__u32)(data_end - (void *)(eth + 1));
	struct ip4_hdr *ip4 = 0; /* IPv4 only: its header checksum is checked below */
	struct udp_hdr *udp;

	if (eth->proto == hton16(ETH_P_IPV4)) {
		struct ip4_hdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return XDP_PASS;
		if (ip->protocol != IPPROTO_UDP || (ip->ver_ihl >> 4) != 4)
			return XDP_PASS;
		if (ip->ver_ihl != 0x45)
			return pass(ST_PASS_IP_OPTIONS);
		__u16 frag = ntoh16(ip->frag_off);
		if (frag & 0x3fff) /* MF or an offset: reassembly is the stack's job */
			return pass(ST_PASS_FRAGMENT);
		p.fam = 4;
		__builtin_memcpy(p.src, ip->saddr, 4);
		__builtin_memcpy(p.dst, ip->daddr, 4);
		p.tos = ip->tos;
		p.ttl = ip->ttl;
		p.ip_id = ntoh16(ip->id);
		p.df = frag & 0x4000;
		ip_len = ntoh16(ip->tot_len);
		ip_hdr_len = 20;
		ip4 = ip;
		udp = (void *)(ip + 1);
	} else if (eth->proto == hton16(ETH_P_IPV6)) {
		struct ip6_hdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return XDP_PASS;
		if ((ip->vtc_flow[0] >> 4) != 6 || ip->nexthdr != IPPROTO_UDP)
			return XDP_PASS; /* extension headers included */
		p.fam = 6;
		__builtin_memcpy(p.src, ip->saddr, 16);
		__builtin_memcpy(p.dst, ip->daddr, 16);
		p.tos = (__u8)((ip->vtc_flow[0] << 4) | (ip->vtc_flow[1] >> 4));
		p.flow = ((__u32)(ip->vtc_flow[1] & 0x0f) << 16) | ((__u32)ip->vtc_flow[2] << 8) | ip->vtc_flow[3];
		p.ttl = ip->hop_limit;
		ip_len = 40 + (__u32)ntoh16(ip->payload_len);
		ip_hdr_len = 40;
		udp = (void *)(ip + 1);
	} else {
		return XDP_PASS;
	}

	if ((void *)(udp + 1) > data_end)
		return XDP_PASS;
	p.sport = ntoh16(udp->source);
	p.dport = ntoh16(udp->dest);
	p.udp_len = ntoh16(udp->len);
	p.csum = ntoh16(udp->check);
	__u8 *payload = (void *)(udp + 1);
	int ours;           /* 1 client->peer, 2 peer->client */
	if (p.dport == cfg->listen_port)
		ours = 1;
	else if (p.dport >= cfg->lowest_port && p.dport <= cfg->highest_port)
		ours = 2;
	else
		return XDP_PASS;
	/* A zero UDP checksum is invalid in IPv6 (RFC 8200): the stack drops it. */
	if (ip_len > frame_ip_len || p.udp_len < 8 || (__u32)p.udp_len + ip_hdr_len != ip_len ||
	    (p.fam == 6 && p.csum == 0))
		return pass(ST_PASS_MALFORMED);
	if (ip4) {
		/* The header checksum is recomputed on the way out, so a
		 * corrupted header must be caught here (the stack drops it). */
		__u16 *w = (void *)ip4;
		__u32 hsum = 0;
#pragma unroll
		for (int i = 0; i < 10; i++)
			hsum += w[i];
		if (fold(hsum) != 0xffff)
			return pass(ST_PASS_BAD_HEADER_CHECKSUM);
	}

	if (!is_local(p.dst, p.fam, cfg))
		return pass(ST_PASS_NOT_LOCAL);

	__u32 data_len = p.udp_len - 8;   /* UDP payload */
	__u16 in_chan = 0, in_chan_len = 0;
	struct out_pkt o = {};

	if (ours == 1) {
		/* client -> peer: ChannelData only, exactly as long as the datagram */
		if ((void *)(payload + 1) > data_end)
			return XDP_PASS; /* empty: userspace counts it */
		if (payload[0] < 0x40 || payload[0] > 0x7f)
			return XDP_PASS; /* STUN (or garbage): userspace answers or drops */
		if (data_len < 4 || (void *)(payload + 4) > data_end)
			return pass(ST_PASS_MALFORMED);
		in_chan = get16(payload);
		in_chan_len = get16(payload + 2);
		if ((__u32)in_chan_len + 4 > data_len)
			return pass(ST_PASS_MALFORMED);
		if ((__u32)in_chan_len + 4 != data_len)
			return pass(ST_PASS_PADDED);
		data_len = in_chan_len;
		if (!lookup_chan(&p, in_chan, &o))
			return pass(ST_PASS_MISS);
		o.client_fam = p.fam;
		o.peer_fam = o.fam;
		int hairpin = 0;
		if (o.fam == 4 && (cfg->flags & CFG_PUBLIC4))
			hairpin = ip_eq(o.dst, cfg->public4, 4);
		else if (o.fam == 6 && (cfg->flags & CFG_PUBLIC6))
			hairpin = ip_eq(o.dst, cfg->public6, 6);
		if (hairpin) {
			/* As if it arrived on the peer's allocation port from
			 * {our public address, our allocation port}. */
			__u8 public_ip[16] = {};
			int peer_fam = o.fam;
			__u16 our_port = o.sport, their_port = o.dport;
			__builtin_memcpy(public_ip, o.dst, 16);
			if (!lookup_udp(public_ip, peer_fam, their_port, our_port, &o))
				return pass(ST_PASS_MISS);
			o.sport = cfg->listen_port;
			count(ST_HAIRPIN, 1);
			/* the second leg, peer -> client, counted like userspace does */
			__u32 leg = 4 + (o.fam == 6) * 2 + (peer_fam == 6);
			count(ST_PACKETS + leg, 1);
			count(ST_BYTES + leg, data_len);
			count(ST_SIZES + size_bucket(data_len), 1);
		}
	} else {
		/* peer -> client */
		if (!lookup_udp(p.src, p.fam, p.dport, p.sport, &o))
			return pass(ST_PASS_MISS);
		o.sport = cfg->listen_port;
		o.client_fam = o.fam;
		o.peer_fam = p.fam;
	}

	if (!pick_source(&p, cfg, &o))
		return pass(ST_PASS_NO_ADDRESS);
	if (p.csum == 0 && o.fam == 6)
		return pass(ST_PASS_NO_CHECKSUM); /* IPv6 needs one; userspace computes it */

	__u32 out_udp_len = 8 + (o.chan ? 4 : 0) + data_len;
	__u32 out_ip_len = (o.fam == 4 ? 20 : 40) + out_udp_len;
	if (out_ip_len > cfg->mtu || out_udp_len > 0xffff)
		return pass(ST_PASS_TOO_BIG);

	/* RFC 1624: HC' = ~(~HC + ~m + m'), over every 16-bit word that changes:
	 * pseudo-header addresses and length (the protocol word is the same in
	 * both families), the UDP ports and length, and the ChannelData header
	 * removed and/or added at the start of the payload (an even offset, so
	 * the payload words keep their alignment). */
	__u16 out_csum = 0;
	if (p.csum != 0 || o.fam == 6) {
		__u32 old_sum = sum_ip(p.src, p.fam) + sum_ip(p.dst, p.fam) + 2 * (__u32)p.udp_len + p.sport + p.dport;
		if (ours == 1)
			old_sum += in_chan + in_chan_len;
		__u32 new_sum = sum_ip(o.src, o.fam) + sum_ip(o.dst, o.fam) + 2 * out_udp_len + o.sport + o.dport;
		if (o.chan)
			new_sum += o.chan + data_len;
		__u32 acc = (__u16)~p.csum + (__u16)~fold(old_sum) + fold(new_sum);
		out_csum = (__u16)~fold(acc);
		if (out_csum == 0)
			out_csum = 0xffff;
	}

	int old_hdr = 14 + ip_hdr_len + 8 + (ours == 1 ? 4 : 0);
	int new_hdr = 14 + (o.fam == 4 ? 20 : 40) + 8 + (o.chan ? 4 : 0);
	if (bpf_xdp_adjust_head(ctx, old_hdr - new_hdr))
		return pass(ST_PASS_ADJUST_FAILED); /* the packet is unchanged then */

	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if (o.fam == 4) {
		struct ip4_hdr *ip = (void *)(eth + 1);
		udp = (void *)(ip + 1);
		/* The frame is at least new_hdr long (its IP length was checked
		 * against the frame); the verifier wants it shown, and a packet
		 * whose head moved can no longer be passed. */
		if ((void *)(udp + 1) > data_end)
			return drop(ST_DROP_SHORT);
		eth->proto = hton16(ETH_P_IPV4);
		__u16 id = p.fam == 4 ? p.ip_id : 0;
		__u16 frag = p.fam == 4 ? p.df : 0x4000;
		ip->ver_ihl = 0x45;
		ip->tos = p.tos;
		ip->tot_len = hton16((__u16)out_ip_len);
		ip->id = hton16(id);
		ip->frag_off = hton16(frag);
		ip->ttl = p.ttl;
		ip->protocol = IPPROTO_UDP;
		__builtin_memcpy(ip->saddr, o.src, 4);
		__builtin_memcpy(ip->daddr, o.dst, 4);
		__u32 s = (0x4500 | p.tos) + out_ip_len + id + frag + ((__u32)p.ttl << 8 | IPPROTO_UDP) +
			  sum_ip(o.src, 4) + sum_ip(o.dst, 4);
		ip->check = hton16((__u16)~fold(s));
	} else {
		struct ip6_hdr *ip = (void *)(eth + 1);
		udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > data_end)
			return drop(ST_DROP_SHORT);
		eth->proto = hton16(ETH_P_IPV6);
		__u32 flow = p.fam == 6 ? p.flow : 0;
		ip->vtc_flow[0] = 0x60 | (p.tos >> 4);
		ip->vtc_flow[1] = (__u8)((p.tos << 4) | ((flow >> 16) & 0x0f));
		ip->vtc_flow[2] = (__u8)(flow >> 8);
		ip->vtc_flow[3] = (__u8)flow;
		ip->payload_len = hton16((__u16)out_udp_len);
		ip->nexthdr = IPPROTO_UDP;
		ip->hop_limit = p.ttl;
		__builtin_memcpy(ip->saddr, o.src, 16);
		__builtin_memcpy(ip->daddr, o.dst, 16);
	}
	if (o.chan) {
		__u8 *cd = (void *)(udp + 1);
		if ((void *)(cd + 4) > data_end)
			return drop(ST_DROP_SHORT);
		put16(cd, o.chan);
		put16(cd + 2, (__u16)data_len);
	}
	__builtin_memcpy(eth->dst, p.smac, 6);
	__builtin_memcpy(eth->src, p.dmac, 6);
	udp->source = hton16(o.sport);
	udp->dest = hton16(o.dport);
	udp->len = hton16((__u16)out_udp_len);
	udp->check = hton16(out_csum);

	__u32 dir = ours == 1 ? 0 : 4;
	__u32 idx = dir + (o.client_fam == 6) * 2 + (o.peer_fam == 6);
	count(ST_PACKETS + idx, 1);
	count(ST_BYTES + idx, data_len);
	count(ST_SIZES + size_bucket(data_len), 1);
	if (cfg->flags & CFG_REDIRECT)
		return (int)bpf_redirect(ctx->ingress_ifindex, 0);
	return XDP_TX;
}
