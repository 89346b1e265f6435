//! Where run records live and what a rerun does with them. A sample or eval folder holds
//! `ddim-run.json`, written atomically before the first image; a single output file (an `invert`
//! tensor, an `interpolate` GIF, a `--grid`) has `FILE.ddim-run.json` beside it, written after
//! the file. A later run compares its own record ([`ddim::run_record::RunRecord`]) with it: the
//! same settings resume (or find nothing to do), other settings are refused with every difference
//! named, so no output ever mixes or hides the images of other settings without the user asking
//! for it (`--overwrite`).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
pub use ddim::run_record::RunRecord;
use sha2::{Digest, Sha256};

use crate::UsageError;

/// The record's file name in an output folder.
pub const RECORD_NAME: &str = "ddim-run.json";

/// What [`claim_folder`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// A new folder, or one without images of ours: the record was written.
    Fresh,
    /// The folder's record equals this run's: go on from what is there.
    Same,
}

/// Makes `dir` this run's folder, before anything is written to it: creates it and writes the
/// record when it is new or holds no images of ours (`is_ours` tells them by name); accepts it
/// when its record equals `record`. Otherwise it refuses (exit 2) and touches nothing: the
/// message names every setting that differs with both values, or says that the images were
/// made before ddim kept records. With `overwrite` it removes the folder's images (the files
/// `remove` accepts) and writes this run's record, whatever was there: the folder starts afresh.
pub fn claim_folder(
    dir: &Path,
    record: &RunRecord,
    overwrite: bool,
    is_ours: &dyn Fn(&str) -> bool,
    remove: &dyn Fn(&str) -> bool,
) -> Result<Claim> {
    let path = dir.join(RECORD_NAME);
    if overwrite {
        if dir.is_dir() {
            for file in list_files(dir, remove)? {
                std::fs::remove_file(&file)
                    .with_context(|| format!("removing {} (--overwrite)", file.display()))?;
            }
        }
        ddim::image_io::ensure_writable_dir(dir)?;
        write_record(&path, record)?;
        return Ok(Claim::Fresh);
    }
    let existing = read_record(&path)?;
    let ours = if dir.is_dir() {
        list_files(dir, is_ours)?
    } else {
        Vec::new()
    };
    let problem = match &existing {
        Some(old) if old.differences(record).is_empty() => return Ok(Claim::Same),
        Some(old) => format!(
            "{} holds images made with other settings ({} records them):\n  {}\n",
            dir.display(),
            path.display(),
            old.differences(record)
                .iter()
                .map(|d| d.describe("in the folder"))
                .collect::<Vec<_>>()
                .join("\n  ")
        ),
        None if ours.is_empty() => {
            ddim::image_io::ensure_writable_dir(dir)?;
            write_record(&path, record)?;
            return Ok(Claim::Fresh);
        }
        None => format!(
            "{} holds {} image(s) of ddim (e.g. {}) but no {RECORD_NAME}: they were made before \
             ddim recorded the settings of a run, so whether they match this run's is unknown.\n",
            dir.display(),
            ours.len(),
            ours[0].display()
        ),
    };
    Err(UsageError(format!(
        "{problem}Nothing was changed. Pass --overwrite to replace the folder's images with this \
         run's, or write to another folder."
    ))
    .into())
}

/// The record beside a single output file: `FILE.ddim-run.json`.
pub fn record_path_of(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(RECORD_NAME);
    file.with_file_name(name)
}

/// Whether each of a run's output files is to be made (`false`) or exists already with a record
/// equal to `record` (`true`: this run would write the same file). Checks only: nothing is
/// written. A file that exists with a record of other settings, or with none, is refused (exit
/// 2) unless `overwrite`, and the message names every such file and every setting that differs
/// with both values.
pub fn check_files(files: &[&Path], record: &RunRecord, overwrite: bool) -> Result<Vec<bool>> {
    let mut done = Vec::new();
    let mut problems = Vec::new();
    for &file in files {
        if overwrite || !file.exists() {
            done.push(false);
            continue;
        }
        let path = record_path_of(file);
        match read_record(&path)? {
            Some(old) => {
                let differences = old.differences(record);
                if differences.is_empty() {
                    done.push(true);
                    continue;
                }
                problems.push(format!(
                    "{} exists and was made with other settings ({} records them):\n  {}",
                    file.display(),
                    path.display(),
                    differences
                        .iter()
                        .map(|d| d.describe("in the file"))
                        .collect::<Vec<_>>()
                        .join("\n  ")
                ));
            }
            None => problems.push(format!(
                "{} exists and has no {}: it was not made by a run of ddim that recorded its \
                 settings, so whether it matches this run's is unknown",
                file.display(),
                path.display()
            )),
        }
        done.push(false);
    }
    if problems.is_empty() {
        return Ok(done);
    }
    Err(UsageError(format!(
        "{}\nNothing was changed. Pass --overwrite to replace {}, or write to another file.",
        problems.join("\n"),
        if problems.len() == 1 { "it" } else { "them" }
    ))
    .into())
}

/// Writes an output file and then its record: the old record goes first, so that a run stopped
/// part way leaves a file without a record (which a rerun refuses), never a record that
/// vouches for a file of other settings. `write` must write `file` atomically.
pub fn write_file_with_record(
    file: &Path,
    record: &RunRecord,
    write: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let path = record_path_of(file);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ddim::Error::io(&path, e).into()),
    }
    write()?;
    write_record(&path, record)
}

/// Says that every output exists with this run's settings already (exit 0, nothing written).
pub fn report_nothing_to_do(files: &[&Path]) {
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    eprintln!(
        "{} exist{} already, made with the same settings (see {}): nothing to do (--overwrite \
         makes {} again)",
        names.join(", "),
        if files.len() == 1 { "s" } else { "" },
        files
            .iter()
            .map(|f| record_path_of(f).display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        if files.len() == 1 { "it" } else { "them" }
    );
}

/// The record in `path`, if there is one; a record that cannot be read is an error that says so.
pub fn read_record(path: &Path) -> Result<Option<RunRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ddim::Error::io(path, e).into()),
    };
    let value = ddim::json::parse(&text).map_err(|source| ddim::Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    RunRecord::from_json(&value).map(Some).map_err(|why| {
        UsageError(format!(
            "{}: not a run record of this ddim ({why}); move it away or pass --overwrite",
            path.display()
        ))
        .into()
    })
}

/// Writes the record atomically.
pub fn write_record(path: &Path, record: &RunRecord) -> Result<()> {
    let text = serde_json::to_string_pretty(&record.to_json())? + "\n";
    ddim::atomic::write_atomically(path, |w| w.write_all(text.as_bytes()))?;
    Ok(())
}

/// The files directly in `dir` whose names `keep` accepts, sorted.
fn list_files(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| ddim::Error::io(dir, e))? {
        let entry = entry.map_err(|e| ddim::Error::io(dir, e))?;
        let name = entry.file_name();
        if entry.file_type().is_ok_and(|t| t.is_file()) && name.to_str().is_some_and(keep) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// A hex SHA-256 over byte strings, each prefixed by its length (so that no two lists of parts
/// hash alike).
pub fn sha256_hex<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// [`sha256_hex`] of the files' contents, read in pieces.
pub fn sha256_files(paths: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for path in paths {
        let mut file = std::fs::File::open(path).map_err(|e| ddim::Error::io(path, e))?;
        let len = file.metadata().map_err(|e| ddim::Error::io(path, e))?.len();
        h.update(len.to_le_bytes());
        let copied = std::io::copy(&mut file, &mut h).map_err(|e| ddim::Error::io(path, e))?;
        if copied != len {
            return Err(UsageError(format!("{} changed while it was read", path.display())).into());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_separates_parts_and_files_hash_as_bytes() {
        assert_ne!(
            sha256_hex([&b"ab"[..], b"c"]),
            sha256_hex([&b"a"[..], b"bc"])
        );
        assert_eq!(sha256_hex([&b"x"[..]]).len(), 64);
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"ab").unwrap();
        std::fs::write(&b, b"c").unwrap();
        assert_eq!(
            sha256_files(&[a, b]).unwrap(),
            sha256_hex([&b"ab"[..], b"c"])
        );
    }
}
