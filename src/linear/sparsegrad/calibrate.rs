//! `Formulation::measure`: picks the formulation by timing whole layer steps of both
//! (forward, backward with `dx`, SparseAdam) on the backend at the real shape and token
//! count, once per process and shape. A flop count misses what differs between the two
//! beyond GEMM flops (GEMM efficiency per shape, the top-k over `out x in`, the row gather
//! and compaction of the merged update); at BERT's down projection with 512 tokens the flop
//! model picks merged, which measures 20% slower than transformed on a 2-core CPU.

use super::{Formulation, SparseGradConfig, SparseGradLinear};
use crate::backend::{AdamParams, Backend};
use crate::basis::Basis;
use crate::error::{Error, Result};
use crate::linear::Keep;
use crate::optim::Optimizer;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

type Key = (&'static str, usize, usize, usize, usize);

fn cache() -> &'static Mutex<HashMap<Key, Formulation>> {
    static CACHE: OnceLock<Mutex<HashMap<Key, Formulation>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Deterministic values in [-0.5, 0.5): timing needs no particular distribution, only no
/// zeros or denormals that would change the work.
fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

impl Formulation {
    /// Like [`Formulation::choose`], but from the measured time of whole layer steps of each
    /// formulation on `backend` (Exact selection, f32, SparseAdam, one warm-up step, best of
    /// two), at this shape, token count and `k`. Random gradients touch every row of `Wt`,
    /// the merged form's worst case. The answer is remembered per (backend kind, shape,
    /// tokens, k) for the life of the process: the calibration runs once per shape, and
    /// costs three steps of each formulation plus building two layers (it allocates what
    /// two such layers hold, one after the other).
    pub fn measure<B: Backend + Clone>(
        backend: &B,
        out: usize,
        inp: usize,
        tokens: usize,
        k: usize,
    ) -> Result<Formulation> {
        let key = (backend.name(), out, inp, tokens, k);
        let poisoned = || Error::invalid("Formulation::measure", "calibration cache poisoned");
        if let Some(&f) = cache().lock().map_err(|_| poisoned())?.get(&key) {
            return Ok(f);
        }
        if out == 0 || inp == 0 || tokens == 0 || k == 0 {
            return Err(Error::invalid("Formulation::measure", "out, in, tokens and k must be positive"));
        }
        let len = |a: usize, b: usize| {
            a.checked_mul(b).ok_or_else(|| {
                Error::invalid("Formulation::measure", format!("a {a} x {b} operand overflows the address space"))
            })
        };
        let entries = len(out, inp)?;
        if k > entries {
            return Err(Error::invalid(
                "Formulation::measure",
                format!("k = {k} exceeds the {out} x {inp} weight's {entries} entries"),
            ));
        }
        let (x_len, g_len) = (len(tokens, inp)?, len(tokens, out)?);
        let basis = Basis::reflection("formulation-calibration", out, inp, 1)?;
        let w: Vec<f32> = pseudo(entries, 3).into_iter().map(|v| v * 0.05).collect();
        let x = backend.upload(&pseudo(x_len, 4))?;
        let g = backend.upload(&pseudo(g_len, 5))?;
        let mut y = backend.alloc::<f32>(g_len)?;
        let mut dx = backend.alloc::<f32>(x_len)?;
        let mut seconds = [f64::INFINITY; 2];
        for (slot, form) in [Formulation::Transformed, Formulation::Merged].into_iter().enumerate() {
            let cfg = SparseGradConfig {
                keep: Keep::Count(k),
                formulation: Some(form),
                expected_tokens: tokens,
                optimizer: Optimizer::Adam(AdamParams { lr: 1e-6, ..Default::default() }),
                ..Default::default()
            };
            let mut layer = SparseGradLinear::<B, f32>::new(backend, &w, None, &basis, cfg)?;
            let mut step = || -> Result<f64> {
                let t = Instant::now();
                layer.forward(&x, tokens, &mut y)?;
                layer.backward(&g, tokens, Some(&mut dx))?;
                layer.step()?;
                backend.synchronize()?;
                Ok(t.elapsed().as_secs_f64())
            };
            step()?; // the first step grows the token-sized workspaces
            for _ in 0..2 {
                seconds[slot] = seconds[slot].min(step()?);
            }
        }
        let f = if seconds[1] < seconds[0] { Formulation::Merged } else { Formulation::Transformed };
        cache().lock().map_err(|_| poisoned())?.insert(key, f);
        Ok(f)
    }
}
