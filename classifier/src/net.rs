//! Address prefixes (CIDRs) shared by policy ipBlocks and the routing table.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IPv4 or IPv6 prefix. The address is stored with its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

/// A CIDR string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {input:?}: {why}")]
pub struct CidrError {
    /// The text that was given.
    pub input: String,
    /// What is wrong with it.
    pub why: &'static str,
}

// `len` is a prefix length, not the size of a collection; an `is_empty` would mean nothing.
#[allow(clippy::len_without_is_empty)]
impl Cidr {
    /// Builds a prefix, clearing host bits. Fails if `len` exceeds the family's width.
    pub fn new(addr: IpAddr, len: u8) -> Result<Cidr, CidrError> {
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if len > max {
            return Err(CidrError {
                input: format!("{addr}/{len}"),
                why: "prefix length exceeds the address width",
            });
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask4(len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask6(len))),
        };
        Ok(Cidr { addr, len })
    }

    /// A host route: the address with a full-length prefix.
    pub fn host(addr: IpAddr) -> Cidr {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, len }
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// True for the zero-length prefix of either family.
    pub fn is_default(&self) -> bool {
        self.len == 0
    }

    /// Whether `ip` lies inside this prefix. Addresses of the other family never do.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => u32::from(ip) & mask4(self.len) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask6(self.len) == u128::from(net)
            }
            _ => false,
        }
    }

    /// Whether every address of `other` lies inside this prefix.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }
}

/// Netmask of an IPv4 prefix length (0..=32).
pub const fn mask4(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len as u32)
    }
}

/// Netmask of an IPv6 prefix length (0..=128).
pub const fn mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - len as u32)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `a.b.c.d/n` or `x::y/n`; a bare address is a host prefix.
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let err = |why| CidrError {
            input: s.to_owned(),
            why,
        };
        match s.split_once('/') {
            Some((addr, len)) => {
                let addr: IpAddr = addr.trim().parse().map_err(|_| err("bad address"))?;
                let len: u8 = len.trim().parse().map_err(|_| err("bad prefix length"))?;
                Cidr::new(addr, len).map_err(|e| err(e.why))
            }
            None => Ok(Cidr::host(
                s.trim().parse().map_err(|_| err("bad address"))?,
            )),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_clears_host_bits_and_checks_length() {
        assert_eq!(c("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(c("10.1.2.3").to_string(), "10.1.2.3/32");
        assert_eq!(c("fd00::1/64").to_string(), "fd00::/64");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert!("10.0.0/8".parse::<Cidr>().is_err());
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
    }

    #[test]
    fn contains_and_covers() {
        let check = |net: &str, ip: &str, expected: bool| {
            assert_eq!(
                c(net).contains(ip.parse().unwrap()),
                expected,
                "{net} ∋ {ip}"
            );
        };
        check("10.0.0.0/8", "10.255.0.1", true);
        check("10.0.0.0/8", "11.0.0.1", false);
        check("0.0.0.0/0", "1.2.3.4", true);
        check("0.0.0.0/0", "::1", false);
        check("::/0", "::1", true);
        check("fd00::/64", "fd00::ffff", true);
        check("fd00::/64", "fd01::1", false);
        assert!(c("10.0.0.0/8").covers(&c("10.1.0.0/16")));
        assert!(!c("10.1.0.0/16").covers(&c("10.0.0.0/8")));
    }
}
