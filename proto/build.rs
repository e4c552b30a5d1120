//! Generates the discovery and identity APIs with a pure-Rust protobuf compiler
//! (no protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        ["trellis/v1/discovery.proto", "trellis/v1/identity.proto"],
        ["proto"],
    )?;
    // A resource's JSON is `Bytes`: the control plane encodes each resource once
    // and shares it between every stream that sends it.
    tonic_prost_build::configure()
        .bytes(".trellis.v1.Resource.json")
        .compile_fds(descriptors)?;
    Ok(())
}
