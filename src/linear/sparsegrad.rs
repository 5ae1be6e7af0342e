//! `SparseGradLinear`: a linear layer trained in the basis `(P, Q)` of its group.
//! The trainable object is `Wt = P^T W Q`; each backward pass selects the `k` entries of
//! `dWt = P^T dW Q` of largest magnitude as COO, and `step` applies them with SparseAdam.
//!
//! Two exact formulations, equal up to rounding (both compute the same `y`, `dx` and `dWt`):
//! - **transformed** keeps `Wt`: forward `((x Q) Wt^T) P^T + b`, `gt = g P`,
//!   `dx = (gt Wt) Q^T`, `dWt = gt^T xt`. Extra cost over a dense layer: `4 T (out^2 + in^2)`
//!   flops per step, growing with the token count `T`.
//! - **merged** keeps the dense `W` only: forward `x W^T + b`, `dx = g W`,
//!   `dWt = P^T (g^T x) Q`, and after SparseAdam the sparse change `D` of `Wt` is applied to
//!   `W` in one of two orders ([`Formulation::merged_update_by_columns`]): `W += P (D Q^T)`,
//!   where `D Q^T` is sparse-times-dense (`2 k in` flops) and the product with `P` runs only
//!   over the `r` rows of `D` the step touched (`2 out r in`), or `W += (P D) Q^T`
//!   (`2 k out + 2 out in^2`), cheaper when `in` is below the touched rows (up-projections).
//!   `P^T (g^T x) Q` has two association orders: `(P^T (g^T x)) Q`, `2 out in (out + in)`
//!   flops beyond `g^T x` whatever `T`, or `(g P)^T (x Q)`, `2 T (out^2 + in^2)`; Exact
//!   selection takes the cheaper ([`Formulation::merged_token_order`]), SparseByDense the
//!   first (it multiplies only the nonzero token rows of `g`). Extra cost
//!   `min(2 out in (out + in), 2 T (out^2 + in^2)) + min(2 k in + 2 out r in, 2 k out + 2 out in^2)`.
//!
//! [`Formulation::choose`] picks the cheaper one from these flop counts for the expected
//! token count; [`Formulation::measure`] times whole layer steps of both on the backend once
//! per shape instead (a one-time calibration), for when GEMM efficiency per shape, the top-k
//! and the merged update's gathers change the answer the flop count gives.
//!
//! On a backend with a device model (CUDA, [`Backend::device_model`]) a layer prices both
//! forms instead ([`Formulation::choose_priced`], `pricing.rs`): every GEMM at the rate of
//! its precision (bf16 tensor cores, TF32, FP32 cores) or the memory bandwidth, casts and
//! sparse kernels at the bandwidth; so the choice can differ between f32 and bf16. There the
//! merged update has no scattered atomics ([`MergedUpdate`]): the change `D` is stored
//! densely and applied by two GEMMs (`W += P (D Q^T)`, in bf16 and under TF32), or, in exact
//! f32 where that prices lower, `E = D Q^T` is formed by row runs summed in registers
//! (`coo_mm`) and applied by one GEMM (`W += P E`); both have a fixed launch shape.
//!
//! Precision: in bf16 (`Precision::Bf16`) the layer keeps bf16 copies of `P` and `Q` and
//! runs every basis product (forward and backward of both forms, `P^T dW Q`, the merged
//! update) with bf16 operands and f32 accumulation, staging f32 intermediates to bf16; the
//! trained weight and the optimizer moments stay in `F`.

mod calibrate;
mod device_basis;
mod pricing;
mod state;
mod step;
mod workspace;

use crate::backend::operand::{mm, mm_operand, stage_checked, to_f, OperandRef};
use crate::backend::Precision;
use crate::backend::{Backend, Coo, Gemm, HostCoo, IndexMaps, TopkJob};
use crate::basis::Basis;
use crate::error::{Error, Result};
use crate::linear::{check_backward, check_forward, check_weight_and_bias, GradY, Keep, INPUT_X};
use crate::optim::{Moments, Optimizer};
use crate::scalar::Real;
use device_basis::{BasisLayout, DeviceBasis};
use half::bf16;
#[cfg(feature = "cuda")]
pub(crate) use pricing::update_kernel_work;
pub use pricing::{FormulationPrice, GemmMode, MergedUpdate};
use std::sync::Arc;
pub(crate) use step::Selecting;
use workspace::Workspace;
pub use workspace::{ScratchLengths, SharedScratch, SparseGradScratch};

/// How `dWt` is selected.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Selection {
    /// Compute all of `dWt`, then keep the top k (the official code).
    Exact,
    /// Paper section 3.3: zero entries of `gt` below `threshold * max|gt|`, multiply only
    /// the rows (tokens) and columns (out-dims) still holding a nonzero, select inside that
    /// block. `threshold = 0` gives exactly the `Exact` result.
    SparseByDense { threshold: f32 },
}

/// Which exact formulation a layer uses; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Formulation {
    Transformed,
    Merged,
}

impl Formulation {
    /// Extra flops per step over a dense layer, `(transformed, merged)`, for Exact selection;
    /// the merged count takes the cheaper association orders of `P^T (g^T x) Q` and of the
    /// update, and assumes the worst case that every row of `Wt` is touched.
    pub fn extra_flops(out: usize, inp: usize, tokens: usize, k: usize) -> (f64, f64) {
        let (o, i, t, k) = (out as f64, inp as f64, tokens as f64, k as f64);
        let transformed = 4.0 * t * (o * o + i * i);
        let rotate = (2.0 * o * i * (o + i)).min(2.0 * t * (o * o + i * i));
        let (by_rows, by_columns) = Self::merged_update_flops(out, inp, k as usize);
        let merged = rotate + by_rows.min(by_columns);
        (transformed, merged)
    }

    /// Flops of the merged update `(W += P (D Q^T) over the touched rows, W += (P D) Q^T)`,
    /// with every row of `Wt` touched that `k` allows.
    fn merged_update_flops(out: usize, inp: usize, k: usize) -> (f64, f64) {
        let (o, i, k) = (out as f64, inp as f64, k as f64);
        (2.0 * k * i + 2.0 * o * o.min(k) * i, 2.0 * k * o + 2.0 * o * i * i)
    }

    /// Whether a merged layer applies its sparse step as `W += (P D) Q^T` (over all `in`
    /// columns) rather than `W += P[:, rows] (D Q^T)[rows, :]` (over the touched rows): the
    /// first when `in` is below the rows a step can touch, as in up-projections. Fixed per
    /// layer at construction (each order keeps `P` in its own layout).
    pub fn merged_update_by_columns(out: usize, inp: usize, k: usize) -> bool {
        let (rows, cols) = Self::merged_update_flops(out, inp, k);
        cols < rows
    }

    /// Whether the merged backward (Exact selection) forms `dWt` as `(g P)^T (x Q)`, which
    /// costs `2 T (out^2 + in^2)` flops beyond the `T out in` product, rather than as
    /// `P^T (g^T x) Q`, which costs `2 out in (out + in)`: the first is cheaper at small `T`.
    pub fn merged_token_order(out: usize, inp: usize, tokens: usize) -> bool {
        let (o, i, t) = (out as f64, inp as f64, tokens as f64);
        t * (o * o + i * i) < o * i * (o + i)
    }

    /// The cheaper formulation for this shape and token count.
    pub fn choose(out: usize, inp: usize, tokens: usize, k: usize) -> Formulation {
        let (transformed, merged) = Self::extra_flops(out, inp, tokens, k);
        if merged < transformed {
            Formulation::Merged
        } else {
            Formulation::Transformed
        }
    }
}

/// How the SparseGrad layers of a model pick their formulation, for recipes and examples
/// that build many layers from one setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FormulationChoice {
    /// The layer's own model for the expected token count: [`Formulation::choose`]'s flop
    /// count on the CPU, [`Formulation::choose_priced`] on a backend with a device model.
    #[default]
    FlopModel,
    /// [`Formulation::measure`]: time whole steps of both once per shape on the backend.
    Measure,
    /// This one for every layer.
    Fixed(Formulation),
}

impl FormulationChoice {
    /// `flops`, `measure`, `merged` or `transformed`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "flops" => FormulationChoice::FlopModel,
            "measure" => FormulationChoice::Measure,
            "merged" => FormulationChoice::Fixed(Formulation::Merged),
            "transformed" => FormulationChoice::Fixed(Formulation::Transformed),
            _ => {
                return Err(Error::invalid(
                    "formulation",
                    format!("`{s}` is not one of flops, measure, merged, transformed"),
                ))
            }
        })
    }

    /// What to put in [`SparseGradConfig::formulation`] for an `(out, in)` layer keeping
    /// `k` entries at `tokens` tokens per step: `None` leaves it to the flop model.
    pub fn resolve<B: Backend + Clone>(
        &self,
        backend: &B,
        out: usize,
        inp: usize,
        tokens: usize,
        k: usize,
    ) -> Result<Option<Formulation>> {
        match *self {
            FormulationChoice::FlopModel => Ok(None),
            FormulationChoice::Measure => Formulation::measure(backend, out, inp, tokens, k).map(Some),
            FormulationChoice::Fixed(f) => Ok(Some(f)),
        }
    }
}

/// Construction options of a [`SparseGradLinear`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseGradConfig {
    pub keep: Keep,
    pub selection: Selection,
    /// `None`: [`Formulation::choose`] for `expected_tokens` on the CPU,
    /// [`Formulation::choose_priced`] on a backend with a device model (SparseByDense with a
    /// threshold above 0 always takes the transformed formulation, which it needs). Both
    /// formulations give the same results; they differ in flops and memory.
    /// [`SparseGradLinear::formulation`] says which one the layer took.
    pub formulation: Option<Formulation>,
    /// How a merged layer applies its step to `W`; `None`: [`MergedUpdate::choose`]. The
    /// sparse updates and [`MergedUpdate::Runs`] run in f32 only; the transformed formulation
    /// has no merged update and ignores this. All give the same `W` up to rounding;
    /// [`SparseGradLinear::merged_update`] says which one the layer took.
    pub merged_update: Option<MergedUpdate>,
    /// Tokens per step the cost model assumes when `formulation` is `None` (default 4096):
    /// set it to the real batch size in tokens, or set `formulation`.
    pub expected_tokens: usize,
    /// Adam: SparseAdam for `Wt` (its `weight_decay` is ignored, as in PyTorch) and AdamW
    /// for the bias. SGD: plain steps on both.
    pub optimizer: Optimizer,
    pub precision: Precision,
}

impl Default for SparseGradConfig {
    fn default() -> Self {
        SparseGradConfig {
            keep: Keep::default(),
            selection: Selection::Exact,
            formulation: None,
            merged_update: None,
            expected_tokens: 4096,
            optimizer: Optimizer::default(),
            precision: Precision::Full,
        }
    }
}

/// Counts from the last backward pass, for diagnostics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepGrads {
    /// Token rows that entered the weight-gradient product.
    pub rows_multiplied: usize,
    /// Output columns that entered it.
    pub cols_multiplied: usize,
    /// Entries kept.
    pub k: usize,
}

/// The trained weight in one of the two formulations, with a bf16 compute copy when the
/// layer runs in bf16.
enum Weight<B: Backend, F: Real> {
    Transformed { wt: B::Buf<F>, half: Option<B::Buf<bf16>> },
    Merged { w: B::Buf<F>, half: Option<B::Buf<bf16>> },
}

/// A linear layer `y = x W^T + b` trained with SparseGrad. See the module docs.
pub struct SparseGradLinear<B: Backend, F: Real = f32> {
    backend: B,
    out: usize,
    inp: usize,
    k: usize,
    cfg: SparseGradConfig,
    formulation: Formulation,
    /// Merged layers: how a step is applied to `W` ([`MergedUpdate::choose`]).
    update: Option<MergedUpdate>,
    group: String,
    /// The basis on the device, shared with the other layers of the group.
    basis_dev: Arc<DeviceBasis<B, F>>,
    weight: Weight<B, F>,
    bias: Option<B::Buf<F>>,
    bias_grad: Option<B::Buf<F>>,
    bias_moments: Option<Moments<B, F>>,
    /// SparseAdam state of `Wt`: dense, one entry per weight, as PyTorch keeps it.
    moments: Option<Moments<B, F>>,
    step: u64,
    grad: Coo<B, F>,
    grad_ready: bool,
    /// The last backward left `dWt` in a caller's buffer and its selection to the caller
    /// ([`Selecting::Defer`]).
    selection_pending: bool,
    /// Tokens of the last forward whose activations are saved.
    saved_tokens: Option<usize>,
    stats: StepGrads,
    ws: Workspace<B, F>,
    /// Identifies `(P, Q)` in adapters.
    basis_fingerprint: u64,
    /// Under SGD, nothing records which entries moved; this marks them (a COO of ones
    /// scattered after each step) so adapters know what to save.
    sgd_mask: Option<(B::Buf<F>, Coo<B, F>)>,
}

fn transpose<F: Copy>(m: &[F], rows: usize, cols: usize) -> Vec<F> {
    let mut t = Vec::with_capacity(m.len());
    for c in 0..cols {
        t.extend((0..rows).map(|r| m[r * cols + c]));
    }
    t
}

impl<B: Backend + Clone, F: Real> SparseGradLinear<B, F> {
    /// Builds the layer from a dense `weight` `(out, in)`, an optional `bias` `(out)` and the
    /// basis of its group.
    pub fn new(backend: &B, weight: &[F], bias: Option<&[F]>, basis: &Basis, cfg: SparseGradConfig) -> Result<Self> {
        let (out, inp) = basis.shape();
        check_weight_and_bias("SparseGradLinear::new", weight, bias, out, inp)
            .map_err(|e| e.context(&format!("layer of basis `{}`", basis.group())))?;
        basis.check_quick()?;
        cfg.optimizer.validate()?;
        let k = cfg.keep.resolve(out * inp)?;
        let thresholded = match cfg.selection {
            Selection::Exact => false,
            Selection::SparseByDense { threshold } => {
                if !(0.0..=1.0).contains(&threshold) {
                    return Err(Error::invalid(
                        "SparseGradLinear::new",
                        format!("SparseByDense threshold {threshold} outside [0, 1]"),
                    ));
                }
                threshold > 0.0
            }
        };
        // A backend with a device model (a GPU) prices the forms at its rates; the CPU counts flops.
        let priced = backend.device_model().map(|model| (model, GemmMode::of(cfg.precision, backend.tf32())));
        let formulation = match cfg.formulation {
            Some(Formulation::Merged) if thresholded => {
                return Err(Error::invalid(
                    "SparseGradLinear::new",
                    "SparseByDense with a threshold above 0 thresholds gt = g P, which only the transformed formulation computes",
                ))
            }
            Some(f) => f,
            None if thresholded => Formulation::Transformed,
            None => match &priced {
                Some((model, mode)) => {
                    Formulation::choose_priced(out, inp, cfg.expected_tokens, k, cfg.precision, *mode, model)
                }
                None => Formulation::choose(out, inp, cfg.expected_tokens, k),
            },
        };
        let half = cfg.precision == Precision::Bf16;
        let fingerprint = basis.fingerprint();
        let update = match (formulation, cfg.merged_update) {
            (Formulation::Transformed, _) => None,
            (Formulation::Merged, Some(u)) => {
                if half && u != MergedUpdate::Dense {
                    return Err(Error::invalid(
                        "SparseGradLinear::new",
                        format!("the merged update {u:?} runs in f32 only; bf16 layers update by Dense"),
                    ));
                }
                Some(u)
            }
            (Formulation::Merged, None) => Some(MergedUpdate::choose(
                out,
                inp,
                k,
                cfg.precision,
                priced.as_ref().map(|(model, mode)| (model, *mode)),
            )),
        };
        let layout = BasisLayout::of(cfg.precision, update);
        let device = DeviceBasis::shared(backend, basis, layout)?;
        let weight_state = match formulation {
            Formulation::Transformed => {
                // Wt = (P^T W) Q on the backend, in `F` whatever the operand precision (and
                // exact f32 under TF32: this sets the master weight).
                let w = backend.upload(weight)?;
                let mut tmp = backend.alloc::<F>(out * inp)?;
                let mut wt = backend.alloc::<F>(out * inp)?;
                let mut product = |p: &B::Buf<F>, q: &B::Buf<F>| -> Result<()> {
                    backend.gemm(&Gemm::tn(out, inp, out).exact_f32(), p, &w, &mut tmp)?;
                    backend.gemm(&Gemm::nn(out, inp, inp).exact_f32(), &tmp, q, &mut wt)
                };
                match (device.p.as_ref(), device.q.as_ref()) {
                    (OperandRef::Full(p), OperandRef::Full(q)) => product(p, q)?,
                    _ => product(&backend.upload(&to_f::<F>(basis.p()))?, &backend.upload(&to_f::<F>(basis.q()))?)?,
                }
                let half = if half { Some(backend.alloc(out * inp)?) } else { None };
                Weight::Transformed { wt, half }
            }
            Formulation::Merged => {
                let w = backend.upload(weight)?;
                let half = if half { Some(backend.alloc(out * inp)?) } else { None };
                Weight::Merged { w, half }
            }
        };
        let bias_buf = bias.map(|b| backend.upload(b)).transpose()?;
        let mut layer = SparseGradLinear {
            backend: backend.clone(),
            out,
            inp,
            k,
            cfg,
            formulation,
            update,
            group: basis.group().to_string(),
            basis_dev: device,
            weight: weight_state,
            bias: bias_buf,
            bias_grad: if bias.is_some() { Some(backend.alloc(out)?) } else { None },
            bias_moments: if bias.is_some() { Moments::for_optimizer(backend, &cfg.optimizer, out)? } else { None },
            moments: Moments::for_optimizer(backend, &cfg.optimizer, out * inp)?,
            step: 0,
            grad: Coo::with_capacity(backend, k, (out, inp))?,
            grad_ready: false,
            selection_pending: false,
            saved_tokens: None,
            stats: StepGrads::default(),
            ws: Workspace::new(backend, formulation, update, cfg.selection, cfg.precision, out, inp, k)?,
            basis_fingerprint: fingerprint,
            sgd_mask: match cfg.optimizer {
                Optimizer::Sgd { .. } => {
                    let mut ones = Coo::with_capacity(backend, k, (out, inp))?;
                    backend.fill(&mut ones.values, k, F::ONE)?;
                    Some((backend.alloc(out * inp)?, ones))
                }
                Optimizer::Adam(_) => None,
            },
        };
        layer.refresh_half_weight()?;
        Ok(layer)
    }

    pub fn out_features(&self) -> usize {
        self.out
    }
    pub fn in_features(&self) -> usize {
        self.inp
    }
    /// Entries kept per step.
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn formulation(&self) -> Formulation {
        self.formulation
    }
    /// How the layer applies a step to `W` (`None` in the transformed formulation).
    pub fn merged_update(&self) -> Option<MergedUpdate> {
        self.update
    }
    pub fn config(&self) -> &SparseGradConfig {
        &self.cfg
    }
    /// The basis group this layer belongs to.
    pub fn group(&self) -> &str {
        &self.group
    }
    /// Optimizer steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }
    /// Trainable parameters: the k entries updated per step plus the bias (the paper's count).
    pub fn trainable_parameters(&self) -> usize {
        self.k + if self.bias.is_some() { self.out } else { 0 }
    }
    /// Counts from the last backward pass.
    pub fn last_stats(&self) -> StepGrads {
        self.stats
    }
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// `y = x W^T + b` for `tokens` rows of `x` `(tokens, in)`, into `y` `(tokens, out)`.
    /// Saves what backward needs.
    pub fn forward(&mut self, x: &B::Buf<F>, tokens: usize, y: &mut B::Buf<F>) -> Result<()> {
        let (out, inp) = (self.out, self.inp);
        check_forward(&self.backend, "SparseGradLinear::forward", x, y, tokens, (out, inp))?;
        self.saved_tokens = None;
        self.ws.ensure_tokens(&self.backend, tokens)?;
        self.with_scratch(tokens, |l| l.forward_borrowed(x, tokens, y))?;
        self.saved_tokens = Some(tokens);
        Ok(())
    }

    /// [`Self::forward`] with the scratch borrowed.
    fn forward_borrowed(&mut self, x: &B::Buf<F>, tokens: usize, y: &mut B::Buf<F>) -> Result<()> {
        let (out, inp) = (self.out, self.inp);
        let be = &self.backend;
        let ws = &mut self.ws;
        match &self.weight {
            Weight::Transformed { wt, half } => {
                // xt = x Q (saved), h = xt Wt^T, y = h P^T
                let x_op = stage_checked(be, x, ws.in_half.as_mut(), tokens * inp, INPUT_X)?;
                // Products kept as operands come out of their GEMMs in the operand precision.
                ws.saved.store_product(be, &Gemm::nn(tokens, inp, inp), x_op, self.basis_dev.q.as_ref())?;
                let h = Gemm::nt(tokens, out, inp);
                let h_op =
                    mm_operand(be, &h, ws.saved.as_ref(), weight_ref(wt, half), &mut ws.tmp_out, ws.out_half.as_mut())?;
                mm(be, &Gemm::nt(tokens, out, out), h_op, self.basis_dev.p.as_ref(), y)?;
            }
            Weight::Merged { w, half } => {
                ws.saved.store_checked(be, x, tokens * inp, INPUT_X)?;
                mm(be, &Gemm::nt(tokens, out, inp), ws.saved.as_ref(), weight_ref(w, half), y)?;
            }
        }
        if let Some(b) = &self.bias {
            be.add_bias(y, b, tokens, out)?;
        }
        Ok(())
    }

    /// Runs `f` with the scratch (own or shared) borrowed into `self.ws`, grown for
    /// `tokens` rows, and gives it back whatever `f` returns.
    fn with_scratch<R>(&mut self, tokens: usize, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        let shared = Arc::clone(&self.ws.shared);
        // A panic while borrowed leaves empty buffers behind, which the next call regrows.
        let mut scratch = shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.ws.swap(&mut scratch);
        let r = self.ws.grow_borrowed(&self.backend, tokens).and_then(|_| f(self));
        self.ws.swap(&mut scratch);
        r
    }

    /// Borrows `scratch` for every later call instead of the layer's own: the layers of a
    /// model share one set of SparseGrad scratch sized for the largest of them (see
    /// [`SparseGradScratch`]). Fails, changing nothing, on a scratch of another precision.
    pub fn share_scratch(&mut self, scratch: &SharedScratch<B, F>) -> Result<()> {
        self.ws.share(scratch)
    }

    /// What this layer borrows of its scratch for a call on `tokens` rows.
    pub fn scratch_lengths(&self, tokens: usize) -> Result<ScratchLengths> {
        self.ws.needs(tokens)
    }

    /// Backward from `g = dL/dy` `(tokens, out)`: writes `dx = g W` (exact) into `dx` if
    /// given, computes the bias gradient and the COO gradient of `Wt` (see [`Self::grad`]).
    pub fn backward(&mut self, g: &B::Buf<F>, tokens: usize, dx: Option<&mut B::Buf<F>>) -> Result<()> {
        self.backward_grad(GradY::Raw(g), tokens, dx, Selecting::Now)
    }

    /// Whether [`Self::backward_grad`] takes `g` as only a bf16 operand: not with a bias
    /// (its gradient sums `g` in `F`) nor under SparseByDense (which reads `g`'s values).
    pub(crate) fn takes_half_grad(&self) -> bool {
        self.bias.is_none() && self.cfg.selection == Selection::Exact
    }

    /// Whether a backward can leave its selection to the caller ([`Selecting::Defer`]):
    /// on a backend that batches launches (the GPU), when the selection is from the full
    /// `dWt` (Exact, or SparseByDense as a captured step runs it).
    pub(crate) fn defers_selection(&self) -> bool {
        self.backend.supports_capture()
    }

    /// [`Self::backward`] from `g` as [`GradY`] gives it, its selection as `sel` says.
    pub(crate) fn backward_grad(
        &mut self,
        g: GradY<'_, B, F>,
        tokens: usize,
        dx: Option<&mut B::Buf<F>>,
        sel: Selecting<'_, B, F>,
    ) -> Result<()> {
        const OP: &str = "SparseGradLinear::backward";
        let (out, inp) = (self.out, self.inp);
        check_backward(&self.backend, OP, self.saved_tokens, g, dx.as_deref(), tokens, (out, inp))?;
        if !self.takes_half_grad() {
            g.require_full(OP)?;
        }
        if let Selecting::Defer(buf) = &sel {
            if !self.defers_selection() {
                return Err(Error::invalid(OP, "this layer's selection cannot be deferred on this backend"));
            }
            let have = self.backend.len(buf);
            if have < out * inp {
                return Err(Error::shape(OP, "selection buffer", format!("{out} x {inp} values"), have));
            }
        }
        let defer = matches!(sel, Selecting::Defer(_));
        self.grad_ready = false;
        self.selection_pending = false;
        self.with_scratch(tokens, |l| match l.formulation {
            Formulation::Transformed => l.backward_transformed(g, tokens, dx, sel),
            Formulation::Merged => l.backward_merged(g, tokens, dx, sel),
        })?;
        if let (Some(db), true) = (self.bias_grad.as_mut(), self.bias.is_some()) {
            self.backend.bias_grad(g.require_full(OP)?, tokens, out, db, F::ZERO)?;
        }
        self.selection_pending = defer;
        self.grad_ready = !defer;
        Ok(())
    }

    /// The selection a deferred backward left pending, from `dwt`, the buffer it was given
    /// ([`Selecting::Defer`]); run it, then call [`Self::selection_done`]. `None` when
    /// nothing is pending.
    pub(crate) fn pending_selection<'a>(&'a mut self, dwt: &'a B::Buf<F>) -> Option<TopkJob<'a, B, F>> {
        let (out, inp) = (self.out, self.inp);
        self.selection_pending.then_some(TopkJob {
            m: dwt,
            rows: out,
            cols: inp,
            k: self.k,
            maps: IndexMaps { row_map: None, col_map: None, full_shape: (out, inp) },
            ws: &mut self.ws.topk,
            out: &mut self.grad,
        })
    }

    /// The pending selection ran: the gradient is ready for [`Self::step`].
    pub(crate) fn selection_done(&mut self) {
        if self.selection_pending {
            self.selection_pending = false;
            self.grad_ready = true;
        }
    }

    /// The COO gradient of `Wt` from the last backward (`k` entries, sorted).
    pub fn grad(&self) -> Result<&Coo<B, F>> {
        if !self.grad_ready {
            return Err(Error::invalid("SparseGradLinear::grad", "no gradient: call backward first"));
        }
        Ok(&self.grad)
    }

    /// The gradient on the host.
    pub fn grad_host(&self) -> Result<HostCoo<F>> {
        self.grad()?.to_host(&self.backend)
    }

    /// The bias gradient from the last backward, if the layer has a bias.
    pub fn bias_grad_host(&self) -> Result<Option<Vec<F>>> {
        if !self.grad_ready {
            return Err(Error::invalid("SparseGradLinear::bias_grad_host", "no gradient: call backward first"));
        }
        self.bias_grad.as_ref().map(|b| self.backend.download(b, self.out)).transpose()
    }

    pub fn bias_host(&self) -> Result<Option<Vec<F>>> {
        self.bias.as_ref().map(|b| self.backend.download(b, self.out)).transpose()
    }

    /// `Wt = P^T W Q` `(out, in)`.
    pub fn weight_transformed(&self) -> Result<Vec<F>> {
        match &self.weight {
            Weight::Transformed { wt, .. } => self.backend.download(wt, self.out * self.inp),
            Weight::Merged { w, .. } => {
                let wt = self.basis_change(w, true)?;
                self.backend.download(&wt, self.out * self.inp)
            }
        }
    }

    /// The dense weight `W = P Wt Q^T` `(out, in)`: what to load into any framework.
    pub fn merged_weight(&self) -> Result<Vec<F>> {
        match &self.weight {
            Weight::Merged { w, .. } => self.backend.download(w, self.out * self.inp),
            Weight::Transformed { wt, .. } => {
                let w = self.basis_change(wt, false)?;
                self.backend.download(&w, self.out * self.inp)
            }
        }
    }

    /// `P^T M Q` (`into_basis`) or `P M Q^T` for an `(out, in)` matrix `m`, on the layer's
    /// backend in `F` (exact f32 under TF32), with the basis in `F` (the f32 one when the
    /// layer holds it in bf16).
    /// Not on the training path: it allocates its result and scratch.
    pub(crate) fn basis_change(&self, m: &B::Buf<F>, into_basis: bool) -> Result<B::Buf<F>> {
        let (be, out, inp) = (&self.backend, self.out, self.inp);
        let mut tmp = be.alloc::<F>(out * inp)?;
        let mut res = be.alloc::<F>(out * inp)?;
        // The device basis may hold P^T or Q^T (see `BasisLayout`); the exact copies do not.
        let mut product = |p: &B::Buf<F>, q: &B::Buf<F>, p_t: bool, q_t: bool| -> Result<()> {
            let (sp, sq) = if into_basis {
                (Gemm::new(!p_t, false, out, inp, out), Gemm::new(false, q_t, out, inp, inp))
            } else {
                (Gemm::new(p_t, false, out, inp, out), Gemm::new(false, !q_t, out, inp, inp))
            };
            let (sp, sq) = (sp.exact_f32(), sq.exact_f32());
            be.gemm(&sp, p, m, &mut tmp)?;
            be.gemm(&sq, &tmp, q, &mut res)
        };
        let dev = &self.basis_dev;
        match (dev.p.as_ref(), dev.q.as_ref(), &dev.exact) {
            (OperandRef::Full(p), OperandRef::Full(q), _) => product(p, q, dev.p_transposed, dev.q_transposed)?,
            (_, _, Some((p, q))) => product(&be.upload(&to_f::<F>(p))?, &be.upload(&to_f::<F>(q))?, false, false)?,
            _ => return Err(Error::invalid("SparseGradLinear::basis_change", "the layer holds no basis in F")),
        }
        Ok(res)
    }

    fn refresh_half_weight(&mut self) -> Result<()> {
        let n = self.out * self.inp;
        match &mut self.weight {
            Weight::Transformed { wt: full, half: Some(half) } | Weight::Merged { w: full, half: Some(half) } => {
                self.backend.cast_to_bf16(full, half, n)
            }
            _ => Ok(()),
        }
    }
}

/// The weight as a GEMM operand: its bf16 compute copy if there is one.
fn weight_ref<'a, B: Backend, F: Real>(full: &'a B::Buf<F>, half: &'a Option<B::Buf<bf16>>) -> OperandRef<'a, B, F> {
    half.as_ref().map_or(OperandRef::Full(full), OperandRef::Half)
}
