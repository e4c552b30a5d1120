//! Every input kept in `fuzz/regressions/<target>/` (seeds, and each crash a fuzz
//! run found) through its fuzz target's body: none may panic. CI runs these; the
//! fuzzers themselves run from `benches/fuzz`.

use std::path::Path;
use trellis_tests::fuzz::TARGETS;

#[test]
fn every_kept_fuzz_input_runs_without_a_panic() {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/regressions"));
    for (name, target) in TARGETS {
        let dir = root.join(name);
        let inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|entry| entry.path())
            .collect();
        assert!(!inputs.is_empty(), "{name}: no inputs kept");
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name} panicked on {}", input.display());
        }
    }
}
