//! Builds ocelot's XDP program (`bpf/ocelot_xdp.c`) into `OUT_DIR/ocelot_xdp.o` with clang,
//! for `dataplane::sys::UplinkProgram` to embed with `include_bytes!`.
//!
//! Headers: `bpf/bpf_helpers.h` and `bpf/bpf_endian.h` come from the libbpf that libbpf-sys
//! vendors (its build exports the directory as `DEP_BPF_INCLUDE`, which is why dataplane
//! depends on libbpf-sys directly); `linux/*.h` from the system (`linux-libc-dev`), whose
//! `asm/` headers live in the multiarch directory that `-target bpf` does not search by
//! itself.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "bpf/ocelot_xdp.c";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("ocelot_xdp.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());

    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-target", "bpf", "-Wall"]);
    if let Some(dir) = std::env::var_os("DEP_BPF_INCLUDE") {
        cmd.arg("-I").arg(dir);
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = PathBuf::from(format!("/usr/include/{arch}-linux-gnu"));
    if multiarch.is_dir() {
        cmd.arg("-I").arg(multiarch);
    }
    cmd.arg("-c").arg(source).arg("-o").arg(&object);

    let status = match cmd.status() {
        Ok(status) => status,
        Err(e) => panic!(
            "cannot run `{clang}` to build the XDP program {source} ({e}): \
             install clang (scripts/setup.sh does)"
        ),
    };
    if !status.success() {
        panic!("`{cmd:?}` failed ({status}) building the XDP program {source}");
    }
}
