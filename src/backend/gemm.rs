//! The GEMM descriptor every backend's `gemm` takes: shapes, transposes, leading
//! dimensions, offsets and batch strides, with the one validation both backends share.

use crate::error::Result;

/// A row-major GEMM: `C = alpha * op(A) op(B) + beta * C`, `C` `(m, n)`, with
/// `op(A)` `(m, k)` and `op(B)` `(k, n)`. `A` is stored `(m, k)` when `trans_a` is false and
/// `(k, m)` when true, likewise `B`. Leading dimensions default to the stored row length;
/// offsets and batch strides (in elements) describe sub-matrices and strided batches.
/// `exact_f32` keeps an f32 product exact f32 even where the backend runs f32 GEMMs on TF32
/// tensor cores ([`crate::Backend::tf32`]): for the one-time products that set or export a
/// master weight (a layer's `Wt = P^T W Q`, its merge back), never for the hot path.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub beta: f32,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub offset_a: usize,
    pub offset_b: usize,
    pub offset_c: usize,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub exact_f32: bool,
}

impl Gemm {
    /// A single contiguous product, `alpha = 1`, `beta = 0`.
    pub fn new(trans_a: bool, trans_b: bool, m: usize, n: usize, k: usize) -> Self {
        // A zero extent still needs a leading dimension of at least 1 (BLAS rule).
        let lda = if trans_a { m } else { k }.max(1);
        let ldb = if trans_b { k } else { n }.max(1);
        Gemm {
            trans_a,
            trans_b,
            m,
            n,
            k,
            alpha: 1.0,
            beta: 0.0,
            lda,
            ldb,
            ldc: n.max(1),
            offset_a: 0,
            offset_b: 0,
            offset_c: 0,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            exact_f32: false,
        }
    }
    /// `C = A B`.
    pub fn nn(m: usize, n: usize, k: usize) -> Self {
        Self::new(false, false, m, n, k)
    }
    /// `C = A B^T`.
    pub fn nt(m: usize, n: usize, k: usize) -> Self {
        Self::new(false, true, m, n, k)
    }
    /// `C = A^T B`.
    pub fn tn(m: usize, n: usize, k: usize) -> Self {
        Self::new(true, false, m, n, k)
    }
    pub fn alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }
    pub fn beta(mut self, beta: f32) -> Self {
        self.beta = beta;
        self
    }
    /// Exact f32 even under TF32 (see the type's docs).
    pub fn exact_f32(mut self) -> Self {
        self.exact_f32 = true;
        self
    }
    /// Rows of the stored A, B and C (for bounds checks).
    fn stored_rows(&self) -> (usize, usize, usize) {
        let a = if self.trans_a { self.k } else { self.m };
        let b = if self.trans_b { self.n } else { self.k };
        (a, b, self.m)
    }
    /// Minimum buffer lengths of A, B and C this product touches.
    pub fn required_lens(&self) -> (usize, usize, usize) {
        let (ra, rb, rc) = self.stored_rows();
        let ca = if self.trans_a { self.m } else { self.k };
        let cb = if self.trans_b { self.k } else { self.n };
        let span = |rows: usize, cols: usize, ld: usize, off: usize, stride: usize| {
            if rows == 0 || cols == 0 || self.batch == 0 {
                0
            } else {
                off + (self.batch - 1) * stride + (rows - 1) * ld + cols
            }
        };
        (
            span(ra, ca, self.lda, self.offset_a, self.stride_a),
            span(rb, cb, self.ldb, self.offset_b, self.stride_b),
            span(rc, self.n, self.ldc, self.offset_c, self.stride_c),
        )
    }
    /// Checks leading dimensions and buffer lengths.
    pub fn validate(&self, len_a: usize, len_b: usize, len_c: usize) -> Result<()> {
        use crate::error::Error;
        let ca = if self.trans_a { self.m } else { self.k };
        let cb = if self.trans_b { self.k } else { self.n };
        if self.lda < ca.max(1) || self.ldb < cb.max(1) || self.ldc < self.n.max(1) {
            return Err(Error::shape(
                "gemm",
                "leading dimensions (lda, ldb, ldc)",
                format!(">= ({ca}, {cb}, {})", self.n),
                format!("({}, {}, {})", self.lda, self.ldb, self.ldc),
            ));
        }
        let (na, nb, nc) = self.required_lens();
        crate::error::check_len("gemm", "A", len_a, na)?;
        crate::error::check_len("gemm", "B", len_b, nb)?;
        crate::error::check_len("gemm", "C", len_c, nc)?;
        Ok(())
    }
}
