// SPDX-License-Identifier: Apache-2.0
//
// ocelot's XDP program for the node's uplink.
//
// It decides, for every frame the uplink receives, whether ocelot's userspace dataplane must
// handle it (redirect into the AF_XDP socket of the receiving queue) or the kernel should
// (XDP_PASS). Only one kind of frame is redirected: IPv4/IPv6, after at most one VLAN tag,
// whose destination address is a local pod (in `local_pods_v4` / `local_pods_v6`), on any
// port. Everything else goes to the kernel, so the node's own traffic
// (ARP, NDP, SSH, kubelet, BGP, DHCP, the API server) never depends on the dataplane being up:
// a missing socket for the queue, a frame the program cannot parse, an unknown EtherType all
// mean XDP_PASS.
//
// Maps (filled by `dataplane::sys::UplinkProgram`):
//   xsks            XSKMAP, rx queue index -> AF_XDP socket.
//   local_pods_v4   hash, IPv4 address (network order) -> 1.
//   local_pods_v6   hash, IPv6 address (16 bytes) -> 1.
//   failsafe        hash, {proto, dir, port (network order)} -> 1. dir 0: the frame's
//                   destination port is a host service ("in"); dir 1: its source port is
//                   (a reply to a connection the host opened, "out"). Checked for frames
//                   not addressed to a local pod (which always reach the kernel): the list
//                   names the host's must-work services and counts them separately, and
//                   the agent never lists a node address as a local pod, so those services
//                   never depend on the dataplane.
//   counters        per-CPU array, one u64 packet count per `enum counter`.
//
// Every access to packet memory is preceded by a comparison against `data_end`: the verifier
// rejects the program otherwise, and it is also what makes a truncated frame safe (it is
// passed to the kernel, which drops it with its own accounting).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmpv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// The kernel keeps the licence of programs it loads; no GPL-only helper is used here, so the
// project's own licence is declared.
char _license[] SEC("license") = "Apache-2.0";

// Counter indexes. Keep in sync with `UplinkCounters` in dataplane/src/sys.rs.
enum counter {
	CNT_REDIRECTED = 0,     // to a local pod, handed to the queue's AF_XDP socket
	CNT_PASS_NOT_POD = 1,   // IP, but the destination is not a local pod (node's own, ...)
	CNT_PASS_FAILSAFE = 2,  // a failsafe port: always the kernel's
	CNT_PASS_ARP_NDP = 3,   // ARP, or ICMPv6 neighbour discovery
	CNT_PASS_UNPARSED = 4,  // truncated or malformed headers
	CNT_PASS_OTHER = 5,     // neither IPv4, IPv6 nor ARP (LLDP, a second VLAN tag, ...)
	CNT_NO_SOCKET = 6,      // a local pod, but no socket on this rx queue: passed
	CNT_MAX = 7,
};

// Failsafe directions.
#define FS_IN 0
#define FS_OUT 1

struct failsafe_key {
	__u8 proto;  // IPPROTO_TCP or IPPROTO_UDP
	__u8 dir;    // FS_IN or FS_OUT
	__be16 port; // network byte order
};

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u8);
} local_pods_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct in6_addr);
	__type(value, __u8);
} local_pods_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct failsafe_key);
	__type(value, __u8);
} failsafe SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8
// IPv4 "more fragments" flag and fragment offset mask of frag_off (host order).
#define IP_OFFSET_MASK 0x1FFF

// The IPv6 extension headers walked to find TCP/UDP ports; bounded so the verifier can
// prove the loop ends.
#define MAX_IPV6_EXT 4

static __always_inline int count(__u32 which, int action)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &which);
	// The lookup cannot fail for an index below max_entries, but the verifier does not know
	// that: a NULL check is required before the dereference.
	if (value)
		*value += 1; // per-CPU: no other CPU writes this slot, no atomic needed
	return action;
}

// Whether a TCP/UDP header at `l4` (of protocol `proto`) names a failsafe port.
static __always_inline int is_failsafe(void *l4, void *data_end, __u8 proto)
{
	struct failsafe_key key = { .proto = proto };
	__be16 sport, dport;

	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		// Only the two port fields are read, but checking the whole fixed header keeps the
		// rule simple and costs nothing: a TCP segment shorter than 20 bytes is malformed.
		if ((void *)(tcp + 1) > data_end)
			return 0;
		sport = tcp->source;
		dport = tcp->dest;
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > data_end)
			return 0;
		sport = udp->source;
		dport = udp->dest;
	} else {
		return 0;
	}
	key.dir = FS_IN;
	key.port = dport;
	if (bpf_map_lookup_elem(&failsafe, &key))
		return 1;
	key.dir = FS_OUT;
	key.port = sport;
	if (bpf_map_lookup_elem(&failsafe, &key))
		return 1;
	return 0;
}

static __always_inline int to_pod(struct xdp_md *ctx)
{
	// With XDP_PASS in the flags' low bits, bpf_redirect_map returns XDP_PASS itself when the
	// queue has no socket: the frame reaches the kernel instead of being dropped.
	int action = bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
	if (action == XDP_REDIRECT)
		return count(CNT_REDIRECTED, action);
	return count(CNT_NO_SOCKET, XDP_PASS);
}

static __always_inline int handle_ipv4(struct xdp_md *ctx, void *l3, void *data_end)
{
	struct iphdr *ip = l3;
	// The fixed 20-byte header: version, IHL, protocol, addresses.
	if ((void *)(ip + 1) > data_end)
		return count(CNT_PASS_UNPARSED, XDP_PASS);
	if (ip->version != 4 || ip->ihl < 5)
		return count(CNT_PASS_UNPARSED, XDP_PASS);

	// A local pod's frames are the dataplane's, whatever their ports: pods serve on any
	// port, 22 included, and their policy is the dataplane's to enforce.
	__u32 daddr = ip->daddr;
	if (bpf_map_lookup_elem(&local_pods_v4, &daddr))
		return to_pod(ctx);

	// Ports exist only in an unfragmented datagram or its first fragment; a later fragment
	// cannot be matched against the failsafe list and goes by its address alone.
	if ((bpf_ntohs(ip->frag_off) & IP_OFFSET_MASK) == 0) {
		void *l4 = l3 + ip->ihl * 4;
		// Options make the header longer than the struct; the L4 header starts after them,
		// and `is_failsafe` checks it against data_end before reading.
		if (l4 > data_end)
			return count(CNT_PASS_UNPARSED, XDP_PASS);
		if (is_failsafe(l4, data_end, ip->protocol))
			return count(CNT_PASS_FAILSAFE, XDP_PASS);
	}
	return count(CNT_PASS_NOT_POD, XDP_PASS);
}

static __always_inline int is_ipv6_ext(__u8 nexthdr)
{
	return nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
	       nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_FRAGMENT;
}

static __always_inline int handle_ipv6(struct xdp_md *ctx, void *l3, void *data_end)
{
	struct ipv6hdr *ip6 = l3;
	// The fixed 40-byte header, which holds both addresses.
	if ((void *)(ip6 + 1) > data_end)
		return count(CNT_PASS_UNPARSED, XDP_PASS);
	if (ip6->version != 6)
		return count(CNT_PASS_UNPARSED, XDP_PASS);

	__u8 nexthdr = ip6->nexthdr;
	void *l4 = (void *)(ip6 + 1);
	int has_ports = 1;

#pragma unroll
	for (int i = 0; i < MAX_IPV6_EXT; i++) {
		if (!is_ipv6_ext(nexthdr))
			break;
		// Every extension header starts with (next header, length); read them only after
		// checking both bytes are in the frame.
		__u8 *ext = l4;
		if ((void *)(ext + 2) > data_end)
			return count(CNT_PASS_UNPARSED, XDP_PASS);
		if (nexthdr == IPPROTO_FRAGMENT) {
			// A fragment header is 8 bytes; a non-first fragment has no ports.
			struct frag_hdr {
				__u8 nexthdr;
				__u8 reserved;
				__be16 frag_off;
				__be32 id;
			} *frag = l4;
			if ((void *)(frag + 1) > data_end)
				return count(CNT_PASS_UNPARSED, XDP_PASS);
			if (bpf_ntohs(frag->frag_off) & ~0x7)
				has_ports = 0;
			nexthdr = frag->nexthdr;
			l4 = (void *)(frag + 1);
		} else {
			nexthdr = ext[0];
			l4 += (ext[1] + 1) * 8;
		}
	}
	if (is_ipv6_ext(nexthdr))
		has_ports = 0; // more extension headers than walked: treat as portless

	// Neighbour discovery (router/neighbour solicitation and advertisement, redirect) is
	// the kernel's, whatever the destination: it resolves the node's own addresses.
	if (nexthdr == IPPROTO_ICMPV6) {
		struct icmp6hdr *icmp6 = l4;
		if ((void *)(icmp6 + 1) > data_end)
			return count(CNT_PASS_UNPARSED, XDP_PASS);
		if (icmp6->icmp6_type >= 133 && icmp6->icmp6_type <= 137)
			return count(CNT_PASS_ARP_NDP, XDP_PASS);
	}

	struct in6_addr daddr = ip6->daddr;
	if (bpf_map_lookup_elem(&local_pods_v6, &daddr))
		return to_pod(ctx);

	if (has_ports) {
		if (l4 > data_end)
			return count(CNT_PASS_UNPARSED, XDP_PASS);
		if (is_failsafe(l4, data_end, nexthdr))
			return count(CNT_PASS_FAILSAFE, XDP_PASS);
	}
	return count(CNT_PASS_NOT_POD, XDP_PASS);
}

SEC("xdp")
int ocelot_uplink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	// The Ethernet header: without it there is no EtherType to go by.
	if ((void *)(eth + 1) > data_end)
		return count(CNT_PASS_UNPARSED, XDP_PASS);

	__be16 proto = eth->h_proto;
	void *l3 = (void *)(eth + 1);

	if (proto == bpf_htons(ETH_P_8021Q_) || proto == bpf_htons(ETH_P_8021AD_)) {
		// One VLAN tag: TCI (2 bytes) then the inner EtherType (2 bytes).
		__be16 *tag = l3;
		if ((void *)(tag + 2) > data_end)
			return count(CNT_PASS_UNPARSED, XDP_PASS);
		proto = tag[1];
		l3 = (void *)(tag + 2);
	}

	if (proto == bpf_htons(ETH_P_IP))
		return handle_ipv4(ctx, l3, data_end);
	if (proto == bpf_htons(ETH_P_IPV6))
		return handle_ipv6(ctx, l3, data_end);
	if (proto == bpf_htons(ETH_P_ARP))
		return count(CNT_PASS_ARP_NDP, XDP_PASS);
	return count(CNT_PASS_OTHER, XDP_PASS);
}
