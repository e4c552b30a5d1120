//! Links the proxy with packed relative relocations (DT_RELR, glibc 2.36+): the
//! loader reads a few KiB of relocations at start where it read 570 KiB, which
//! then stayed resident in every sidecar.

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
