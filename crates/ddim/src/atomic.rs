//! Writing a file so that no reader, crash or full disk ever sees half of it: the bytes go to
//! a hidden temporary file beside the target, which is flushed, fsynced and renamed over it.
//! Every file ddim writes (images, tensors, weights, configs, run records) goes through here.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::{Error, Result};

/// The end of the name of [`write_atomically`]'s temporary files.
const TEMP_SUFFIX: &str = ".tmp";
/// The number of random characters in the name of [`write_atomically`]'s temporary files.
const TEMP_RAND_CHARS: usize = 6;

/// The start of the name of the temporary file through which [`write_atomically`] writes the
/// file `name`: `.{name}.`, then [`TEMP_RAND_CHARS`] random letters and digits and
/// [`TEMP_SUFFIX`], e.g. `.sample_s0_000012.png.a1B2c3.tmp` (hidden, and not a `.png`).
fn temp_prefix(name: &std::ffi::OsStr) -> std::ffi::OsString {
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    prefix
}

/// The name of the file that a temporary file named `temp_name` of [`write_atomically`] was
/// for, or `None` when `temp_name` is not such a name. A process killed during a write (SIGKILL,
/// power loss) leaves its temporary file behind; this is how it is recognised.
pub fn atomic_write_target(temp_name: &str) -> Option<&str> {
    let rest = temp_name.strip_prefix('.')?.strip_suffix(TEMP_SUFFIX)?;
    let (target, random) = rest.rsplit_once('.')?;
    let random_ok =
        random.len() == TEMP_RAND_CHARS && random.bytes().all(|b| b.is_ascii_alphanumeric());
    (random_ok && !target.is_empty()).then_some(target)
}

/// Writes a file atomically: `write` fills a temporary file in `path`'s directory, which is
/// flushed, fsynced and renamed over `path`. On any error the temporary file is removed and an
/// existing file at `path` is left as it was. A missing parent directory is created.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::argument("path", path.display(), "a path that names a file"))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let prefix = temp_prefix(name);
    let mut builder = tempfile::Builder::new();
    builder
        .prefix(&prefix)
        .suffix(TEMP_SUFFIX)
        .rand_bytes(TEMP_RAND_CHARS);
    // tempfile creates files readable by the owner only; ask for what `File::create` gives
    // (0o666 less the umask) so the renamed file has ordinary permissions.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    {
        let mut w = BufWriter::new(tmp.as_file());
        write(&mut w).map_err(|e| Error::io(path, e))?;
        w.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    // Make the rename itself durable; not every platform can fsync a directory, so this is best effort.
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_files_of_atomic_writes_name_their_target() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = tempfile::Builder::new()
            .prefix(&temp_prefix("sample_s0_000012.png".as_ref()))
            .suffix(TEMP_SUFFIX)
            .rand_bytes(TEMP_RAND_CHARS)
            .tempfile_in(dir.path())
            .unwrap();
        let name = tmp
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(atomic_write_target(&name), Some("sample_s0_000012.png"));
        assert_eq!(atomic_write_target(".x.png.abc.tmp"), None);
        assert_eq!(atomic_write_target("x.png.abcdef.tmp"), None);
        assert_eq!(atomic_write_target(".x.png.abcdef"), None);
        assert_eq!(atomic_write_target("..abcdef.tmp"), None);
    }

    #[test]
    fn failed_atomic_write_keeps_old_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        std::fs::write(&path, b"old").unwrap();
        // A writer that fails half way, like a full disk.
        let r = write_atomically(&path, |w| {
            w.write_all(b"new partial")?;
            Err(std::io::Error::other("disk full"))
        });
        let e = r.unwrap_err().to_string();
        assert!(e.contains("disk full") && e.contains("x.npy"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.npy")]);

        // The target is a directory: the rename fails and the directory is untouched.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("keep"), b"k").unwrap();
        assert!(write_atomically(&sub, |w| w.write_all(b"x")).is_err());
        assert_eq!(std::fs::read(sub.join("keep")).unwrap(), b"k");
    }
}
