//! Interface names derived from pods.
//!
//! The host side of a pod's veth is named the way Calico names it, so a node's interfaces can
//! be matched to pods without any state: `cali` followed by the first 11 hex digits of the
//! SHA-1 of `<namespace>.<pod name>`. That is 15 characters, the most a Linux interface name
//! may have (`IFNAMSIZ` − 1). The CNI side (or `ocelot lab`) creates the veth with this name;
//! the agent attaches to the interface of that name when the pod is in its datastore.
//!
//! The prefix can be changed (Calico's `InterfacePrefix`); it must leave room for the 11 hex
//! digits, so it may have at most 4 characters.

use sha1::{Digest, Sha1};

/// Calico's default interface prefix.
pub const DEFAULT_PREFIX: &str = "cali";

/// Hex digits of the digest kept in the name.
const HASH_DIGITS: usize = 11;

/// The host-side veth name of pod `namespace/name` with the default prefix.
pub fn veth_name(namespace: &str, name: &str) -> String {
    veth_name_with_prefix(DEFAULT_PREFIX, namespace, name)
}

/// The host-side veth name with another prefix. A prefix longer than 4 characters is cut to
/// 4, so the result is always a valid interface name.
pub fn veth_name_with_prefix(prefix: &str, namespace: &str, name: &str) -> String {
    let digest = Sha1::digest(format!("{namespace}.{name}").as_bytes());
    let mut out: String = prefix.chars().take(15 - HASH_DIGITS).collect();
    for byte in digest.iter() {
        out.push_str(&format!("{byte:02x}"));
    }
    out.truncate(out.len() - (digest.len() * 2 - HASH_DIGITS));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_table() {
        fn check(namespace: &str, name: &str, expected: &str) {
            let got = veth_name(namespace, name);
            assert_eq!(got, expected, "{namespace}/{name}");
            assert!(got.len() <= 15);
        }
        // `printf default.nginx | sha1sum` = c440f455693b69cdd48a37aa5ecd78038f50413d.
        check("default", "nginx", "calic440f455693");
        check("x", "a", &format!("cali{}", &sha1_hex("x.a")[..11]));
    }

    /// `sha1sum` of a string, via the system tool, so the test checks against an
    /// implementation other than the one under test.
    fn sha1_hex(text: &str) -> String {
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("printf %s '{text}' | sha1sum")])
            .output()
            .expect("sha1sum runs");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn distinct_pods_get_distinct_names_and_prefix_is_bounded() {
        assert_ne!(veth_name("x", "a"), veth_name("x", "b"));
        let long = veth_name_with_prefix("verylongprefix", "x", "a");
        assert_eq!(long.len(), 15);
        assert!(long.starts_with("very"));
    }
}
