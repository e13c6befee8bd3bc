/* The maps shared by the tc programs and the gateway (gateway/fastpath/maps.py packs
 * the same layouts; change both together). All addresses and ports are in network
 * byte order, as on the wire. */
#ifndef SERVAL_FASTPATH_H
#define SERVAL_FASTPATH_H

#include <linux/types.h>

#define SERVAL_MAX_FLOWS 262144

/* flow.flags */
#define SERVAL_FLOW_SLOW 1u   /* a FIN or RST was seen: Python owns the flow now */

/* A legacy packet as it arrives: its source, destination and ports. */
struct legacy_key {
	__be32 src, dst;
	__be16 sport, dport;
};

/* One established flow, under its own (local) flowID. */
struct flow {
	__be32 local_addr, peer_addr;       /* the SAL packets' IPv4 addresses */
	__be32 legacy_src, legacy_dst;      /* legacy_src is the legacy host */
	__be16 legacy_sport, legacy_dport;
	__be16 peer_port, pad0;             /* UDP carriage: the peer's port */
	__u8 out_hdr[12];                   /* the SAL header toward the peer */
	__u8 in_hdr[12];                    /* the SAL header the peer's data carries */
	/* TCP checksum changes (one's-complement sums in memory order): addresses are
	 * pseudo-header fields, ports are segment fields */
	__u32 out_addr_diff, out_port_diff, in_addr_diff, in_port_diff;
	__u32 flags;
	__be32 legacy_last_ack;             /* the legacy host's last ACK number */
	__u64 packets_out, bytes_out;       /* legacy -> SAL, TCP segment bytes */
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
	C_MAX,
};

#endif
