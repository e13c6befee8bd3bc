/* The maps shared by the tc programs and the gateway (gateway/fastpath/maps.py packs
 * the same layouts; change both together). All addresses and ports are in network
 * byte order, as on the wire. */
#ifndef SERVAL_FASTPATH_H
#define SERVAL_FASTPATH_H

#include <linux/types.h>

#define SERVAL_MAX_FLOWS 262144

/* flow.flags */
#define SERVAL_FLOW_SLOW 1u   /* a FIN or RST was seen: Python owns the flow now */

/* A legacy packet as it arrives: its source, destination, ports and transport (a TCP
 * and a UDP flow may share a 4-tuple). 16 bytes: the kernel rounds a key to 8 anyway. */
struct legacy_key {
	__be32 src, dst;
	__be16 sport, dport;
	__u8 protocol;                      /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad[3];
};

/* One established flow, under its own (local) flowID. */
struct flow {
	__be32 local_addr, peer_addr;       /* the SAL packets' IPv4 addresses */
	__be32 legacy_src, legacy_dst;      /* legacy_src is the legacy host */
	__be16 legacy_sport, legacy_dport;
	__be16 peer_port;                   /* UDP carriage: the peer's port */
	__u8 protocol;                      /* the legacy transport: IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad0;
	__u8 out_hdr[12];                   /* the SAL header toward the peer */
	__u8 in_hdr[12];                    /* the SAL header the peer's data carries */
	/* transport checksum changes (one's-complement sums in memory order): addresses
	 * are pseudo-header fields, ports are segment fields */
	__u32 out_addr_diff, out_port_diff, in_addr_diff, in_port_diff;
	__u32 flags;
	union {
		__be32 legacy_last_ack;     /* TCP: the legacy host's last ACK number */
		__u32 udp_max;              /* UDP: the longest datagram (UDP header and payload)
					     * that fits the path with our headers; longer ones go up */
	};
	__u64 packets_out, bytes_out;       /* legacy -> SAL, transport (TCP or UDP) bytes */
	__u64 packets_in, bytes_in;         /* SAL -> legacy */
	__u64 last_seen_ns;                 /* CLOCK_MONOTONIC */
};

struct config {
	__u32 mark;           /* what translated packets carry: the owned chains return them */
	__u8 udp;             /* carriage: 0 IP protocol 144, 1 UDP */
	__u8 redirect;        /* 1: hand translated packets to their next hop's interface */
	__be16 udp_port;      /* UDP carriage: our port */
};

/* counters (a per-CPU array, indexed by these) */
enum serval_counter {
	C_TO_SAL,             /* translated legacy -> SAL */
	C_FROM_SAL,           /* translated SAL -> legacy */
	C_PASS_GSO,           /* a super-packet: the slow path segments it */
	C_PASS_CONTROL,       /* SYN, FIN or RST on a kernel flow (FIN and RST turn it slow) */
	C_PASS_SLOW,          /* a flow the slow path owns */
	C_PASS_MISMATCH,      /* a kernel flow's packet with unexpected addresses or header */
	C_ERROR,              /* a helper failed: the packet is dropped */
	C_REDIRECTED,         /* translated and sent straight to the next hop (redirect on) */
	C_PASS_TOO_BIG,       /* a kernel UDP flow's datagram too big for the path: Python refuses it */
	C_MAX,
};

#endif
