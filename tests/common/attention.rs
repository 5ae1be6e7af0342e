//! A plain f64 reference of grouped-query attention, forward and backward (the
//! specification the CPU twin and, through it, the CUDA kernels are checked against), and
//! the error scales that tolerances are derived from.
//!
//! Shapes and layouts as `sparsegrad::backend::AttentionShape`: `q`, `out`, `dq`
//! `(batch*seq, heads*d)`; `k`, `v`, `dk`, `dv` `(batch*seq, kv_heads*d)`; query head `h`
//! reads KV head `h / (heads / kv_heads)`. `lengths`: `None` is the causal mask (query `i`
//! sees keys `j <= i`), `Some` the padding mask (every query of sequence `b` sees keys
//! `j < min(lengths[b], seq)`; none when that is 0: a zero row).

use sparsegrad::backend::AttentionShape;

/// Everything the reference computes for one call.
pub struct Reference {
    pub out: Vec<f64>,
    /// Row statistics `(2, batch, heads, seq)`: max of the scaled scores, then the sum of
    /// `exp(s - max)` (`-inf` and 0 for a row without live keys).
    pub stats: Vec<f64>,
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    /// Error scales: the same sums with every term replaced by its magnitude (see
    /// [`reference`]); a computation whose products carry relative error `u` lands within
    /// a small multiple of `u` times these.
    pub e_out: Vec<f64>,
    pub e_dq: Vec<f64>,
    pub e_dk: Vec<f64>,
    pub e_dv: Vec<f64>,
    /// Largest `scale * sum_d |q_d k_d|` over all (query, key) pairs: bounds the scores.
    pub max_score_mag: f64,
}

/// Live keys of query `i` of sequence `b`.
pub fn live(lengths: Option<&[u32]>, b: usize, i: usize, seq: usize) -> usize {
    match lengths {
        None => i + 1,
        Some(l) => (l[b] as usize).min(seq),
    }
}

/// The reference attention of `q`, `k`, `v` and its gradients from `dout`.
///
/// Error scales, with `p` the probabilities: `e_out_i = sum_j p_ij |v_j|`; with
/// `mdp_ij = sum_d |dout_id v_jd|` and `md_i = sum_d |dout_id| e_out_id` (bounds of `dp_ij`
/// and of `D_i = dout_i . out_i`), the score gradient's scale is
/// `eds_ij = scale p_ij (mdp_ij + 2 md_i)`, and `e_dq_i = sum_j eds_ij |k_j|`,
/// `e_dk_j = sum_i eds_ij |q_i|`, `e_dv_j = sum_i p_ij |dout_i|`.
pub fn reference(
    s: &AttentionShape,
    lengths: Option<&[u32]>,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
) -> Reference {
    let (t, d, qd, kvd, group) = (s.seq, s.head_dim, s.q_dim(), s.kv_dim(), s.group());
    // The ops take the scale as f32 (AttentionShape::scale), as the softmax ops did.
    let scale = s.scale() as f64;
    let rows = s.batch * s.heads * t;
    let mut r = Reference {
        out: vec![0.0; q.len()],
        stats: vec![0.0; 2 * rows],
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; v.len()],
        e_out: vec![0.0; q.len()],
        e_dq: vec![0.0; q.len()],
        e_dk: vec![0.0; k.len()],
        e_dv: vec![0.0; v.len()],
        max_score_mag: 0.0,
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let dot_abs = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x * y).abs()).sum::<f64>();
    for b in 0..s.batch {
        for h in 0..s.heads {
            let g = h / group;
            let qrow = |i: usize| (b * t + i) * qd + h * d;
            let kvrow = |j: usize| (b * t + j) * kvd + g * d;
            for i in 0..t {
                let (qi, n) = (qrow(i), live(lengths, b, i, t));
                let row = (b * s.heads + h) * t + i;
                let sc: Vec<f64> = (0..n).map(|j| scale * dot(&q[qi..qi + d], &k[kvrow(j)..kvrow(j) + d])).collect();
                for j in 0..n {
                    let mag = scale * dot_abs(&q[qi..qi + d], &k[kvrow(j)..kvrow(j) + d]);
                    r.max_score_mag = r.max_score_mag.max(mag);
                }
                let m = sc.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
                let l: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                r.stats[row] = m;
                r.stats[rows + row] = l;
                let p: Vec<f64> = sc.iter().map(|x| (x - m).exp() / l).collect();
                for (j, &pj) in p.iter().enumerate() {
                    for c in 0..d {
                        r.out[qi + c] += pj * v[kvrow(j) + c];
                        r.e_out[qi + c] += pj * v[kvrow(j) + c].abs();
                    }
                }
                // Backward of this row.
                let go = &dout[qi..qi + d];
                let dp: Vec<f64> = (0..n).map(|j| dot(go, &v[kvrow(j)..kvrow(j) + d])).collect();
                let big_d: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                let md = dot_abs(go, &r.e_out[qi..qi + d]);
                for j in 0..n {
                    let (kj, ds) = (kvrow(j), scale * p[j] * (dp[j] - big_d));
                    let eds = scale * p[j] * (dot_abs(go, &v[kj..kj + d]) + 2.0 * md);
                    for c in 0..d {
                        r.dq[qi + c] += ds * k[kj + c];
                        r.e_dq[qi + c] += eds * k[kj + c].abs();
                        r.dk[kj + c] += ds * q[qi + c];
                        r.e_dk[kj + c] += eds * q[qi + c].abs();
                        r.dv[kj + c] += p[j] * go[c];
                        r.e_dv[kj + c] += p[j] * go[c].abs();
                    }
                }
            }
        }
    }
    r
}

/// `x` rounded to bf16 (round to nearest even) and widened back.
pub fn round_bf16(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| half::bf16::from_f32(v as f32).to_f64()).collect()
}

/// Asserts `|got - want| <= c u e + tiny` elementwise (`e` the error scale of each entry);
/// the message names the worst entry by its ratio to the bound. Returns the largest ratio
/// (how much of the bound was used).
pub fn assert_within<A: Into<f64> + Copy, B: Into<f64> + Copy>(
    what: &str,
    got: &[A],
    want: &[B],
    e: &[f64],
    cu: f64,
) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst: Option<(usize, f64)> = None;
    let mut used = 0.0f64;
    for (i, ((&g, &w), &e)) in got.iter().zip(want).zip(e).enumerate() {
        let (g, w) = (g.into(), w.into());
        let bound = cu * e + 1e-30;
        let ratio = if g == w { 0.0 } else { (g - w).abs() / bound };
        used = used.max(ratio);
        if (ratio.is_nan() || ratio > 1.0) && worst.is_none_or(|(_, r)| ratio > r || ratio.is_nan()) {
            worst = Some((i, ratio));
        }
    }
    if let Some((i, ratio)) = worst {
        let (g, w) = (got[i].into(), want[i].into());
        panic!(
            "{what}: entry {i}: got {g:e}, want {w:e}, |diff| {:e} is {ratio:.2} x the bound {:e} (= {cu:e} x error scale {:e})",
            (g - w).abs(),
            cu * e[i],
            e[i]
        );
    }
    used
}
