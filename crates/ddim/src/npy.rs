//! NumPy `.npy` reader and writer (format versions 1.0, 2.0 and 3.0, as specified in numpy's
//! `numpy.lib.format`), for tensors in model space: NCHW f32 in [-1, 1].
//!
//! Reading is defensive: the header length is bounded, the shape product is overflow-checked, and
//! the data length must equal what the header promises before anything is allocated, so a hostile
//! file can make us return an error but never allocate more than the file holds. Writing is atomic
//! (temporary file in the same directory, fsync, rename), so a failed write never destroys an
//! existing file.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::atomic::write_atomically;
use crate::{Error, Result};

/// The magic string every `.npy` file starts with.
const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// The largest header we accept. numpy's own `np.load` refuses headers over 10 000 bytes unless
/// told otherwise; we allow a little more, which is plenty for any plain numeric dtype and shape.
pub const MAX_HEADER_LEN: usize = 1 << 16;

/// Nesting depth of Python literals in the header past which we refuse the file (plain arrays
/// need 2: the dict and the shape tuple).
const MAX_NESTING: usize = 8;

/// numpy aligns the start of the data to this many bytes (`ARRAY_ALIGN`).
const ARRAY_ALIGN: usize = 64;

/// numpy leaves room in the header for the growth axis to reach this many digits
/// (`GROWTH_AXIS_MAX_DIGITS`), so that a file can be appended to in place.
const GROWTH_AXIS_MAX_DIGITS: usize = 21;

/// Largest magnitude up to which every integer is exactly an f32 (2^24).
const MAX_EXACT_INT: i128 = 1 << 24;

/// An array read from a `.npy` file: its shape and its values as f32 in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// The shape, outermost axis first; empty for a 0-d array (which holds one value).
    pub shape: Vec<usize>,
    /// The values in C order; `data.len()` is the product of `shape`.
    pub data: Vec<f32>,
}

/// Byte order of a dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endian {
    Little,
    Big,
}

/// The numeric dtypes we can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Float,
    Int,
    UInt,
    Bool,
}

/// A parsed `descr` string, e.g. `<f4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dtype {
    endian: Endian,
    kind: Kind,
    size: usize,
}

/// Reads a `.npy` file into f32 values in C order.
///
/// `<f4`/`>f4` are read as is. `f8`, `f2`, integer (`i1`..`i8`, `u1`..`u8`) and bool (`b1`)
/// arrays are converted to f32 only when every value converts exactly (f64 values that are
/// f32 values, integers of magnitude at most 2^24, bools 0 or 1); otherwise the error names the
/// file, the dtype and the first offending value and index. Both byte orders are accepted.
/// `fortran_order: True` arrays are transposed into C order. Object, structured, string,
/// complex and date dtypes are refused.
///
/// ```
/// use ddim::npy::{read_npy, write_npy};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("x.npy");
/// write_npy(&path, &[2, 3], &[0.0, 0.5, -0.5, 1.0, -1.0, 0.25])?;
/// let array = read_npy(&path)?;
/// assert_eq!(array.shape, vec![2, 3]);
/// assert_eq!(array.data[1], 0.5);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn read_npy(path: &Path) -> Result<NpyArray> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    read_npy_from(&mut file, file_len, path)
}

/// Reads a `.npy` file held in memory (see [`read_npy`]); `name` stands for it in messages.
pub fn read_npy_bytes(bytes: &[u8], name: &Path) -> Result<NpyArray> {
    read_npy_from(&mut std::io::Cursor::new(bytes), bytes.len() as u64, name)
}

/// Reads a `.npy` file (see [`read_npy`]) into an f32 tensor of the file's shape on `device`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use ddim::npy::{read_npy_tensor, write_npy_tensor};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("noise.npy");
/// let x = Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &Device::Cpu)?;
/// write_npy_tensor(&path, &x)?;
/// let y = read_npy_tensor(&path, &Device::Cpu)?;
/// assert_eq!(y.dims(), &[1, 3, 4, 4]);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn read_npy_tensor(path: &Path, device: &Device) -> Result<Tensor> {
    let array = read_npy(path)?;
    Ok(Tensor::from_vec(array.data, array.shape, device)?)
}

/// Writes `data` (C order, `shape`) as a version 1.0 `.npy` file of dtype `<f4`, with exactly
/// the header numpy writes for the same array.
///
/// The write is atomic: the bytes go to a temporary file in the same directory, which is
/// fsynced and then renamed over `path`, so an interrupted or failed write never destroys an
/// existing file at `path`. A missing parent directory is created.
///
/// ```
/// use ddim::npy::write_npy;
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("x.npy");
/// write_npy(&path, &[3], &[1.0, 2.0, 3.0])?;
/// assert_eq!(std::fs::metadata(&path).unwrap().len(), 128 + 12);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn write_npy(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            Error::argument(
                "shape",
                format!("{shape:?}"),
                "a shape whose product fits in usize",
            )
        })?;
    if count != data.len() {
        return Err(Error::argument(
            "shape",
            format!("{shape:?}"),
            format!(
                "a shape with as many elements as the data ({}), not {count}",
                data.len()
            ),
        ));
    }
    let header = npy_header(shape);
    write_atomically(path, |w| {
        w.write_all(&header)?;
        // Write in bounded chunks so a large tensor does not need a second full-size buffer.
        let mut buf = Vec::with_capacity(4 * 4096);
        for chunk in data.chunks(4096) {
            buf.clear();
            for v in chunk {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            w.write_all(&buf)?;
        }
        Ok(())
    })
}

/// Writes a tensor as a `.npy` file (see [`write_npy`]); any dtype is converted to f32 and any
/// device's tensor is copied to the CPU first.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use ddim::npy::{read_npy, write_npy_tensor};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("x.npy");
/// let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
/// write_npy_tensor(&path, &x)?;
/// assert_eq!(read_npy(&path)?.data, vec![1.0, 2.0, 3.0, 4.0]);
/// # Ok::<(), ddim::Error>(())
/// ```
pub fn write_npy_tensor(path: &Path, tensor: &Tensor) -> Result<()> {
    let data = tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    write_npy(path, tensor.dims(), &data)
}

/// The full header numpy 2.x writes for an `<f4` C-order array of `shape`: magic, version,
/// header length, then the dict literal padded with spaces (and room for the first axis to grow
/// to 21 digits) and a newline, so the data starts at a multiple of 64 bytes.
fn npy_header(shape: &[usize]) -> Vec<u8> {
    let shape_repr = match shape {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_repr}, }}");
    if let Some(first) = shape.first() {
        let digits = first.to_string().len();
        dict.push_str(&" ".repeat(GROWTH_AXIS_MAX_DIGITS.saturating_sub(digits)));
    }
    // Version 1.0 has a 2-byte header length; numpy falls back to 2.0 (4 bytes) past 65535.
    let mut prefix_len = MAGIC.len() + 2 + 2;
    let mut version = 1u8;
    let pad = |prefix_len: usize| ARRAY_ALIGN - (prefix_len + dict.len() + 1) % ARRAY_ALIGN;
    if dict.len() + 1 + pad(prefix_len) > usize::from(u16::MAX) {
        prefix_len = MAGIC.len() + 2 + 4;
        version = 2;
    }
    let padding = pad(prefix_len) % ARRAY_ALIGN;
    let header_len = dict.len() + padding + 1;
    let mut out = Vec::with_capacity(prefix_len + header_len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        // Fits: checked above.
        out.extend_from_slice(&(header_len as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header_len as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.extend(std::iter::repeat_n(b' ', padding));
    out.push(b'\n');
    out
}

/// Reads a `.npy` stream of total length `file_len` bytes; `path` is for error messages.
fn read_npy_from(r: &mut impl Read, file_len: u64, path: &Path) -> Result<NpyArray> {
    let bad = |reason: String| Error::npy(path, reason);
    let read_exact = |r: &mut dyn Read, buf: &mut [u8], what: &str| -> Result<()> {
        r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::npy(
                    path,
                    format!("file ends inside the {what} ({file_len} bytes in all)"),
                )
            } else {
                Error::io(path, e)
            }
        })
    };

    // Magic and version.
    let mut preamble = [0u8; 8];
    read_exact(r, &mut preamble, "magic string and version")?;
    if &preamble[..6] != MAGIC {
        return Err(bad(format!(
            "not a .npy file: it starts with {:?}, not the magic string \"\\x93NUMPY\"",
            String::from_utf8_lossy(&preamble[..6])
        )));
    }
    let (major, minor) = (preamble[6], preamble[7]);
    let len_bytes = match (major, minor) {
        (1, 0) => 2,
        (2, 0) | (3, 0) => 4,
        _ => {
            return Err(bad(format!(
                "unsupported .npy format version {major}.{minor}: 1.0, 2.0 and 3.0 are supported"
            )))
        }
    };
    let mut len_buf = [0u8; 4];
    read_exact(r, &mut len_buf[..len_bytes], "header length")?;
    let header_len = u32::from_le_bytes(len_buf) as usize;
    let header_start = (8 + len_bytes) as u64;
    if header_len > MAX_HEADER_LEN {
        return Err(bad(format!(
            "header length {header_len} bytes is more than the {MAX_HEADER_LEN} allowed"
        )));
    }
    if header_start + header_len as u64 > file_len {
        return Err(bad(format!(
            "header length {header_len} bytes runs past the end of the file ({file_len} bytes in all)"
        )));
    }
    let mut header = vec![0u8; header_len];
    read_exact(r, &mut header, "header")?;
    let header_text = if major == 3 {
        String::from_utf8(header).map_err(|_| bad("header is not valid UTF-8".to_string()))?
    } else {
        // Versions 1.0 and 2.0 are latin-1: every byte is the code point of the same value.
        header.iter().map(|&b| char::from(b)).collect()
    };
    let (dtype, fortran_order, shape) = parse_header(&header_text).map_err(bad)?;

    // Sizes, all checked before any allocation that depends on them.
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            bad(format!(
                "shape {shape:?} has more elements than fit in memory"
            ))
        })?;
    let expected = count
        .checked_mul(dtype.size)
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| {
            bad(format!(
                "shape {shape:?} of {}-byte values overflows",
                dtype.size
            ))
        })?;
    let actual = file_len - header_start - header_len as u64;
    if actual != expected {
        let what = if actual < expected {
            "truncated"
        } else {
            "has trailing bytes"
        };
        return Err(bad(format!(
            "file is {what}: shape {shape:?} of dtype {} needs {expected} data bytes, the file holds {actual}",
            dtype.descr()
        )));
    }
    // `expected` bytes are in the file, so this allocation is bounded by the file's size.
    let mut raw = vec![0u8; count * dtype.size];
    read_exact(r, &mut raw, "data")?;
    let data = convert(&raw, dtype, path)?;
    let data = if fortran_order && shape.len() > 1 {
        fortran_to_c(&data, &shape)
    } else {
        data
    };
    Ok(NpyArray { shape, data })
}

impl Dtype {
    /// The numpy `descr` string, e.g. `<f4`.
    fn descr(&self) -> String {
        let order = match (self.size, self.endian) {
            (1, _) => '|',
            (_, Endian::Little) => '<',
            (_, Endian::Big) => '>',
        };
        let kind = match self.kind {
            Kind::Float => 'f',
            Kind::Int => 'i',
            Kind::UInt => 'u',
            Kind::Bool => 'b',
        };
        format!("{order}{kind}{}", self.size)
    }

    /// Parses a `descr` string; refuses everything but plain numeric and bool dtypes.
    fn parse(descr: &str) -> std::result::Result<Dtype, String> {
        let refuse = |why: &str| {
            format!("dtype '{descr}' is not supported ({why}); supported: f2, f4, f8, i1-i8, u1-u8, b1 in either byte order")
        };
        let mut chars = descr.chars();
        let endian = match chars.next() {
            Some('<') | Some('|') => Endian::Little,
            Some('>') => Endian::Big,
            _ => return Err(refuse("no byte order '<', '>' or '|'")),
        };
        let rest = chars.as_str();
        let (kind, size) = rest.split_at(rest.char_indices().nth(1).map_or(rest.len(), |(i, _)| i));
        let kind = match kind {
            "f" => Kind::Float,
            "i" => Kind::Int,
            "u" => Kind::UInt,
            "b" => Kind::Bool,
            "O" => return Err(refuse("Python objects")),
            "S" | "U" | "a" => return Err(refuse("strings")),
            "V" => return Err(refuse("raw or structured records")),
            "c" => return Err(refuse("complex numbers")),
            "M" | "m" => return Err(refuse("dates and times")),
            _ => return Err(refuse("unknown kind")),
        };
        let size: usize = size.parse().map_err(|_| refuse("bad item size"))?;
        let ok = match kind {
            Kind::Float => matches!(size, 2 | 4 | 8),
            Kind::Int | Kind::UInt => matches!(size, 1 | 2 | 4 | 8),
            Kind::Bool => size == 1,
        };
        if !ok {
            return Err(refuse("unsupported item size"));
        }
        Ok(Dtype { endian, kind, size })
    }
}

/// A Python literal as it can appear in a `.npy` header.
#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Str(String),
    Bool(bool),
    Int(u64),
    /// A tuple or a list (a list only appears in structured dtypes, which we refuse).
    Seq(Vec<Literal>, bool),
    Dict(Vec<(Literal, Literal)>),
}

/// Parses the header dict into (dtype, fortran_order, shape).
fn parse_header(text: &str) -> std::result::Result<(Dtype, bool, Vec<usize>), String> {
    let mut p = Parser {
        s: text.as_bytes(),
        pos: 0,
    };
    let value = p.value(0)?;
    p.skip_ws();
    if p.pos != p.s.len() {
        return Err(format!("header has text after the dict at byte {}", p.pos));
    }
    let Literal::Dict(entries) = value else {
        return Err("header is not a Python dict literal".to_string());
    };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    for (k, v) in entries {
        let Literal::Str(k) = k else {
            return Err("header dict has a key that is not a string".to_string());
        };
        match k.as_str() {
            "descr" => descr = Some(v),
            "fortran_order" => fortran = Some(v),
            "shape" => shape = Some(v),
            other => {
                return Err(format!(
                    "header has unexpected key '{other}'; allowed: descr, fortran_order, shape"
                ))
            }
        }
    }
    let dtype = match descr {
        Some(Literal::Str(d)) => Dtype::parse(&d)?,
        Some(Literal::Seq(..)) => return Err(
            "structured dtypes (a list of fields) are not supported; save a plain numeric array"
                .to_string(),
        ),
        Some(_) => return Err("header 'descr' is not a string".to_string()),
        None => return Err("header has no 'descr' key".to_string()),
    };
    let fortran = match fortran {
        Some(Literal::Bool(b)) => b,
        Some(_) => return Err("header 'fortran_order' is not True or False".to_string()),
        None => return Err("header has no 'fortran_order' key".to_string()),
    };
    let shape = match shape {
        Some(Literal::Seq(items, true)) => items
            .into_iter()
            .map(|d| match d {
                Literal::Int(n) => {
                    usize::try_from(n).map_err(|_| format!("shape dimension {n} is too large"))
                }
                other => Err(format!(
                    "shape has a dimension that is not a non-negative integer: {other:?}"
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
        Some(_) => return Err("header 'shape' is not a tuple".to_string()),
        None => return Err("header has no 'shape' key".to_string()),
    };
    Ok((dtype, fortran, shape))
}

/// A small recursive-descent parser for the Python literals numpy writes in headers.
struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.pos).copied()
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!(
                "header: expected '{}' at byte {}",
                c as char, self.pos
            ))
        }
    }

    fn value(&mut self, depth: usize) -> std::result::Result<Literal, String> {
        if depth > MAX_NESTING {
            return Err(format!(
                "header nests literals deeper than {MAX_NESTING} levels"
            ));
        }
        match self.peek() {
            Some(b'{') => {
                self.pos += 1;
                let mut entries = Vec::new();
                loop {
                    if self.peek() == Some(b'}') {
                        self.pos += 1;
                        return Ok(Literal::Dict(entries));
                    }
                    let k = self.value(depth + 1)?;
                    self.expect(b':')?;
                    let v = self.value(depth + 1)?;
                    entries.push((k, v));
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b'}') => {}
                        _ => {
                            return Err(format!(
                                "header: expected ',' or '}}' at byte {}",
                                self.pos
                            ))
                        }
                    }
                }
            }
            Some(open @ (b'(' | b'[')) => {
                self.pos += 1;
                let close = if open == b'(' { b')' } else { b']' };
                let mut items = Vec::new();
                loop {
                    if self.peek() == Some(close) {
                        self.pos += 1;
                        return Ok(Literal::Seq(items, open == b'('));
                    }
                    items.push(self.value(depth + 1)?);
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(c) if c == close => {}
                        _ => {
                            return Err(format!(
                                "header: expected ',' or '{}' at byte {}",
                                close as char, self.pos
                            ))
                        }
                    }
                }
            }
            Some(q @ (b'\'' | b'"')) => {
                self.pos += 1;
                let start = self.pos;
                while self.pos < self.s.len() && self.s[self.pos] != q {
                    if self.s[self.pos] == b'\\' {
                        return Err("header: escapes in strings are not supported".to_string());
                    }
                    self.pos += 1;
                }
                if self.pos >= self.s.len() {
                    return Err("header: unterminated string".to_string());
                }
                let text = String::from_utf8_lossy(&self.s[start..self.pos]).into_owned();
                self.pos += 1;
                Ok(Literal::Str(text))
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.pos;
                while self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
                    self.pos += 1;
                }
                let digits = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
                let n = digits
                    .parse::<u64>()
                    .map_err(|_| format!("header: integer {digits} is too large"))?;
                // Python 2 wrote long integers with an `L` suffix.
                if self.s.get(self.pos) == Some(&b'L') {
                    self.pos += 1;
                }
                Ok(Literal::Int(n))
            }
            Some(b'-') => Err(format!("header: negative number at byte {}", self.pos)),
            Some(_) => {
                let rest = &self.s[self.pos..];
                for (word, b) in [(&b"True"[..], true), (&b"False"[..], false)] {
                    if rest.starts_with(word) {
                        self.pos += word.len();
                        return Ok(Literal::Bool(b));
                    }
                }
                Err(format!("header: unexpected text at byte {}", self.pos))
            }
            None => Err("header: unexpected end".to_string()),
        }
    }
}

/// Converts raw bytes of `dtype` to f32, refusing any value that does not convert exactly.
fn convert(raw: &[u8], dtype: Dtype, path: &Path) -> Result<Vec<f32>> {
    let size = dtype.size;
    let le = dtype.endian == Endian::Little;
    // Little-endian u64 of one item of up to 8 bytes, whatever the file's byte order.
    let bits = |chunk: &[u8]| -> u64 {
        let mut b = [0u8; 8];
        if le {
            b[..size].copy_from_slice(chunk);
        } else {
            for (i, &v) in chunk.iter().rev().enumerate() {
                b[i] = v;
            }
        }
        u64::from_le_bytes(b)
    };
    let lossy = |index: usize, value: String, why: &str| {
        Error::npy(
            path,
            format!(
                "dtype {} value {value} at flat index {index} {why}; convert the array to float32 first",
                dtype.descr()
            ),
        )
    };
    let mut out = Vec::with_capacity(raw.len() / size);
    for (index, chunk) in raw.chunks_exact(size).enumerate() {
        let b = bits(chunk);
        let v = match (dtype.kind, size) {
            (Kind::Float, 4) => f32::from_bits(b as u32),
            (Kind::Float, 2) => f16_to_f32(b as u16),
            (Kind::Float, _) => {
                let x = f64::from_bits(b);
                let y = x as f32;
                if f64::from(y) != x && !x.is_nan() {
                    return Err(lossy(
                        index,
                        format!("{x:e}"),
                        "is not exactly representable as float32",
                    ));
                }
                y
            }
            (Kind::Int, _) => {
                // Sign-extend from `size` bytes.
                let shift = 64 - 8 * size as u32;
                let x = ((b << shift) as i64) >> shift;
                if i128::from(x).abs() > MAX_EXACT_INT {
                    return Err(lossy(
                        index,
                        x.to_string(),
                        "is beyond ±2^24, where float32 loses integers",
                    ));
                }
                x as f32
            }
            (Kind::UInt, _) => {
                if i128::from(b) > MAX_EXACT_INT {
                    return Err(lossy(
                        index,
                        b.to_string(),
                        "is beyond 2^24, where float32 loses integers",
                    ));
                }
                b as f32
            }
            (Kind::Bool, _) => match b {
                0 => 0.0,
                1 => 1.0,
                _ => return Err(lossy(index, b.to_string(), "is not a bool (0 or 1)")),
            },
        };
        out.push(v);
    }
    Ok(out)
}

/// IEEE 754 half precision to f32 (exact: every f16 is an f32).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        // Subnormal: value = mant * 2^-24, exact in f32.
        (0, m) => {
            let v = m as f32 * f32::powi(2.0, -24);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Reorders Fortran-order (column-major) data of `shape` into C order.
fn fortran_to_c(data: &[f32], shape: &[usize]) -> Vec<f32> {
    // Fortran strides: the first axis varies fastest.
    let mut strides = vec![1usize; shape.len()];
    for i in 1..shape.len() {
        strides[i] = strides[i - 1] * shape[i - 1];
    }
    let mut out = Vec::with_capacity(data.len());
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..data.len() {
        let offset: usize = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
        out.push(data[offset]);
        // Advance the C-order index: the last axis varies fastest.
        for axis in (0..shape.len()).rev() {
            idx[axis] += 1;
            if idx[axis] < shape[axis] {
                break;
            }
            idx[axis] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of a `.npy` file with the given version, header dict text and data, built by hand
    /// per the format spec (header padded with spaces and a newline to a multiple of 64).
    fn npy_bytes(major: u8, dict: &str, data: &[u8]) -> Vec<u8> {
        let len_bytes = if major == 1 { 2 } else { 4 };
        let unpadded = 8 + len_bytes + dict.len() + 1;
        let pad = (64 - unpadded % 64) % 64;
        let header_len = dict.len() + pad + 1;
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[major, 0]);
        if major == 1 {
            out.extend_from_slice(&(header_len as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(header_len as u32).to_le_bytes());
        }
        out.extend_from_slice(dict.as_bytes());
        out.extend(std::iter::repeat_n(b' ', pad));
        out.push(b'\n');
        assert_eq!(out.len() % 64, 0);
        out.extend_from_slice(data);
        out
    }

    fn dict(descr: &str, fortran: bool, shape: &str) -> String {
        let f = if fortran { "True" } else { "False" };
        format!("{{'descr': '{descr}', 'fortran_order': {f}, 'shape': {shape}, }}")
    }

    /// Writes `bytes` to a file in a fresh temp dir and reads it back.
    fn read_bytes(bytes: &[u8]) -> Result<NpyArray> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.npy");
        std::fs::write(&path, bytes).unwrap();
        read_npy(&path)
    }

    fn err_text(bytes: &[u8]) -> String {
        match read_bytes(bytes) {
            Ok(a) => panic!("expected an error, got {a:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let data: Vec<f32> = (0..24).map(|i| i as f32 / 12.0 - 1.0).collect();
        write_npy(&path, &[1, 2, 3, 4], &data).unwrap();
        let a = read_npy(&path).unwrap();
        assert_eq!(a.shape, vec![1, 2, 3, 4]);
        assert_eq!(a.data, data);
    }

    #[test]
    fn round_trip_tensor_and_zero_d() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let x = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        write_npy_tensor(&path, &x).unwrap();
        let y = read_npy_tensor(&path, &Device::Cpu).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), x.to_vec2::<f32>().unwrap());
        write_npy(&path, &[], &[2.5]).unwrap();
        assert_eq!(
            read_npy(&path).unwrap(),
            NpyArray {
                shape: vec![],
                data: vec![2.5]
            }
        );
        write_npy(&path, &[0, 3], &[]).unwrap();
        assert_eq!(
            read_npy(&path).unwrap(),
            NpyArray {
                shape: vec![0, 3],
                data: vec![]
            }
        );
    }

    #[test]
    fn header_matches_numpy() {
        // python -c "import numpy as np, io; b = io.BytesIO(); np.save(b, np.zeros((2, 3), np.float32)); print(b.getvalue()[:128])"
        // (numpy 2.4.6): 128 header bytes, the dict padded with spaces and ended by '\n'.
        let h = npy_header(&[2, 3]);
        assert_eq!(h.len(), 128);
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        assert_eq!(u16::from_le_bytes([h[8], h[9]]), 118);
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        assert_eq!(&h[10..10 + dict.len()], dict.as_bytes());
        assert!(h[10 + dict.len()..127].iter().all(|&b| b == b' '));
        assert_eq!(h[127], b'\n');
        for shape in [&[3][..], &[], &[1, 3, 64, 64], &[100000, 2]] {
            let h = npy_header(shape);
            assert_eq!(h.len(), 128, "{shape:?}");
        }
        let h = npy_header(&[3]);
        assert!(h.starts_with(
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }"
        ));
        let h = npy_header(&[]);
        assert!(h.starts_with(
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (), }"
        ));
    }

    #[test]
    fn reads_f8_exact_and_refuses_lossy() {
        let vals = [0.5f64, -1.0, 0.25, f64::INFINITY];
        let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let a = read_bytes(&npy_bytes(1, &dict("<f8", false, "(4,)"), &data)).unwrap();
        assert_eq!(a.data, vec![0.5, -1.0, 0.25, f32::INFINITY]);

        let vals = [0.5f64, 0.1];
        let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let e = err_text(&npy_bytes(1, &dict("<f8", false, "(2,)"), &data));
        assert!(
            e.contains("t.npy") && e.contains("<f8") && e.contains("index 1") && e.contains("1e-1"),
            "{e}"
        );
    }

    #[test]
    fn reads_integers_bool_and_big_endian() {
        let data: Vec<u8> = [-3i64, 0, 1 << 24]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = read_bytes(&npy_bytes(1, &dict("<i8", false, "(3,)"), &data)).unwrap();
        assert_eq!(a.data, vec![-3.0, 0.0, 16777216.0]);

        let data: Vec<u8> = [1i64, (1 << 24) + 1]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let e = err_text(&npy_bytes(1, &dict("<i8", false, "(2,)"), &data));
        assert!(e.contains("16777217") && e.contains("index 1"), "{e}");

        let a = read_bytes(&npy_bytes(
            1,
            &dict("|u1", false, "(2, 2)"),
            &[0, 1, 128, 255],
        ))
        .unwrap();
        assert_eq!(a.shape, vec![2, 2]);
        assert_eq!(a.data, vec![0.0, 1.0, 128.0, 255.0]);

        let a = read_bytes(&npy_bytes(1, &dict("|b1", false, "(3,)"), &[1, 0, 1])).unwrap();
        assert_eq!(a.data, vec![1.0, 0.0, 1.0]);
        let e = err_text(&npy_bytes(1, &dict("|b1", false, "(2,)"), &[1, 7]));
        assert!(e.contains("not a bool"), "{e}");

        let data: Vec<u8> = [1.5f32, -0.75]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let a = read_bytes(&npy_bytes(1, &dict(">f4", false, "(2,)"), &data)).unwrap();
        assert_eq!(a.data, vec![1.5, -0.75]);

        let data: Vec<u8> = [-300i16, 2].iter().flat_map(|v| v.to_be_bytes()).collect();
        let a = read_bytes(&npy_bytes(2, &dict(">i2", false, "(2,)"), &data)).unwrap();
        assert_eq!(a.data, vec![-300.0, 2.0]);
    }

    #[test]
    fn reads_f2() {
        // np.array([1.0, -2.5, 6.1035156e-05, 5.9604645e-08, 65504.0], np.float16).view(np.uint16)
        let halves = [0x3c00u16, 0xc100, 0x0400, 0x0001, 0x7bff];
        let data: Vec<u8> = halves.iter().flat_map(|v| v.to_le_bytes()).collect();
        let a = read_bytes(&npy_bytes(3, &dict("<f2", false, "(5,)"), &data)).unwrap();
        assert_eq!(
            a.data,
            vec![1.0, -2.5, 6.1035156e-05, 5.9604645e-08, 65504.0]
        );
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert_eq!(f16_to_f32(0x8001), -5.9604645e-08);
    }

    #[test]
    fn fortran_order_is_transposed() {
        // np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)) stores 0 3 1 4 2 5.
        let data: Vec<u8> = [0f32, 3.0, 1.0, 4.0, 2.0, 5.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = read_bytes(&npy_bytes(1, &dict("<f4", true, "(2, 3)"), &data)).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        // 3-d: element (i, j, k) of shape (2, 2, 2) sits at i + 2 j + 4 k.
        let f: Vec<f32> = (0..8)
            .map(|o| {
                let (i, j, k) = (o % 2, (o / 2) % 2, o / 4);
                (100 * i + 10 * j + k) as f32
            })
            .collect();
        let data: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
        let a = read_bytes(&npy_bytes(1, &dict("<f4", true, "(2, 2, 2)"), &data)).unwrap();
        assert_eq!(
            a.data,
            vec![0.0, 1.0, 10.0, 11.0, 100.0, 101.0, 110.0, 111.0]
        );
    }

    #[test]
    fn truncated_and_trailing_data() {
        let e = err_text(&npy_bytes(1, &dict("<f4", false, "(2, 3)"), &[0u8; 20]));
        assert!(
            e.contains("truncated") && e.contains("24") && e.contains("20"),
            "{e}"
        );
        let e = err_text(&npy_bytes(1, &dict("<f4", false, "(2,)"), &[0u8; 9]));
        assert!(e.contains("trailing"), "{e}");
    }

    #[test]
    fn hostile_headers() {
        // A 10^12-element claim on a tiny file: refused before allocating.
        let e = err_text(&npy_bytes(
            1,
            &dict("<f4", false, "(1000000, 1000000)"),
            &[0u8; 16],
        ));
        assert!(
            e.contains("truncated") && e.contains("4000000000000"),
            "{e}"
        );
        // Shape product overflow.
        let e = err_text(&npy_bytes(
            1,
            &dict("<f4", false, "(4294967296, 4294967296, 4294967296)"),
            &[],
        ));
        assert!(e.contains("more elements"), "{e}");
        let e = err_text(&npy_bytes(
            1,
            &dict("<f8", false, "(2305843009213693952,)"),
            &[],
        ));
        assert!(e.contains("overflows"), "{e}");
        let e = err_text(&npy_bytes(
            1,
            &dict("<f4", false, "(99999999999999999999999,)"),
            &[],
        ));
        assert!(e.contains("too large"), "{e}");
        // Bad magic, bad version, short file.
        let mut b = npy_bytes(1, &dict("<f4", false, "(1,)"), &[0; 4]);
        b[1] = b'X';
        assert!(err_text(&b).contains("magic"));
        let mut b = npy_bytes(1, &dict("<f4", false, "(1,)"), &[0; 4]);
        b[6] = 9;
        assert!(err_text(&b).contains("version 9.0"));
        assert!(err_text(b"\x93NUM").contains("file ends"));
        // Header length past the end of the file, and over the bound.
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&1000u16.to_le_bytes());
        b.extend_from_slice(b"{'descr': '<f4'");
        assert!(err_text(&b).contains("past the end"));
        let mut b = b"\x93NUMPY\x02\x00".to_vec();
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(err_text(&b).contains("allowed"));
        // Deep nesting, refused without recursing.
        let deep = format!(
            "{{'descr': {}'<f4'{}, 'fortran_order': False, 'shape': (1,), }}",
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert!(err_text(&npy_bytes(2, &deep, &[0; 4])).contains("nests"));
        // Dtypes we refuse.
        for descr in [
            "|O", "<U8", "|S4", "|V8", "<c8", "<M8", "=f4", "<f3", "<f16",
        ] {
            let e = err_text(&npy_bytes(1, &dict(descr, false, "(1,)"), &[0; 8]));
            assert!(e.contains("not supported"), "{descr}: {e}");
        }
        let structured = "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }";
        assert!(err_text(&npy_bytes(1, structured, &[0; 4])).contains("structured"));
        // Garbage and missing keys.
        for bad in [
            "",
            "{",
            "{'descr': '<f4'",
            "[1, 2]",
            "{'descr': '<f4', 'fortran_order': False}",
            "{'descr': '<f4', 'fortran_order': 1, 'shape': (1,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}",
            "{'descr': '<f4, 'fortran_order': False, 'shape': (1,)}",
        ] {
            assert!(read_bytes(&npy_bytes(1, bad, &[0; 4])).is_err(), "{bad}");
        }
        // Python 2 style long integers and double quotes are fine.
        let a = read_bytes(&npy_bytes(
            1,
            "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (1L,)}",
            &[0; 4],
        ))
        .unwrap();
        assert_eq!(a.shape, vec![1]);
    }

    #[test]
    fn write_refuses_shape_mismatch_and_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        write_npy(&path, &[2], &[1.0, 2.0]).unwrap();
        let before = std::fs::read(&path).unwrap();
        let e = write_npy(&path, &[3], &[1.0, 2.0]).unwrap_err().to_string();
        assert!(e.contains("shape") && e.contains("[3]"), "{e}");
        assert!(write_npy(&path, &[usize::MAX, 2], &[]).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn creates_missing_parent_dir() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/x.npy");
        write_npy(&path, &[1], &[1.0]).unwrap();
        assert_eq!(read_npy(&path).unwrap().data, vec![1.0]);
        let e = read_npy(&dir.path().join("missing.npy"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.npy"), "{e}");
    }
}
