//! Every end-to-end test, as modules of one test binary: compiled and linked once
//! instead of once per file (15 s instead of 43 s, benches/RESULTS.md). Run one
//! file's tests with `cargo test -p trellis-tests --test all <file>::`.

mod admin;
mod chart;
mod commands;
mod control_plane;
mod discovery_auth;
mod drain;
mod fuzz_regressions;
mod generated;
mod hostile;
mod hostile_h2;
mod house;
mod identity;
mod init;
mod kube_identity;
mod kube_inject;
mod kube_injected_pod;
mod kube_lease;
mod kubectl;
mod kubernetes;
mod mesh;
mod mtls;
mod mtls_wire;
mod opaque;
mod policy;
mod rotation;
mod state;
mod traffic;
mod wait;
mod watch_failures;
