//! Plain reference implementations the tuned CPU backend is checked against: loops that
//! follow the definitions, with no blocking, threads or BLAS, so a reader can verify them
//! by eye (the products in f64 are `matmul` and `transpose` in the parent module).

use sparsegrad::backend::Gemm;

/// Top-k by magnitude: sort every index by (|v| descending, index ascending), keep `k`,
/// return them in index order (ties go to the lower index, as the ops promise).
pub fn topk_indices(m: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..m.len()).collect();
    idx.sort_by(|&a, &b| m[b].abs().total_cmp(&m[a].abs()).then(a.cmp(&b)));
    let mut top = idx[..k].to_vec();
    top.sort();
    top
}

/// `C = alpha op(A) op(B) + beta C` for every batch, reading each element through the
/// descriptor's offsets, leading dimensions and strides (`beta = 0` ignores `C`).
pub fn gemm(spec: &Gemm, a: &[f64], b: &[f64], c: &mut [f64]) {
    for bt in 0..spec.batch {
        for i in 0..spec.m {
            for j in 0..spec.n {
                let mut acc = 0.0;
                for p in 0..spec.k {
                    let av = if spec.trans_a {
                        a[spec.offset_a + bt * spec.stride_a + p * spec.lda + i]
                    } else {
                        a[spec.offset_a + bt * spec.stride_a + i * spec.lda + p]
                    };
                    let bv = if spec.trans_b {
                        b[spec.offset_b + bt * spec.stride_b + j * spec.ldb + p]
                    } else {
                        b[spec.offset_b + bt * spec.stride_b + p * spec.ldb + j]
                    };
                    acc += av * bv;
                }
                let ci = spec.offset_c + bt * spec.stride_c + i * spec.ldc + j;
                c[ci] = spec.alpha as f64 * acc + if spec.beta == 0.0 { 0.0 } else { spec.beta as f64 * c[ci] };
            }
        }
    }
}

/// `out = B D^T` for a COO matrix `D` whose entry `e` (column `cols[e]`, value
/// `values[e]`) lands in output column `slots[e]`: `out[i, slots[e]] += values[e] *
/// B[i, cols[e]]`, summed in list order from zero, in f32 (the order the CPU op promises,
/// so its results must be equal, not just close). `B` is `(b_rows, b_cols)`, `out`
/// `(b_rows, n)`.
pub fn coo_dense_t(
    values: &[f32],
    cols: &[u32],
    slots: &[u32],
    b: &[f32],
    b_rows: usize,
    b_cols: usize,
    n: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; b_rows * n];
    for i in 0..b_rows {
        for e in 0..values.len() {
            out[i * n + slots[e] as usize] += values[e] * b[i * b_cols + cols[e] as usize];
        }
    }
    out
}
