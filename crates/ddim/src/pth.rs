//! A check of PyTorch `.bin` files (zip archives holding a pickle) before candle reads them.
//!
//! candle's pickle reader never executes anything, but it builds whatever object tree the pickle
//! describes: a pickle that copies a memoised object into itself again and again asks for memory
//! that doubles with every copy, and a string may claim up to 4 GiB. This module walks every
//! `data.pkl` of the archive with a stack of sizes instead of objects, and refuses, before any
//! object is built:
//! - a global other than the few a saved state dict uses (`torch._utils._rebuild_tensor_v2`,
//!   `torch.*Storage`, `collections.OrderedDict`, ...), naming it, so `os.system` and friends
//!   are refused, never called;
//! - more than [`MAX_OBJECTS`] objects in all (counting every copy of a memoised object);
//! - a string or number longer than what is left of the pickle, opcodes candle does not know,
//!   a pickle longer than [`MAX_PICKLE_BYTES`], and malformed stacks.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::{Error, Result};

/// Objects a pickle may build in all, copies included. A state dict of a 100 M-parameter UNet
/// builds a few thousand.
pub const MAX_OBJECTS: u64 = 1 << 22;

/// The longest `data.pkl` read (the tensors themselves live in other archive entries).
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// The globals a saved state dict refers to; anything else is refused.
fn allowed_global(module: &str, name: &str) -> bool {
    match module {
        "collections" => name == "OrderedDict",
        "torch._utils" => matches!(
            name,
            "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_parameter"
        ),
        "torch" => {
            name.ends_with("Storage")
                && name.len() <= 32
                && name.bytes().all(|b| b.is_ascii_alphanumeric())
        }
        _ => false,
    }
}

/// Checks every `data.pkl` in the zip archive at `path` (see the module docs).
pub fn check_pth(path: &Path) -> Result<()> {
    let bad = |reason: String| Error::BadWeights {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| bad(format!("not a PyTorch zip archive ({e})")))?;
    let mut pickles = Vec::new();
    for name in zip.file_names() {
        let name = name.map_err(|e| bad(format!("a file name in the archive: {e}")))?;
        if name.ends_with("data.pkl") {
            pickles.push(name.into_owned());
        }
    }
    if pickles.is_empty() {
        return Err(bad(
            "the archive holds no data.pkl: not a saved PyTorch state dict".into(),
        ));
    }
    for name in pickles {
        let entry = zip
            .by_name(&name)
            .map_err(|e| bad(format!("reading {name}: {e}")))?;
        let mut reader = BufReader::new(entry.take(MAX_PICKLE_BYTES + 1));
        check_pickle(&mut reader).map_err(|reason| bad(format!("{name}: {reason}")))?;
    }
    Ok(())
}

/// Checks one pickle held in memory the way [`check_pth`] checks each `data.pkl`; the reason
/// when it is refused.
pub fn check_pickle_bytes(bytes: &[u8]) -> std::result::Result<(), String> {
    check_pickle(&mut std::io::Cursor::new(bytes))
}

/// One stack entry: how many objects it holds, or a mark.
#[derive(Clone, Copy, PartialEq)]
enum Slot {
    Mark,
    Object(u64),
}

struct Walk<'a, R> {
    r: &'a mut R,
    read: u64,
    stack: Vec<Slot>,
    memo: std::collections::HashMap<u32, u64>,
    objects: u64,
}

impl<R: BufRead> Walk<'_, R> {
    fn bytes<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|_| "the pickle ends in the middle of an opcode".to_string())?;
        self.read += N as u64;
        Ok(b)
    }

    /// Skips `len` bytes without holding them.
    fn skip(&mut self, len: u64) -> std::result::Result<(), String> {
        if self.read + len > MAX_PICKLE_BYTES {
            return Err(format!(
                "a value of {len} bytes runs past the {MAX_PICKLE_BYTES}-byte limit of a pickle"
            ));
        }
        let copied = std::io::copy(&mut self.r.by_ref().take(len), &mut std::io::sink())
            .map_err(|e| e.to_string())?;
        if copied != len {
            return Err(format!(
                "a value claims {len} bytes but the pickle ends after {copied}"
            ));
        }
        self.read += len;
        Ok(())
    }

    fn line(&mut self) -> std::result::Result<String, String> {
        let mut buf = Vec::new();
        self.r
            .by_ref()
            .take(257)
            .read_until(b'\n', &mut buf)
            .map_err(|e| e.to_string())?;
        self.read += buf.len() as u64;
        if buf.pop() != Some(b'\n') {
            return Err("a global name is unterminated or longer than 256 bytes".into());
        }
        String::from_utf8(buf).map_err(|_| "a global name is not UTF-8".to_string())
    }

    fn push(&mut self, n: u64) -> std::result::Result<(), String> {
        self.objects = self.objects.saturating_add(n);
        if self.objects > MAX_OBJECTS {
            return Err(format!(
                "the pickle builds more than {MAX_OBJECTS} objects (a state dict builds a few \
                 thousand): refused"
            ));
        }
        self.stack.push(Slot::Object(n));
        Ok(())
    }

    fn pop(&mut self) -> std::result::Result<u64, String> {
        match self.stack.pop() {
            Some(Slot::Object(n)) => Ok(n),
            Some(Slot::Mark) => Err("a mark where an object was expected".into()),
            None => Err("an opcode pops an empty stack".into()),
        }
    }

    /// Pops down to the last mark; the number of objects above it.
    fn pop_mark(&mut self) -> std::result::Result<u64, String> {
        let mut sum = 0u64;
        loop {
            match self.stack.pop() {
                Some(Slot::Object(n)) => sum = sum.saturating_add(n),
                Some(Slot::Mark) => return Ok(sum),
                None => return Err("no mark on the stack".into()),
            }
        }
    }

    /// Adds `n` objects to the object on top of the stack (a dict or list being filled).
    fn grow_top(&mut self, n: u64) -> std::result::Result<(), String> {
        // (not counted again: the objects were counted when they were made)
        let top = self.pop()?;
        self.stack.push(Slot::Object(top.saturating_add(n)));
        Ok(())
    }
}

/// Walks one pickle (protocol 2 to 5, the opcodes candle reads) up to its STOP.
fn check_pickle<R: BufRead>(r: &mut R) -> std::result::Result<(), String> {
    let mut w = Walk {
        r,
        read: 0,
        stack: Vec::new(),
        memo: Default::default(),
        objects: 0,
    };
    loop {
        if w.read > MAX_PICKLE_BYTES {
            return Err(format!("longer than {MAX_PICKLE_BYTES} bytes"));
        }
        let [op] = w.bytes::<1>()?;
        match op {
            0x80 => {
                w.bytes::<1>()?;
            }
            b'c' => {
                let module = w.line()?;
                let name = w.line()?;
                if !allowed_global(&module, &name) {
                    return Err(format!(
                        "it refers to `{module}.{name}`, which a saved state dict never does \
                         (allowed: torch tensors and storages, collections.OrderedDict); refused, \
                         nothing was executed"
                    ));
                }
                w.push(1)?;
            }
            b'q' => {
                let [i] = w.bytes::<1>()?;
                memo_put(&mut w, i as u32)?;
            }
            b'r' => {
                let i = u32::from_le_bytes(w.bytes::<4>()?);
                memo_put(&mut w, i)?;
            }
            b'h' | b'j' => {
                let i = if op == b'h' {
                    w.bytes::<1>()?[0] as u32
                } else {
                    u32::from_le_bytes(w.bytes::<4>()?)
                };
                let n = *w
                    .memo
                    .get(&i)
                    .ok_or_else(|| format!("memo entry {i} is read before it is written"))?;
                w.push(n)?;
            }
            b')' | b'}' | b']' | b'N' | 0x88 | 0x89 => w.push(1)?,
            b'J' => {
                w.bytes::<4>()?;
                w.push(1)?;
            }
            b'K' => {
                w.bytes::<1>()?;
                w.push(1)?;
            }
            b'M' => {
                w.bytes::<2>()?;
                w.push(1)?;
            }
            b'G' => {
                w.bytes::<8>()?;
                w.push(1)?;
            }
            0x8a => {
                let [len] = w.bytes::<1>()?;
                // candle decodes LONG1 into an i64 (and overflows on more bytes); torch writes
                // only small integers this way
                if len > 8 {
                    return Err(format!(
                        "a LONG1 integer of {len} bytes (at most 8 are read)"
                    ));
                }
                w.skip(len as u64)?;
                w.push(1)?;
            }
            b'X' => {
                let len = u32::from_le_bytes(w.bytes::<4>()?);
                w.skip(len as u64)?;
                w.push(1)?;
            }
            b'(' => w.stack.push(Slot::Mark),
            b't' | b'd' => {
                let n = w.pop_mark()?;
                w.push(n.saturating_add(1))?;
            }
            0x85..=0x87 => {
                let mut n = 1u64;
                for _ in 0..(op - 0x84) {
                    n = n.saturating_add(w.pop()?);
                }
                w.push(n)?;
            }
            // REDUCE, BUILD, NEWOBJ: two objects become one.
            b'R' | b'b' | 0x81 => {
                let a = w.pop()?;
                let b = w.pop()?;
                w.push(a.saturating_add(b).saturating_add(1))?;
            }
            b'Q' => {
                let n = w.pop()?;
                w.push(n.saturating_add(1))?;
            }
            b's' => {
                let v = w.pop()?;
                let k = w.pop()?;
                w.grow_top(k.saturating_add(v))?;
            }
            b'a' => {
                let v = w.pop()?;
                w.grow_top(v)?;
            }
            b'u' | b'e' => {
                let n = w.pop_mark()?;
                w.grow_top(n)?;
            }
            b'.' => {
                return match w.stack.as_slice() {
                    [Slot::Object(_)] => Ok(()),
                    _ => Err("the pickle does not end with exactly one object".into()),
                };
            }
            other => {
                return Err(format!(
                    "opcode 0x{other:02x} is not one a saved state dict uses: refused"
                ))
            }
        }
    }
}

fn memo_put<R: BufRead>(w: &mut Walk<'_, R>, i: u32) -> std::result::Result<(), String> {
    match w.stack.last() {
        Some(Slot::Object(n)) => {
            if w.memo.len() >= MAX_OBJECTS as usize && !w.memo.contains_key(&i) {
                return Err("too many memo entries".into());
            }
            w.memo.insert(i, *n);
            Ok(())
        }
        _ => Err("memo put with no object on the stack".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bytes: &[u8]) -> std::result::Result<(), String> {
        check_pickle(&mut std::io::Cursor::new(bytes))
    }

    /// `{"w": torch._utils._rebuild_tensor_v2(persistent_load(("storage", torch.FloatStorage,
    /// "0", "cpu", 4)), 0, (2, 2), (2, 1), False, OrderedDict())}`, as torch writes it.
    fn state_dict() -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'X', 1, 0, 0, 0, b'w'];
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x01((X\x07\x00\x00\x00storageq\x02");
        p.extend(b"ctorch\nFloatStorage\nq\x03X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ");
        p.extend(b"K\x00K\x02K\x02\x86K\x02K\x01\x86\x89ccollections\nOrderedDict\n)R");
        p.extend(b"tRs.");
        p
    }

    #[test]
    fn a_state_dict_passes() {
        check(&state_dict()).unwrap();
    }

    #[test]
    fn code_is_refused_by_name() {
        let p = b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00true\x85R.";
        let e = check(p).unwrap_err();
        assert!(e.contains("posix.system") && e.contains("refused"), "{e}");
        let p = b"\x80\x02c__builtin__\neval\n.";
        assert!(check(p).unwrap_err().contains("__builtin__.eval"));
    }

    #[test]
    fn doubling_memo_copies_are_bounded() {
        // a list, then 64 times: copy it twice into a tuple, memoise the tuple as the new list
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..64 {
            p.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        let e = check(&p).unwrap_err();
        assert!(e.contains("objects"), "{e}");
    }

    #[test]
    fn lengths_past_the_end_and_malformed_stacks_are_errors() {
        // a 4 GiB string in a 10-byte pickle
        let e = check(b"\x80\x02X\xff\xff\xff\xff.").unwrap_err();
        assert!(e.contains("bytes"), "{e}");
        for bad in [
            &b"\x80\x02"[..],                                         // no STOP
            b"\x80\x02R.",                                            // reduce on an empty stack
            b"\x80\x02h\x05.",                                        // memo read before write
            b"\x80\x02(.",                                            // a mark left over
            b"\x80\x02NN.",                                           // two objects left
            b"\x80\x02\xff.",                                         // unknown opcode
            b"\x80\x02cposix",                                        // unterminated global
            b"\x80\x02u.",                                            // setitems without a mark
            b"\x80\x02\x8a\x09\x01\x02\x03\x04\x05\x06\x07\x08\x09.", // a 9-byte LONG1
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn storages_and_modules_are_allowed_precisely() {
        assert!(allowed_global("torch", "HalfStorage"));
        assert!(allowed_global("torch._utils", "_rebuild_parameter"));
        assert!(!allowed_global("torch", "load"));
        assert!(!allowed_global("torch", "os.Storage"));
        assert!(!allowed_global("collections", "namedtuple"));
        assert!(!allowed_global("os", "system"));
    }
}
