// SPDX-License-Identifier: (MIT OR GPL-2.0)
/* A damaged path for tests (this kernel has no netem): tc egress on a middle router.
 *
 * Each IPv4 packet leaving the interface is, at the rates in impair_config (fractions
 * of 2^32, drawn independently), dropped, duplicated (a clone sent first), or corrupted:
 * one random bit flipped somewhere after the IP header, or, for a share of the
 * corrupted packets that carry a TCP header (plain, or after a SAL header over IP
 * protocol 144 or UDP 54324/54325), the configured TCP flags (RST) set instead. The
 * checksums are left as they are, as on a real damaged link: the receiver's
 * transport checksum is what can tell.
 *
 * The senders must put complete checksums on the wire (wire-like hosts, the gateways):
 * a veth carries a partial checksum unfilled, and the receiver would trust a flipped
 * packet. Super-packets (GSO) are never corrupted for the same reason (their checksums
 * are filled in when they are cut), only counted.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define IPPROTO_SAL 144
#define SAL_UDP_CLIENT 54324
#define SAL_UDP_SERVER 54325
#define DUP_MARK 0x5e1a7e0d      /* our own clone coming round again: let it go */

struct impair_config {
	__u32 drop;          /* probabilities as fractions of 2^32 */
	__u32 duplicate;
	__u32 corrupt;
	__u32 flag_share;    /* of the corrupted TCP packets: set ``flags`` instead of a flip */
	__u32 flags;         /* TCP flag bits to set (0x04 RST) */
};

struct impair_counters {
	__u64 seen;
	__u64 dropped;
	__u64 duplicated;
	__u64 corrupted;     /* bit flips, and flagged packets below */
	__u64 flagged;       /* ... of which the TCP flags were set */
	__u64 skipped_gso;   /* drawn for corruption, but a super-packet */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct impair_config);
} impair_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct impair_counters);
} impair_counters SEC(".maps");

static __always_inline int chance(__u32 rate)
{
	return rate && bpf_get_prandom_u32() < rate;
}

/* Offset of the TCP header of a plain or SAL-carried TCP packet, or -1. */
static __always_inline int tcp_offset(struct __sk_buff *skb, struct iphdr *ip, __u32 l4)
{
	__u8 sal[10];
	__u16 ports[2];

	if (ip->protocol == IPPROTO_TCP)
		return l4;
	if (ip->protocol == IPPROTO_UDP) {
		if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)))
			return -1;
		if (ports[0] != bpf_htons(SAL_UDP_CLIENT) && ports[0] != bpf_htons(SAL_UDP_SERVER)
		    && ports[1] != bpf_htons(SAL_UDP_CLIENT) && ports[1] != bpf_htons(SAL_UDP_SERVER))
			return -1;
		l4 += 8;
	} else if (ip->protocol != IPPROTO_SAL) {
		return -1;
	}
	if (bpf_skb_load_bytes(skb, l4, sal, sizeof(sal)) || sal[9] != IPPROTO_TCP)
		return -1;
	return l4 + sal[8] * 4;
}

static __always_inline void corrupt(struct __sk_buff *skb, struct impair_config *cfg,
				    struct impair_counters *cnt, struct iphdr *ip, __u32 l4)
{
	__u8 byte;
	int tcp;
	__u32 off;

	if (skb->gso_segs > 1) {
		__sync_fetch_and_add(&cnt->skipped_gso, 1);
		return;
	}
	tcp = tcp_offset(skb, ip, l4);
	if (tcp > 0 && tcp + 20 <= skb->len && chance(cfg->flag_share)) {
		off = tcp + 13;
		if (bpf_skb_load_bytes(skb, off, &byte, 1) == 0 && (byte | cfg->flags) != byte) {
			byte |= cfg->flags;
			if (bpf_skb_store_bytes(skb, off, &byte, 1, 0) == 0) {
				__sync_fetch_and_add(&cnt->flagged, 1);
				__sync_fetch_and_add(&cnt->corrupted, 1);
			}
			return;
		}
	}
	if (skb->len <= l4)
		return;
	off = l4 + bpf_get_prandom_u32() % (skb->len - l4);
	if (bpf_skb_load_bytes(skb, off, &byte, 1))
		return;
	byte ^= 1 << (bpf_get_prandom_u32() & 7);
	if (bpf_skb_store_bytes(skb, off, &byte, 1, 0) == 0)
		__sync_fetch_and_add(&cnt->corrupted, 1);
}

SEC("tc")
int impair(struct __sk_buff *skb)
{
	__u32 key = 0, l4;
	struct impair_config *cfg = bpf_map_lookup_elem(&impair_config, &key);
	struct impair_counters *cnt = bpf_map_lookup_elem(&impair_counters, &key);
	struct iphdr ip;

	if (!cfg || !cnt)
		return TC_ACT_OK;
	if (skb->mark == DUP_MARK) {
		skb->mark = 0;
		return TC_ACT_OK;
	}
	if (skb->protocol != bpf_htons(ETH_P_IP)
	    || bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.ihl < 5)
		return TC_ACT_OK;
	__sync_fetch_and_add(&cnt->seen, 1);
	if (chance(cfg->drop)) {
		__sync_fetch_and_add(&cnt->dropped, 1);
		return TC_ACT_SHOT;
	}
	l4 = ETH_HLEN + ip.ihl * 4;
	if (chance(cfg->corrupt))
		corrupt(skb, cfg, cnt, &ip, l4);
	if (chance(cfg->duplicate)) {
		__u32 mark = skb->mark;

		skb->mark = DUP_MARK;
		if (bpf_clone_redirect(skb, skb->ifindex, 0) == 0)
			__sync_fetch_and_add(&cnt->duplicated, 1);
		skb->mark = mark;
	}
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
