// SPDX-License-Identifier: (MIT OR GPL-2.0)
/* The gateway's kernel fast path: established flows translated in tc ingress.
 *
 * One program, attached to the ingress of every interface a gateway translates on,
 * takes the two kinds of packet it owns and rewrites them exactly as the Python
 * translator does (gateway/translate/base.py, _to_sal and _to_legacy):
 *
 *   legacy TCP or UDP of a kernel flow  ->  SAL toward the peer (header inserted)
 *   SAL data of a kernel flow           ->  legacy TCP or UDP toward the legacy host
 *                                           (header removed)
 *
 * A translated packet ends the filter chain (TC_ACT_OK); everything else goes on
 * (TC_ACT_UNSPEC) unchanged, to netfilter and NFQUEUE: SYN, FIN and RST (which
 * also hand the flow back to Python), SAL control packets and extensions, IP options,
 * fragments, super-packets, unknown flows, a UDP datagram too big for the path (Python
 * answers it with frag-needed). Translated packets carry the gateway's mark,
 * which its owned chains return before any queue rule.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "fastpath.h"

#define IPPROTO_SAL 144
#define SAL_LEN 12
#define UDP_LEN 8
#define IP_LEN 20
#define TCP_MIN 20
#define IP_DF 0x4000
#define IP_MF_OFFSET 0x3fff
#define LOOPBACK_IFINDEX 1	/* lo, in every network namespace */
/* not ours: on to the next filter (another instance's) and the stack, unchanged */
#define PASS TC_ACT_UNSPEC

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SERVAL_MAX_FLOWS);
	__type(key, __u32);               /* our flowID, as on the wire */
	__type(value, struct flow);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} serval_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SERVAL_MAX_FLOWS);
	__type(key, struct legacy_key);
	__type(value, __u32);             /* the flowID in serval_flows */
	__uint(map_flags, BPF_F_NO_PREALLOC);
} serval_legacy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} serval_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, C_MAX);
	__type(key, __u32);
	__type(value, __u64);
} serval_counters SEC(".maps");

/* skb->data and skb->data_end, each read by its own load from the context: clang may
 * otherwise keep &skb->data_end in a register across uses, a context pointer the
 * verifier refuses to dereference once modified. */
#define CTX_LOAD(skb, field) ({ \
	void *_v; \
	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(_v) \
		     : "r"(skb), "i"(offsetof(struct __sk_buff, field))); \
	_v; })

static __always_inline void *pkt_data(struct __sk_buff *skb) { return CTX_LOAD(skb, data); }
static __always_inline void *pkt_end(struct __sk_buff *skb) { return CTX_LOAD(skb, data_end); }

static __always_inline int count(__u32 which, int verdict)
{
	__u64 *c = bpf_map_lookup_elem(&serval_counters, &which);

	if (c)
		*c += 1;
	return verdict;
}

/* The IPv4 header checksum, computed afresh (the header is 20 bytes, checksum zeroed). */
static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 sum = 0;

	ip->check = 0;
#pragma unroll
	for (int i = 0; i < IP_LEN / 2; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum & 0xffff;
}

/* The IPv4 header after the rewrite, as the translator writes it: the same TOS, ident,
 * TTL and DF, no other flag; a header checksum of its own. Packet pointers are read
 * afresh (the helpers before it may have moved the data). */
static __always_inline int new_ip_header(struct __sk_buff *skb, __u32 tot, __u8 protocol,
					 __be32 saddr, __be32 daddr)
{
	void *data = pkt_data(skb), *end = pkt_end(skb);
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > end)
		return -1;
	ip->tot_len = bpf_htons(tot);
	ip->frag_off &= bpf_htons(IP_DF);
	ip->protocol = protocol;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = ip_checksum(ip);
	return 0;
}

static __always_inline void seen(struct flow *f, __u64 *packets, __u64 *bytes, __u32 len)
{
	__sync_fetch_and_add(packets, 1);
	__sync_fetch_and_add(bytes, len);
	/* the tick clock: a read of the TSC costs more than the rest of this function, and
	 * idle expiry needs no better than a tick */
	f->last_seen_ns = bpf_ktime_get_coarse_ns();
}

/* A FIN or RST: the flow is Python's from now on, in both directions, so that
 * its close is followed segment by segment. The packet itself goes up unchanged. */
static __always_inline int hand_back(struct flow *f)
{
	f->flags |= SERVAL_FLOW_SLOW;
	return count(C_PASS_CONTROL, PASS);
}

/* Headers within reach of direct access (a NIC may leave them in fragments). */
static __always_inline int ensure_linear(struct __sk_buff *skb, __u32 len)
{
	if (len > skb->len)
		len = skb->len;
	if (pkt_data(skb) + len <= pkt_end(skb))
		return 0;
	return bpf_skb_pull_data(skb, len);
}

/* The FIB question for a translated packet: where would forwarding send it. */
static __always_inline void fib_query(struct bpf_fib_lookup *fib, struct __sk_buff *skb, struct iphdr *ip)
{
	fib->family = 2;	/* AF_INET */
	fib->l4_protocol = ip->protocol;
	fib->tot_len = bpf_ntohs(ip->tot_len);
	fib->ifindex = skb->ingress_ifindex;
	fib->tos = ip->tos;
	fib->ipv4_src = ip->saddr;
	fib->ipv4_dst = ip->daddr;
}

/* A packet this host sent to itself (a backend in the gateway's own namespace, a
 * sidecar, answering a translated connection) arrives on loopback, from which the stack
 * will not forward it once it is SAL toward the peer: it is handed to the interface
 * its route leaves by, whose neighbour entry supplies the MACs. Translated to a
 * legacy host that is this one, it is delivered here as usual. */
static __always_inline int from_loopback(struct __sk_buff *skb, int counter)
{
	void *data = pkt_data(skb), *end = pkt_end(skb);
	struct iphdr *ip = data + ETH_HLEN;
	struct bpf_fib_lookup fib = {};
	int ret;

	if ((void *)(ip + 1) > end)
		return count(C_ERROR, TC_ACT_SHOT);
	fib_query(&fib, skb, ip);
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (ret == BPF_FIB_LKUP_RET_NOT_FWDED)
		return count(counter, TC_ACT_OK);		/* ours: local delivery */
	if (ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH)
		return count(C_ERROR, TC_ACT_SHOT);	/* no route, too big: TCP resends */
	count(C_REDIRECTED, 0);
	return count(counter, bpf_redirect_neigh(fib.ifindex, 0, 0, 0));
}

/* With cfg->redirect: send the translated packet straight to its next hop's interface,
 * as the stack's forwarding would (TTL decremented, the neighbour's MAC), skipping the
 * host's routing and netfilter on the way. What the FIB cannot hand over (a local
 * destination, no neighbour entry yet, TTL running out, too big) takes the stack. */
static __always_inline int forward(struct __sk_buff *skb, struct config *cfg, int counter)
{
	void *data = pkt_data(skb), *end = pkt_end(skb);
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	struct bpf_fib_lookup fib = {};

	skb->mark = cfg->mark;
	if (skb->ingress_ifindex == LOOPBACK_IFINDEX)
		return from_loopback(skb, counter);
	if (!cfg->redirect || (void *)(ip + 1) > end || ip->ttl <= 1)
		return count(counter, TC_ACT_OK);
	fib_query(&fib, skb, ip);
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return count(counter, TC_ACT_OK);
	data = pkt_data(skb);
	end = pkt_end(skb);
	eth = data;
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > end)
		return count(counter, TC_ACT_OK);
	ip->ttl -= 1;
	ip->check = ip_checksum(ip);
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	count(C_REDIRECTED, 0);
	return count(counter, bpf_redirect(fib.ifindex, 0));
}

/* The kernel flow of a legacy packet (its 4-tuple and transport), or NULL. */
static __always_inline struct flow *legacy_flow(struct iphdr *ip, __be16 sport, __be16 dport, __u8 protocol)
{
	struct legacy_key key = {
		.src = ip->saddr, .dst = ip->daddr, .sport = sport, .dport = dport, .protocol = protocol,
	};
	__u32 *fid = bpf_map_lookup_elem(&serval_legacy, &key);

	return fid ? bpf_map_lookup_elem(&serval_flows, fid) : NULL;
}

/* The kernel's own sk_buff, for how far its checksum is done (ip_summed). CO-RE: libbpf
 * finds the field in the running kernel's BTF. */
extern void *bpf_cast_to_kern_ctx(void *) __ksym;

struct sk_buff___serval {
	__u8 ip_summed: 2;
} __attribute__((preserve_access_index));

#define CHECKSUM_COMPLETE 2
#define CHECKSUM_PARTIAL 3

static __always_inline __u32 ip_summed(struct __sk_buff *skb)
{
	struct sk_buff___serval *k = bpf_cast_to_kern_ctx(skb);

	return BPF_CORE_READ_BITFIELD(k, ip_summed);
}

/* One's-complement arithmetic as the kernel's csum_add and csum_fold. */
static __always_inline __u32 csum_add32(__u32 a, __u32 b)
{
	__u32 s = a + b;

	return s + (s < a);
}

static __always_inline __u16 csum_fold16(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return ~s;
}

/* bpf_l4_csum_replace(diff) on the checksum field's value, for a packet whose checksum
 * is whole (CHECKSUM_NONE, _UNNECESSARY) or left to the device (CHECKSUM_PARTIAL: the
 * field holds the pseudo-header's sum, and the segment is summed later, ports and all). */
static __always_inline __u16 csum_by_diff(__u16 sum, __u32 diff, int pseudo, int partial, int mangled_0)
{
	if (mangled_0 && !sum)
		return 0;
	if (!partial)
		sum = csum_fold16(csum_add32(diff, ~(__u32)sum));
	else if (pseudo)
		sum = ~csum_fold16(csum_add32(diff, sum));
	if (mangled_0 && !sum)
		sum = 0xffff;
	return sum;
}

/* The transport checksum at csum_off moved between the legacy addresses and ports and
 * the SAL side's (pseudo-header fields as such, ports as segment data), then the ports
 * written. UDP (mangled_0): a checksum of 0 (none) stays 0, a result of 0 is sent as
 * 0xFFFF, as the translator does. Done here rather than by bpf_l4_csum_replace, whose
 * calls cost more than the rest of the rewrite, except for CHECKSUM_COMPLETE, where the
 * kernel also keeps skb->csum, which a program cannot write. */
static __always_inline int move_checksum(struct __sk_buff *skb, __u32 l4_off, __u32 csum_off,
					 __u32 addr_diff, __u32 port_diff, int mangled_0, __u32 ports)
{
	__u32 summed = ip_summed(skb), flag = mangled_0 ? BPF_F_MARK_MANGLED_0 : 0;
	void *data, *end;
	__u16 *check;

	if (summed == CHECKSUM_COMPLETE &&
	    (bpf_l4_csum_replace(skb, l4_off + csum_off, 0, addr_diff, BPF_F_PSEUDO_HDR | flag) ||
	     bpf_l4_csum_replace(skb, l4_off + csum_off, 0, port_diff, flag)))
		return -1;
	data = pkt_data(skb);
	end = pkt_end(skb);
	check = data + l4_off + csum_off;
	if ((void *)(check + 1) > end || data + l4_off + sizeof(ports) > end)
		return -1;
	if (summed != CHECKSUM_COMPLETE) {
		int partial = summed == CHECKSUM_PARTIAL;
		__u16 sum = csum_by_diff(*check, addr_diff, 1, partial, mangled_0);

		*check = csum_by_diff(sum, port_diff, 0, partial, mangled_0);
	}
	*(__u32 *)(data + l4_off) = ports;
	return 0;
}

static __always_inline int write_sal_header(struct __sk_buff *skb, __u32 off, const __u8 *hdr)
{
	void *data = pkt_data(skb), *end = pkt_end(skb);
	__u32 *to = data + off;
	const __u32 *from = (const __u32 *)hdr;

	if ((void *)(to + SAL_LEN / 4) > end)
		return -1;
	to[0] = from[0];
	to[1] = from[1];
	to[2] = from[2];
	return 0;
}

/* The rest of legacy -> SAL once the transport is rewritten: room for the SAL header
 * (and UDP) between IPv4 and the transport, the flow's header in it, the new IPv4 header. */
static __always_inline int encap(struct __sk_buff *skb, struct config *cfg, struct flow *f, __u32 tot)
{
	__u32 seg_len = tot - IP_LEN, grow = SAL_LEN + (cfg->udp ? UDP_LEN : 0);

	if (bpf_skb_adjust_room(skb, grow, BPF_ADJ_ROOM_NET, 0))
		return count(C_ERROR, TC_ACT_SHOT);
	if (cfg->udp) {
		struct udphdr udp = {
			.source = cfg->udp_port,
			.dest = f->peer_port,
			.len = bpf_htons(UDP_LEN + SAL_LEN + seg_len),
			.check = 0,
		};
		if (bpf_skb_store_bytes(skb, ETH_HLEN + IP_LEN, &udp, UDP_LEN, BPF_F_RECOMPUTE_CSUM))
			return count(C_ERROR, TC_ACT_SHOT);
	}
	/* a SAL header with its own valid checksum sums to zero: no checksum to fix */
	if (write_sal_header(skb, ETH_HLEN + IP_LEN + grow - SAL_LEN, f->out_hdr))
		return count(C_ERROR, TC_ACT_SHOT);
	if (new_ip_header(skb, tot + grow, cfg->udp ? IPPROTO_UDP : IPPROTO_SAL, f->local_addr, f->peer_addr))
		return count(C_ERROR, TC_ACT_SHOT);
	return forward(skb, cfg, C_TO_SAL);
}

/* legacy TCP -> SAL */
static __always_inline int to_sal(struct __sk_buff *skb, struct config *cfg, __u32 tot)
{
	void *data = pkt_data(skb), *end = pkt_end(skb);
	struct iphdr *ip = data + ETH_HLEN;
	struct tcphdr *th = data + ETH_HLEN + IP_LEN;
	__u32 seg_len = tot - IP_LEN;
	struct flow *f;

	if ((void *)(th + 1) > end || tot < IP_LEN + TCP_MIN)
		return PASS;
	f = legacy_flow(ip, th->source, th->dest, IPPROTO_TCP);
	if (!f)
		return PASS;
	if (f->flags & SERVAL_FLOW_SLOW)
		return count(C_PASS_SLOW, PASS);
	if (th->fin || th->rst)
		return hand_back(f);
	if (th->syn)        /* a repeated SYN: Python carries it (the flow stays here) */
		return count(C_PASS_CONTROL, PASS);
	if (th->doff * 4 < TCP_MIN || th->doff * 4 > seg_len)
		return count(C_PASS_MISMATCH, PASS);
	if (skb->gso_size)
		return count(C_PASS_GSO, PASS);
	if (th->ack)
		f->legacy_last_ack = th->ack_seq;
	seen(f, &f->packets_out, &f->bytes_out, seg_len);

	/* the segment: ports zeroed, checksum moved to the SAL pseudo-header (zero
	 * addresses over UDP) */
	if (move_checksum(skb, ETH_HLEN + IP_LEN, offsetof(struct tcphdr, check), f->out_addr_diff,
			  f->out_port_diff, 0, 0))
		return count(C_ERROR, TC_ACT_SHOT);
	return encap(skb, cfg, f, tot);
}

/* legacy UDP -> SAL: the datagram's UDP header with ports 0, its checksum moved (none
 * stays none). A datagram too big for the path goes up: Python answers frag-needed. */
static __always_inline int udp_to_sal(struct __sk_buff *skb, struct config *cfg, __u32 tot)
{
	void *data = pkt_data(skb), *end = pkt_end(skb);
	struct iphdr *ip = data + ETH_HLEN;
	struct udphdr *uh = data + ETH_HLEN + IP_LEN;
	__u32 seg_len = tot - IP_LEN;
	struct flow *f;

	if ((void *)(uh + 1) > end)
		return PASS;
	f = legacy_flow(ip, uh->source, uh->dest, IPPROTO_UDP);
	if (!f)
		return PASS;
	if (f->flags & SERVAL_FLOW_SLOW)
		return count(C_PASS_SLOW, PASS);
	if (bpf_ntohs(uh->len) != seg_len)      /* Python drops it, counted */
		return count(C_PASS_MISMATCH, PASS);
	if (seg_len > f->udp_max)
		return count(C_PASS_TOO_BIG, PASS);
	if (skb->gso_size)
		return count(C_PASS_GSO, PASS);
	seen(f, &f->packets_out, &f->bytes_out, seg_len);
	if (move_checksum(skb, ETH_HLEN + IP_LEN, offsetof(struct udphdr, check), f->out_addr_diff,
			  f->out_port_diff, 1, 0))
		return count(C_ERROR, TC_ACT_SHOT);
	return encap(skb, cfg, f, tot);
}

static __always_inline int same_header(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2];
}

/* The rest of SAL -> legacy once the transport is rewritten: the SAL header (and UDP)
 * removed, the legacy IPv4 header. */
static __always_inline int decap(struct __sk_buff *skb, struct config *cfg, struct flow *f, __u32 tot,
				 __u32 shrink)
{
	if (bpf_skb_adjust_room(skb, -(__s32)shrink, BPF_ADJ_ROOM_NET, 0))
		return count(C_ERROR, TC_ACT_SHOT);
	if (new_ip_header(skb, tot - shrink, f->protocol, f->legacy_dst, f->legacy_src))
		return count(C_ERROR, TC_ACT_SHOT);
	return forward(skb, cfg, C_FROM_SAL);
}

/* The ports toward the legacy host (the peer's side is its destination), as the four
 * bytes on the wire. */
static __always_inline __u32 legacy_ports(const struct flow *f)
{
	union {
		struct { __be16 sport, dport; };
		__u32 word;
	} ports = { .sport = f->legacy_dport, .dport = f->legacy_sport };

	return ports.word;
}

/* SAL data -> legacy TCP or UDP */
static __always_inline int from_sal(struct __sk_buff *skb, struct config *cfg, __u32 tot)
{
	void *data = pkt_data(skb), *end = pkt_end(skb);
	struct iphdr *ip = data + ETH_HLEN;
	__u32 shrink = SAL_LEN + (cfg->udp ? UDP_LEN : 0);
	__u32 l4_off = ETH_HLEN + IP_LEN + shrink, seg_len;
	__u8 *sal = data + ETH_HLEN + IP_LEN + shrink - SAL_LEN;
	struct tcphdr *th = data + l4_off;
	struct udphdr *uh = data + l4_off;
	struct udphdr *outer = data + ETH_HLEN + IP_LEN;
	struct flow *f;
	__u32 fid;

	if ((void *)(uh + 1) > end || tot < IP_LEN + shrink + UDP_LEN)
		return PASS;
	__builtin_memcpy(&fid, sal + 4, 4);
	f = bpf_map_lookup_elem(&serval_flows, &fid);
	if (!f)
		return PASS;
	if (f->flags & SERVAL_FLOW_SLOW)
		return count(C_PASS_SLOW, PASS);
	/* byte for byte the header this flow's data carries (no extensions, same flowIDs,
	 * so the same checksum), from the peer, to us */
	if (!same_header(sal, f->in_hdr) || ip->saddr != f->peer_addr ||
	    ip->daddr != f->local_addr)
		return count(C_PASS_MISMATCH, PASS);
	/* over UDP, from another port of the peer's address: a NAT rebound it, and
	 * Python validates the new path before the flow follows it */
	if (cfg->udp && outer->source != f->peer_port)
		return count(C_PASS_MISMATCH, PASS);
	seg_len = tot - IP_LEN - shrink;

	if (f->protocol == IPPROTO_UDP) {
		if (bpf_ntohs(uh->len) != seg_len)     /* Python drops it, counted */
			return count(C_PASS_MISMATCH, PASS);
		if (skb->gso_size)
			return count(C_PASS_GSO, PASS);
		seen(f, &f->packets_in, &f->bytes_in, seg_len);
		if (move_checksum(skb, l4_off, offsetof(struct udphdr, check), f->in_addr_diff,
				  f->in_port_diff, 1, legacy_ports(f)))
			return count(C_ERROR, TC_ACT_SHOT);
		return decap(skb, cfg, f, tot, shrink);
	}
	if ((void *)(th + 1) > end || seg_len < TCP_MIN)
		return count(C_PASS_MISMATCH, PASS);
	if (th->fin || th->rst)
		return hand_back(f);
	if (th->syn)
		return count(C_PASS_CONTROL, PASS);
	if (skb->gso_size)
		return count(C_PASS_GSO, PASS);
	seen(f, &f->packets_in, &f->bytes_in, seg_len);

	if (move_checksum(skb, l4_off, offsetof(struct tcphdr, check), f->in_addr_diff,
			  f->in_port_diff, 0, legacy_ports(f)))
		return count(C_ERROR, TC_ACT_SHOT);
	return decap(skb, cfg, f, tot, shrink);
}

SEC("tc")
int serval_ingress(struct __sk_buff *skb)
{
	__u32 zero = 0, tot, after_ip;
	struct config *cfg;
	struct udphdr *udp;
	struct iphdr *ip;
	void *data, *end;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return PASS;
	cfg = bpf_map_lookup_elem(&serval_config, &zero);
	if (!cfg || !cfg->mark)
		return PASS;
	if (ensure_linear(skb, ETH_HLEN + IP_LEN))
		return PASS;
	data = pkt_data(skb);
	end = pkt_end(skb);
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > end)
		return PASS;
	/* 20-byte headers only (adjust_room assumes it), no fragments */
	if (*(__u8 *)ip != 0x45 || ip->frag_off & bpf_htons(IP_MF_OFFSET))
		return PASS;
	tot = bpf_ntohs(ip->tot_len);
	if (tot < IP_LEN + UDP_LEN || skb->len < ETH_HLEN + tot)
		return PASS;
	/* only as much after the IPv4 header within reach as this kind of packet is read
	 * to: a TCP segment's head holds its headers and little more, and pulling payload
	 * forward would copy on every packet */
	switch (ip->protocol) {
	case IPPROTO_TCP:
		if (ensure_linear(skb, ETH_HLEN + IP_LEN + TCP_MIN))
			return PASS;
		return to_sal(skb, cfg, tot);
	case IPPROTO_SAL:
		if (cfg->udp || ensure_linear(skb, ETH_HLEN + IP_LEN + SAL_LEN + TCP_MIN))
			return PASS;
		return from_sal(skb, cfg, tot);
	case IPPROTO_UDP:
		break;
	default:
		return PASS;
	}
	after_ip = cfg->udp ? UDP_LEN + SAL_LEN + TCP_MIN : UDP_LEN;
	if (ensure_linear(skb, ETH_HLEN + IP_LEN + after_ip))
		return PASS;
	data = pkt_data(skb);
	end = pkt_end(skb);
	udp = data + ETH_HLEN + IP_LEN;
	if ((void *)(udp + 1) > end)
		return PASS;
	/* over the UDP carriage, what comes to our port is SAL; any other datagram may be
	 * a kernel UDP flow's */
	if (cfg->udp && udp->dest == cfg->udp_port)
		return from_sal(skb, cfg, tot);
	return udp_to_sal(skb, cfg, tot);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
