//! Links the proxy with packed relative relocations (DT_RELR, glibc 2.36+): the
//! loader reads a few KiB of relocations at start where it read 570 KiB, which
//! then stayed resident in every sidecar.
//!
//! A release build (the sidecar profile too) on x86_64 Linux, which rustc links
//! with lld, also lays out the functions `symbol-order.txt` names first and in its
//! order (`benches/symbol-order` writes it): the code a sidecar runs then fills a
//! few hundred contiguous pages instead of touching most of the binary.

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=symbol-order.txt");
    let var = |name| std::env::var(name).unwrap_or_default();
    if var("TARGET") == "x86_64-unknown-linux-gnu"
        && var("PROFILE") == "release"
        && links_with_lld()
    {
        let order = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("symbol-order.txt");
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        // A function renamed or gone since the list was written is laid out with the rest.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

/// rustc links x86_64 Linux binaries with its own lld from 1.90 on; GNU ld, which
/// older ones use, has no symbol-ordering option.
fn links_with_lld() -> bool {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(output) = std::process::Command::new(rustc).arg("--version").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&output.stdout);
    let mut numbers = version
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (1, 90)
}
