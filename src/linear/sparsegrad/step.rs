//! Backward passes of both formulations and the optimizer step with the merged update.

use super::workspace::Workspace;
use super::{weight_ref, Formulation, MergedUpdate, Selection, SparseGradLinear, StepGrads, Weight};
use crate::backend::operand::{mm, mm_operand, stage, OperandRef};
use crate::backend::{AdamwJob, Backend, Coo, Gemm, IndexMaps, OutBuf, SparseAdamJob, TopkJob};
use crate::error::{Error, Result};
use crate::linear::GradY;
use crate::optim::{adamw_job, dense_step, missing_moments, sparse_adam_job, sparse_step, Optimizer};
use crate::scalar::Real;

/// What a backward does with `dWt`, its top-k selection's matrix.
pub(crate) enum Selecting<'a, B: Backend, F: Real> {
    /// Select into the layer's COO gradient at once.
    Now,
    /// Write `dWt` (`out * in`) into this buffer and leave its selection to the caller,
    /// who runs it in one batch with others ([`SparseGradLinear::pending_selection`]). Only
    /// where [`SparseGradLinear::defers_selection`].
    Defer(&'a mut B::Buf<F>),
    /// Select at once, in one batch with these selections other layers left pending.
    With(Vec<TopkJob<'a, B, F>>),
}

impl<B: Backend, F: Real> Selecting<'_, B, F> {
    /// Where the product `dWt` goes: the caller's buffer, or the layer's scratch.
    fn target<'b>(&'b mut self, scratch: &'b mut B::Buf<F>) -> &'b mut B::Buf<F> {
        match self {
            Selecting::Defer(buf) => buf,
            _ => scratch,
        }
    }

    /// Selects from `m`, the layer's scratch (the block `rows x cols`, placed by `maps`),
    /// into `grad` as this says: at once, in a batch with the pending jobs, or not at all
    /// (deferred: the product went to the caller's buffer instead).
    #[allow(clippy::too_many_arguments)]
    fn select(
        self,
        be: &B,
        m: &B::Buf<F>,
        rows: usize,
        cols: usize,
        k: usize,
        maps: IndexMaps<'_, B>,
        ws: &mut B::TopkWorkspace,
        grad: &mut Coo<B, F>,
    ) -> Result<()> {
        match self {
            Selecting::Now => be.topk_coo(m, rows, cols, k, &maps, ws, grad),
            Selecting::Defer(_) if maps.row_map.is_none() && maps.col_map.is_none() => Ok(()),
            Selecting::Defer(_) => {
                Err(Error::invalid("SparseGradLinear::backward", "a compacted selection cannot be deferred"))
            }
            Selecting::With(mut pending) => {
                let mut jobs: Vec<TopkJob<'_, B, F>> = pending.iter_mut().map(|j| j.reborrow()).collect();
                jobs.push(TopkJob { m, rows, cols, k, maps, ws, out: grad });
                be.topk_coo_batch(&mut jobs)
            }
        }
    }
}

impl<B: Backend + Clone, F: Real> SparseGradLinear<B, F> {
    /// `gt = g P`; `dx = (gt Wt) Q^T`; `dWt = gt^T xt` (Exact) or the SparseByDense block.
    pub(super) fn backward_transformed(
        &mut self,
        g: GradY<'_, B, F>,
        tokens: usize,
        dx: Option<&mut B::Buf<F>>,
        mut sel: Selecting<'_, B, F>,
    ) -> Result<()> {
        let (out, inp, k) = (self.out, self.inp, self.k);
        let be = &self.backend;
        let ws = &mut self.ws;
        let Weight::Transformed { wt, half } = &self.weight else {
            return Err(Error::invalid("backward", "layer is not in the transformed formulation"));
        };
        let g_op = g.operand(be, ws.g_half.as_mut(), tokens * out)?;
        // From here `out_half` holds gt in bf16 mode; `tmp_out` holds it in `F` in f32 mode,
        // and in bf16 mode under SparseByDense (which compacts it by its f32 values).
        {
            let gt = Gemm::nn(tokens, out, out);
            let p = self.basis_dev.p.as_ref();
            let gt_op = if self.cfg.selection == Selection::Exact {
                mm_operand(be, &gt, g_op, p, &mut ws.tmp_out, ws.out_half.as_mut())?
            } else {
                mm(be, &gt, g_op, p, &mut ws.tmp_out)?;
                stage(be, &ws.tmp_out, ws.out_half.as_mut(), tokens * out)?
            };
            if let Some(dx) = dx {
                let dxt = Gemm::nn(tokens, inp, out);
                let dxt_op = mm_operand(be, &dxt, gt_op, weight_ref(wt, half), &mut ws.tmp_in, ws.in_half.as_mut())?;
                mm(be, &Gemm::nt(tokens, inp, inp), dxt_op, self.basis_dev.q.as_ref(), dx)?;
            }
        }
        let full = IndexMaps { row_map: None, col_map: None, full_shape: (out, inp) };
        // A backend that captures its steps as graphs needs shapes that do not depend on the
        // data: there the entries below the threshold are zeroed instead of compacted away
        // (the same product and selection, at full size), and gt staged again.
        let selection = match self.cfg.selection {
            Selection::SparseByDense { threshold } if be.supports_capture() => {
                if threshold > 0.0 {
                    be.zero_below(&mut ws.tmp_out, tokens * out, F::from_f64(threshold as f64))?;
                    if let Some(h) = ws.out_half.as_mut() {
                        be.cast_to_bf16(&ws.tmp_out, h, tokens * out)?;
                    }
                }
                Selection::Exact
            }
            s => s,
        };
        let gt_op = match ws.out_half.as_ref() {
            Some(h) => OperandRef::Half(h),
            None => OperandRef::Full(&ws.tmp_out),
        };
        match selection {
            Selection::Exact => {
                mm(be, &Gemm::tn(out, inp, tokens), gt_op, ws.saved.as_ref(), sel.target(&mut ws.big_a))?;
                sel.select(be, &ws.big_a, out, inp, k, full, &mut ws.topk, &mut self.grad)?;
                self.stats = StepGrads { rows_multiplied: tokens, cols_multiplied: out, k };
            }
            Selection::SparseByDense { threshold } => {
                let nz = be.nonzero_rows_cols(
                    &ws.tmp_out,
                    tokens,
                    out,
                    F::from_f64(threshold as f64),
                    &mut ws.row_idx,
                    &mut ws.col_idx,
                )?;
                let (nr, nc) = (nz.n_rows, nz.n_cols);
                be.gather_block(
                    &ws.tmp_out,
                    tokens,
                    out,
                    &ws.row_idx,
                    nr,
                    &ws.col_idx,
                    nc,
                    nz.abs_threshold,
                    &mut ws.block,
                )?;
                ws.block_op.store(be, &ws.block, nr * nc)?;
                ws.saved.as_ref().gather_rows(be, tokens, inp, &ws.row_idx, nr, &mut ws.rows_op)?;
                // C = gt[rows, cols]^T xt[rows, :]; C(i, l) is entry (cols[i], l) of dWt.
                mm(be, &Gemm::tn(nc, inp, nr), ws.block_op.as_ref(), ws.rows_op.as_ref(), &mut ws.big_a)?;
                let maps = IndexMaps { row_map: Some(&ws.col_idx), col_map: None, full_shape: (out, inp) };
                sel.select(be, &ws.big_a, nc, inp, k, maps, &mut ws.topk, &mut self.grad)?;
                self.stats = StepGrads { rows_multiplied: nr, cols_multiplied: nc, k };
            }
        }
        Ok(())
    }

    /// `dx = g W`; `dWt = P^T (g^T x) Q` in the cheaper association order (Exact), skipping
    /// all-zero token rows under SparseByDense. In bf16 every product takes bf16 operands:
    /// `g P`, `x Q`, `dW` and `P^T dW` come out of their GEMMs in bf16 (one rounding, as a
    /// cast of the f32 product would give; `P^T dW` into a second buffer beside `dW`), so
    /// both orders make three GEMMs and no cast.
    pub(super) fn backward_merged(
        &mut self,
        g: GradY<'_, B, F>,
        tokens: usize,
        dx: Option<&mut B::Buf<F>>,
        mut sel: Selecting<'_, B, F>,
    ) -> Result<()> {
        let (out, inp, k) = (self.out, self.inp, self.k);
        let (p_t, q_t) = (self.basis_dev.p_transposed, self.basis_dev.q_transposed);
        let (p, q) = (self.basis_dev.p.as_ref(), self.basis_dev.q.as_ref());
        let be = &self.backend;
        let ws = &mut self.ws;
        let Weight::Merged { w, half } = &self.weight else {
            return Err(Error::invalid("backward", "layer is not in the merged formulation"));
        };
        let g_op = g.operand(be, ws.g_half.as_mut(), tokens * out)?;
        if let Some(dx) = dx {
            mm(be, &Gemm::nn(tokens, inp, out), g_op, weight_ref(w, half), dx)?;
        }
        let full = IndexMaps { row_map: None, col_map: None, full_shape: (out, inp) };
        // Products with the basis as stored (`p` may hold P^T, `q` Q^T; see `BasisLayout`).
        let times_p = |m: usize| Gemm::new(false, p_t, m, out, out);
        let p_t_times = |n: usize| Gemm::new(!p_t, false, out, n, out);
        let times_q = |m: usize| Gemm::new(false, q_t, m, inp, inp);
        let token_order = self.cfg.selection == Selection::Exact && Formulation::merged_token_order(out, inp, tokens);
        if token_order {
            // dWt = (g P)^T (x Q): cheaper than P^T (g^T x) Q at this token count.
            // The borrowed scratch holds the rotated g and x (`ScratchLengths::of`).
            let gt = mm_operand(be, &times_p(tokens), g_op, p, &mut ws.tmp_out, ws.out_half.as_mut())?;
            let xt = mm_operand(be, &times_q(tokens), ws.saved.as_ref(), q, &mut ws.tmp_in, ws.in_half.as_mut())?;
            mm(be, &Gemm::tn(out, inp, tokens), gt, xt, sel.target(&mut ws.big_a))?;
            sel.select(be, &ws.big_a, out, inp, k, full, &mut ws.topk, &mut self.grad)?;
            self.stats = StepGrads { rows_multiplied: tokens, cols_multiplied: out, k };
            return Ok(());
        }
        let big_b = ws.big_b.as_mut().ok_or_else(|| Error::invalid("backward", "merged workspace missing"))?;
        // dW = g^T x, over the token rows of g that hold a nonzero when SparseByDense.
        // Under a captured step (fixed shapes) every row enters the product: with threshold
        // 0 the rows left out are all-zero anyway, so the result is the same.
        let selection = if be.supports_capture() { Selection::Exact } else { self.cfg.selection };
        let (rows, dw) = match selection {
            Selection::Exact => {
                let saved = ws.saved.as_ref();
                let dw = mm_operand(be, &Gemm::tn(out, inp, tokens), g_op, saved, &mut ws.big_a, ws.big_half.as_mut())?;
                (tokens, dw)
            }
            Selection::SparseByDense { .. } => {
                // Construction only allows threshold 0 here: rows of g with a nonzero.
                let g = g.require_full("SparseGradLinear::backward")?;
                let nz = be.nonzero_rows_cols(g, tokens, out, F::ZERO, &mut ws.row_idx, &mut ws.col_idx)?;
                let nr = nz.n_rows;
                g_op.gather_rows(be, tokens, out, &ws.row_idx, nr, &mut ws.block_op)?;
                ws.saved.as_ref().gather_rows(be, tokens, inp, &ws.row_idx, nr, &mut ws.rows_op)?;
                mm(be, &Gemm::tn(out, inp, nr), ws.block_op.as_ref(), ws.rows_op.as_ref(), &mut ws.big_a)?;
                (nr, stage(be, &ws.big_a, ws.big_half.as_mut(), out * inp)?)
            }
        };
        // dWt = (P^T dW) Q.
        let ptdw = mm_operand(be, &p_t_times(inp), p, dw, big_b, ws.big_half_b.as_mut())?;
        mm(be, &times_q(out), ptdw, q, sel.target(&mut ws.big_a))?;
        sel.select(be, &ws.big_a, out, inp, k, full, &mut ws.topk, &mut self.grad)?;
        self.stats = StepGrads { rows_multiplied: rows, cols_multiplied: out, k };
        Ok(())
    }

    /// See [`crate::Linear::count_replayed_step`].
    pub(crate) fn count_replayed_step(&mut self) {
        self.step += 1;
    }

    /// One optimizer step on the gradient of the last backward: SparseAdam on `Wt` (in the
    /// merged form, its change `D` applied to `W` as `W += P D Q^T` by the layer's
    /// [`MergedUpdate`]), AdamW on the bias.
    pub fn step(&mut self) -> Result<()> {
        if !self.grad_ready {
            return Err(Error::invalid("SparseGradLinear::step", "no gradient: call backward first"));
        }
        self.with_scratch(0, |l| l.step_borrowed())
    }

    /// Whether [`Self::optimizer_jobs`] covers the step: the transformed form under Adam
    /// with no SGD mask (the merged form applies its change with GEMMs afterwards).
    pub(crate) fn batches_its_step(&self) -> bool {
        matches!(self.weight, Weight::Transformed { .. }) && matches!(self.cfg.optimizer, Optimizer::Adam(_))
    }

    /// Pushes the step's optimizer jobs (SparseAdam on `Wt`, AdamW on the bias) for a caller
    /// that runs them in batches with other layers', then calls
    /// [`Self::finish_batched_step`]. Returns false, pushing nothing, when the step is not
    /// only those ([`Self::batches_its_step`]); fails, pushing nothing, before a backward.
    pub(crate) fn optimizer_jobs<'a>(
        &'a mut self,
        adamw: &mut Vec<AdamwJob<'a, B, F>>,
        sparse: &mut Vec<SparseAdamJob<'a, B, F>>,
    ) -> Result<bool> {
        if !self.batches_its_step() {
            return Ok(false);
        }
        if !self.grad_ready {
            return Err(Error::invalid("SparseGradLinear::step", "no gradient: call backward first"));
        }
        let opt = self.cfg.optimizer;
        let Weight::Transformed { wt, half } = &mut self.weight else { return Ok(false) };
        sparse.extend(sparse_adam_job(&opt, &self.grad, wt, half.as_mut(), self.moments.as_mut())?);
        if let (Some(b), Some(db)) = (self.bias.as_mut(), self.bias_grad.as_ref()) {
            adamw.extend(adamw_job(&opt, b, None, db, self.bias_moments.as_mut(), self.out)?);
        }
        Ok(true)
    }

    /// The batches of [`Self::optimizer_jobs`] ran: counts the step.
    pub(crate) fn finish_batched_step(&mut self) {
        self.step += 1;
        self.grad_ready = false;
    }

    /// [`Self::step`] with the scratch borrowed.
    fn step_borrowed(&mut self) -> Result<()> {
        let opt = self.cfg.optimizer;
        let step = self.step + 1;
        let (out, inp) = (self.out, self.inp);
        let be = &self.backend;
        match &mut self.weight {
            Weight::Transformed { wt, half } => {
                sparse_step(be, &opt, &self.grad, Some(wt), half.as_mut(), None, self.moments.as_mut())?;
            }
            Weight::Merged { w, .. } => {
                let ws = &mut self.ws;
                let missing = || Error::invalid("step", "merged workspace missing");
                let (p, q) = (self.basis_dev.p.as_ref(), self.basis_dev.q.as_ref());
                let n = self.grad.len;
                match self.update.ok_or_else(missing)? {
                    MergedUpdate::SparseColumns => {
                        let (p, q) = (full(p)?, full(q)?);
                        let change_t = ws.change_t.as_mut().ok_or_else(missing)?;
                        // W += (P D) Q^T: D^T as COO (rows = columns of D), so `coo_dense_t`
                        // against P gives (P D)[:, c] in column c of `pd` for every c.
                        let change_values = Some(&mut change_t.values);
                        sparse_step(be, &opt, &self.grad, None, None, change_values, self.moments.as_mut())?;
                        be.copy(&self.grad.cols, &mut change_t.rows, n)?;
                        be.copy(&self.grad.rows, &mut change_t.cols, n)?;
                        change_t.len = n;
                        change_t.shape = (inp, out);
                        let pd = ws.big_b.as_mut().ok_or_else(missing)?;
                        be.coo_dense_t(change_t, &self.grad.cols, inp, p, out, pd)?;
                        be.gemm(&Gemm::nt(out, inp, inp).beta(1.0), pd, q, w)?;
                    }
                    MergedUpdate::SparseRows => {
                        let (p, q) = (full(p)?, full(q)?);
                        let change = ws.change.as_mut().ok_or_else(missing)?;
                        sparse_step(be, &opt, &self.grad, None, None, Some(&mut change.values), self.moments.as_mut())?;
                        let (unique_rows, slot) =
                            (ws.unique_rows.as_mut().ok_or_else(missing)?, ws.slot.as_mut().ok_or_else(missing)?);
                        let (et, pt_rows) =
                            (ws.et.as_mut().ok_or_else(missing)?, ws.pt_rows.as_mut().ok_or_else(missing)?);
                        be.copy(&self.grad.rows, &mut change.rows, n)?;
                        be.copy(&self.grad.cols, &mut change.cols, n)?;
                        change.len = n;
                        change.shape = (out, inp);
                        // W += P D Q^T = (P^T[rows, :])^T (Q D^T)^T over the touched rows only.
                        let touched = be.coo_compact_rows(change, unique_rows, slot)?;
                        be.coo_dense_t(change, slot, touched, q, inp, et)?;
                        be.gather_rows(p, out, out, unique_rows, touched, pt_rows)?;
                        let mut spec = Gemm::new(true, true, out, inp, touched).beta(1.0);
                        spec.lda = out;
                        spec.ldb = touched.max(1);
                        be.gemm(&spec, pt_rows, et, w)?;
                    }
                    MergedUpdate::Dense if matches!(opt, Optimizer::Adam(_)) => {
                        // SparseAdam stores its change straight into D: no per-entry change
                        // list and no densify pass.
                        let moments = self.moments.as_mut().ok_or_else(missing_moments)?;
                        let Optimizer::Adam(hp) = &opt else { return Err(missing_moments()) };
                        let (m, v, clock) = (&mut moments.exp_avg, &mut moments.exp_avg_sq, &mut moments.clock);
                        match &mut ws.big_half {
                            Some(d) => be.sparse_adam_densify(&self.grad, m, v, clock, hp, OutBuf::Half(d))?,
                            None => {
                                let d = ws.big_b.as_mut().ok_or_else(missing)?;
                                be.sparse_adam_densify(&self.grad, m, v, clock, hp, OutBuf::Full(d))?
                            }
                        }
                        apply_dense_change(be, p, q, ws, w, (out, inp))?;
                    }
                    update @ (MergedUpdate::Dense | MergedUpdate::Runs) => {
                        let delta = ws.delta.as_mut().ok_or_else(missing)?;
                        sparse_step(be, &opt, &self.grad, None, None, Some(delta), self.moments.as_mut())?;
                        // D is the kept entries with their changes: the gradient's values are
                        // spent, so its COO lends its indices (no copies); swapped back below
                        // so every step uses the same buffers (a captured step replays them).
                        std::mem::swap(&mut self.grad.values, delta);
                        let applied = apply_change(be, update, &self.grad, p, q, ws, w, (out, inp));
                        if let Some(delta) = ws.delta.as_mut() {
                            std::mem::swap(&mut self.grad.values, delta);
                        }
                        applied?;
                    }
                }
            }
        }
        if let (Some(b), Some(db)) = (&mut self.bias, &self.bias_grad) {
            dense_step(be, &opt, b, None, db, self.bias_moments.as_mut(), out)?;
        }
        if let Some((mask, ones)) = self.sgd_mask.as_mut() {
            be.copy(&self.grad.rows, &mut ones.rows, self.grad.len)?;
            be.copy(&self.grad.cols, &mut ones.cols, self.grad.len)?;
            ones.len = self.grad.len;
            be.coo_scatter_add(ones, F::ONE, mask)?;
        }
        self.step = step;
        self.grad_ready = false;
        // The optimizer kept the transformed weight's bf16 copy in step; a merged weight
        // changed densely and is rounded again.
        match self.weight {
            Weight::Merged { .. } => self.refresh_half_weight(),
            Weight::Transformed { .. } => Ok(()),
        }
    }

    /// The formulation this layer runs.
    pub fn is_merged(&self) -> bool {
        self.formulation == Formulation::Merged
    }
}

/// `W += P D Q^T` for the change `D` (`coo`, sorted) by [`MergedUpdate::Dense`] (`D` stored
/// densely in the operand precision, then `E = D Q^T` and `W += P E`; in bf16 `E` leaves its
/// GEMM in bf16) or [`MergedUpdate::Runs`] (`E = D Q^T` by `coo_mm` against the stored `Q^T`,
/// then `W += P E`). No atomics, and the same launches whatever `D` holds.
#[allow(clippy::too_many_arguments)]
fn apply_change<B: Backend, F: Real>(
    be: &B,
    update: MergedUpdate,
    coo: &Coo<B, F>,
    p: OperandRef<'_, B, F>,
    q: OperandRef<'_, B, F>,
    ws: &mut Workspace<B, F>,
    w: &mut B::Buf<F>,
    (out, inp): (usize, usize),
) -> Result<()> {
    let missing = || Error::invalid("step", "merged workspace missing");
    match update {
        MergedUpdate::Dense => {
            match &mut ws.big_half {
                Some(d) => be.coo_densify_bf16(coo, d)?,
                None => be.coo_densify(coo, ws.big_b.as_mut().ok_or_else(missing)?)?,
            }
            apply_dense_change(be, p, q, ws, w, (out, inp))
        }
        MergedUpdate::Runs => {
            let starts = ws.row_starts.as_mut().ok_or_else(missing)?;
            be.coo_mm(coo, starts, full(q)?, inp, &mut ws.big_a)?;
            let e_op = stage(be, &ws.big_a, ws.big_half.as_mut(), out * inp)?;
            mm(be, &Gemm::nn(out, inp, out).beta(1.0), p, e_op, w)
        }
        MergedUpdate::SparseRows | MergedUpdate::SparseColumns => {
            Err(Error::invalid("step", "a sparse update has no dense change to apply"))
        }
    }
}

/// `W += P D Q^T` for a change `D` already stored densely: in `big_half` (bf16 operands) or
/// else `big_b`. `E = D Q^T` then `W += P E`; in bf16 `E` leaves its GEMM in bf16.
fn apply_dense_change<B: Backend, F: Real>(
    be: &B,
    p: OperandRef<'_, B, F>,
    q: OperandRef<'_, B, F>,
    ws: &mut Workspace<B, F>,
    w: &mut B::Buf<F>,
    (out, inp): (usize, usize),
) -> Result<()> {
    // E = D Q^T (q holds Q here: `BasisLayout::Plain`).
    let spec = Gemm::nt(out, inp, inp);
    let e = &mut ws.big_a;
    match &ws.big_half {
        Some(d) => {
            // E's only use is as the next product's operand: with bf16 operands it leaves the
            // GEMM in bf16 (rounded once, as the cast would), no f32 pass.
            let e_op = mm_operand(be, &spec, OperandRef::Half(d), q, e, ws.big_half_b.as_mut())?;
            mm(be, &Gemm::nn(out, inp, out).beta(1.0), p, e_op, w)
        }
        None => {
            let d = ws.big_b.as_ref().ok_or_else(|| Error::invalid("step", "merged workspace missing"))?;
            mm(be, &spec, OperandRef::Full(d), q, e)?;
            mm(be, &Gemm::nn(out, inp, out).beta(1.0), p, OperandRef::Full(e), w)
        }
    }
}

/// The merged basis as a plain buffer: its update products need `F`.
fn full<'a, B: Backend, F: Real>(op: OperandRef<'a, B, F>) -> Result<&'a B::Buf<F>> {
    match op {
        OperandRef::Full(m) => Ok(m),
        OperandRef::Half(_) => Err(Error::invalid("step", "merged basis must be in full precision")),
    }
}
