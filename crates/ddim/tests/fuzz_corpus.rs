//! Replays the fuzzers' inputs (`fuzz/seeds`, the minimised corpus `fuzz/corpus`, and every
//! input that once crashed, `fuzz/regressions`) through the same entry points the cargo-fuzz
//! targets call, on stable Rust: none may panic.

use std::path::{Path, PathBuf};

/// A target's name and its entry point.
type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 6] = [
    ("scheduler_config", ddim::fuzzing::scheduler_config),
    ("unet_config", ddim::fuzzing::unet_config),
    ("safetensors", ddim::fuzzing::safetensors),
    ("pickle", ddim::fuzzing::pickle),
    ("npy", ddim::fuzzing::npy),
    ("json", ddim::fuzzing::json),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_fuzz_input_returns_without_panicking() {
    let mut total = 0;
    for (target, run) in TARGETS {
        let mut count = 0;
        for kind in ["seeds", "corpus", "regressions"] {
            for path in inputs(&fuzz_dir().join(kind).join(target)) {
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| run(&data));
                assert!(outcome.is_ok(), "{target} panicked on {}", path.display());
                count += 1;
            }
        }
        assert!(count > 0, "no inputs for the {target} target");
        total += count;
    }
    eprintln!("replayed {total} fuzz inputs");
}
