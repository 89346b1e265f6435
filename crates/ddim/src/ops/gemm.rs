//! The leaf the convolutions share: `gemm`'s matrix product with strides, the per-thread
//! scratch buffers, and the pointer through which parallel tiles write disjoint parts of one
//! output. Direct (im2col) and Winograd convolutions both build on it; it imports neither.

use std::cell::RefCell;
use std::thread::LocalKey;

use gemm::{gemm, Parallelism};

thread_local! {
    /// Each thread's column buffer, reused by every convolution it runs.
    pub(crate) static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's buffer for a tile of several images' outputs or gradients.
    pub(crate) static BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with the thread's buffer `key` holding at least `len` values (contents
/// unspecified), or a fresh one when the thread's is in use (a nested call from a GEMM's
/// worker).
pub(crate) fn with_buffer<R>(
    key: &'static LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

/// A pointer that tiles writing disjoint parts of one output share across threads.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: every user writes through it only to elements no other thread touches (the
// callers' comments say why), and the buffer outlives the parallel section.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so that closures capture the whole `Out`, which is `Sync`).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `dst (m×n, row stride dst_rs) = [dst +] a (m×k, strides ars/acs) · b (k×n, strides brs/bcs)`.
///
/// # Safety
/// `dst` must be valid for writes of every element `i·dst_rs + j` (i < m, j < n) and for reads
/// of them when `accumulate`, and must not alias `a` or `b` nor be written by another thread.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    par: Parallelism,
) {
    assert!(m == 0 || k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(k == 0 || n == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: `a` and `b` hold every element the strides address (asserted above); `dst` as
    // the caller promises.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}
