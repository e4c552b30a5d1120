//! Generates the discovery and identity APIs with a pure-Rust protobuf compiler
//! (no protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        ["trellis/v1/discovery.proto", "trellis/v1/identity.proto"],
        ["proto"],
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
