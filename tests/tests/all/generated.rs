//! The protobuf code is generated ahead of time and committed, so that building the
//! proxy or the control plane compiles no protobuf compiler. This test generates it
//! again from the `.proto` files, with the same pure-Rust compiler (no protoc), and
//! fails when the committed code differs. It then writes the fresh code in place,
//! so that committing it is all a changed `.proto` file needs.

use std::path::Path;

/// Generates the code for `files` (under `<krate>/proto`) into a fresh directory,
/// and checks that the file it writes, `generated`, matches the one committed in
/// `<krate>/src/gen`.
fn check(
    krate: &str,
    files: &[&str],
    generated: &str,
    configure: fn(tonic_prost_build::Builder) -> tonic_prost_build::Builder,
) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(krate);
    let dir = root.join("proto");
    let descriptors = protox::compile(files, [&dir])
        .unwrap_or_else(|e| panic!("cannot compile {files:?} in {}: {e}", dir.display()));
    let out = trellis_tests::TempDir::new("generated");
    configure(tonic_prost_build::configure())
        .out_dir(&out.0)
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("cannot generate code for {files:?}: {e}"));
    let fresh = std::fs::read_to_string(out.0.join(generated)).unwrap();
    let committed = root.join("src/gen").join(generated);
    let old = std::fs::read_to_string(&committed).unwrap_or_default();
    if fresh != old {
        std::fs::write(&committed, &fresh).unwrap();
        panic!(
            "{} did not match {files:?} in {}; it has been regenerated: commit it",
            committed.display(),
            dir.display()
        );
    }
}

#[test]
fn discovery_api_code_matches_its_proto_files() {
    check(
        "proto",
        &["trellis/v1/discovery.proto", "trellis/v1/identity.proto"],
        "trellis.v1.rs",
        // A resource's JSON is `Bytes`: the control plane encodes each resource
        // once and shares it between every stream that sends it.
        |builder| builder.bytes(".trellis.v1.Resource.json"),
    );
}

#[test]
fn test_service_code_matches_its_proto_file() {
    check("tests", &["echo.proto"], "trellis.test.rs", |builder| {
        builder
    });
}
