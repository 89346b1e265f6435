//! What the command-line tests share: running `ddim`, the tiny model, temporary folders that
//! remove themselves, and waiting for and interrupting a running command.

use std::path::Path;
use std::process::{Command, Output};

pub fn ddim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddim"))
        .args(args)
        .output()
        .expect("running ddim")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn tiny_model() -> &'static str {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ddim/tests/fixtures/pipeline/tiny-ddpm"
    )
}

/// A temporary folder for one test, removed when it goes out of scope (pass or fail).
pub struct TestDir(tempfile::TempDir);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

/// A fresh temporary folder named after the test.
pub fn tmp(name: &str) -> TestDir {
    TestDir(
        tempfile::Builder::new()
            .prefix(&format!("ddim-cli-{name}-"))
            .tempdir()
            .unwrap(),
    )
}

/// The sorted names of the files in `dir`, hidden files included, less the run record that
/// every output folder holds.
pub fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "ddim-run.json")
        .collect();
    names.sort();
    names
}

pub fn count_pngs(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".png"))
            })
            .count()
    })
}

/// Starts `cmd` and waits until `ready()` holds, the child has exited, or `secs` have passed;
/// returns the running (or finished) child.
pub fn spawn_until(
    cmd: &mut Command,
    stderr: std::process::Stdio,
    secs: u64,
    ready: impl Fn() -> bool,
) -> std::process::Child {
    let mut child = cmd.stderr(stderr).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !ready() && child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child
}

/// Sends SIGINT (what Ctrl-C sends) to `child` and collects its output.
#[cfg(unix)]
pub fn interrupt(child: std::process::Child) -> Output {
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    child.wait_with_output().unwrap()
}
