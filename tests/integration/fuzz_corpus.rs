//! T11 in CI: every input of the saved fuzz corpus (`fuzz/corpus/<target>/`, grown and
//! minimized by `fuzz/run.sh` on nightly) is run through its target's body on stable. A
//! finding, once fixed, is kept there as a regression input.

#[path = "../../fuzz/harness.rs"]
mod harness;

#[test]
fn fuzz_corpus_replays_without_a_finding() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, run) in harness::TARGETS {
        let dir = root.join(target);
        let inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("corpus entry").path())
            .collect();
        assert!(!inputs.is_empty(), "{target}: empty corpus");
        for input in &inputs {
            let data = std::fs::read(input).expect("corpus input");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} fails", input.display());
        }
        println!("{target}: {} inputs replayed", inputs.len());
    }
}
