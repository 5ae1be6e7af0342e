//! The row kernels of the CPU softmaxes, shared by the causal softmax (transformer.rs), the
//! padding-masked softmax (encoder.rs) and the attention twin (attention.rs), so the fused
//! attention computes its probabilities and their gradients with exactly the same
//! operations, in the same order, as the unfused ops.

use crate::scalar::Real;

/// Softmax in place of the first `n` (live) entries of `p`, whose entries are unscaled
/// scores: `p_j = exp(scale p_j - max) / sum`; the rest become 0. The sum is taken in f64
/// and rounded once. Returns the row statistics `(max, sum)` (`(-inf, 0)` when `n = 0`).
pub(super) fn softmax_row<F: Real>(p: &mut [F], n: usize, scale: F) -> (F, F) {
    let max = p[..n].iter().fold(F::from_f64(f64::NEG_INFINITY), |m, &v| m.max(scale * v));
    let mut sum = 0.0f64;
    for v in &mut p[..n] {
        *v = (scale * *v - max).exp();
        sum += v.to_f64();
    }
    let sum = F::from_f64(sum);
    p[..n].iter_mut().for_each(|v| *v = *v / sum);
    p[n..].fill(F::ZERO);
    (max, sum)
}

/// The probabilities [`softmax_row`] made from the same unscaled scores, recomputed from its
/// statistics: the same operations on the same values, so the same bits.
pub(super) fn softmax_row_from_stats<F: Real>(p: &mut [F], n: usize, scale: F, max: F, sum: F) {
    for v in &mut p[..n] {
        *v = (scale * *v - max).exp() / sum;
    }
    p[n..].fill(F::ZERO);
}

/// Backward of [`softmax_row`] with respect to the unscaled scores:
/// `ds_j = scale p_j (dp_j - sum_{j' < n} p_j' dp_j')` (the sum in f64), 0 from `n` on.
pub(super) fn softmax_backward_row<F: Real>(p: &[F], dp: &[F], ds: &mut [F], n: usize, scale: F) {
    let dot = F::from_f64(p[..n].iter().zip(&dp[..n]).map(|(&a, &b)| (a * b).to_f64()).sum::<f64>());
    for j in 0..n {
        ds[j] = scale * p[j] * (dp[j] - dot);
    }
    ds[n..].fill(F::ZERO);
}
