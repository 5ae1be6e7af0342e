//! Export and import of a SparseGradLinear's trained state (adapters, resume).

use super::{SparseGradLinear, Weight};
use crate::backend::Backend;
use crate::error::Result;
use crate::linear::state::{mismatch, touched_indices, DenseParam, LayerState, SparseParam};
use crate::scalar::Real;

impl<B: Backend + Clone, F: Real> SparseGradLinear<B, F> {
    /// The changed entries of `Wt` (current values), their moments, the bias and the step.
    pub fn export_state(&self) -> Result<LayerState<F>> {
        let (be, n) = (&self.backend, self.out * self.inp);
        let moments = self.moments.as_ref().map(|m| m.to_host(be, n)).transpose()?;
        let mask = self.sgd_mask.as_ref().map(|(m, _)| be.download(m, n)).transpose()?;
        let indices = touched_indices(moments.as_ref().map(|(_, v)| v.as_slice()), mask.as_deref());
        let wt = self.weight_transformed()?;
        let bias = self
            .bias
            .as_ref()
            .map(|b| DenseParam::download(be, b, self.bias_moments.as_ref(), self.out))
            .transpose()?;
        Ok(LayerState::SparseGrad {
            weight_transformed: SparseParam::gather((self.out, self.inp), indices, &wt, moments),
            bias,
            step: self.step,
            basis_group: self.group.clone(),
            basis_fingerprint: self.basis_fingerprint,
        })
    }

    /// Checks that `state` fits this layer (method, shape, basis, optimizer, bias).
    pub fn check_state(&self, state: &LayerState<F>) -> Result<()> {
        let LayerState::SparseGrad { weight_transformed: st, bias, basis_group, basis_fingerprint, .. } = state else {
            return Err(mismatch(
                "adapter",
                format!("a {} state cannot be loaded into a SparseGrad layer", state.method()),
            ));
        };
        let (out, inp) = (self.out, self.inp);
        if st.shape != (out, inp) {
            return Err(mismatch(
                "adapter",
                format!("weight shape {:?} does not match the layer's {out}x{inp}", st.shape),
            ));
        }
        if *basis_fingerprint != self.basis_fingerprint {
            return Err(mismatch(
                "adapter",
                format!("trained in basis `{basis_group}` with another (P, Q) than this layer's `{}`", self.group),
            ));
        }
        st.validate()?;
        if self.moments.is_some() != st.exp_avg.is_some() {
            return Err(mismatch("adapter", "optimizer state does not match the layer's optimizer (Adam vs SGD)"));
        }
        if let Some(b) = bias {
            if self.bias.is_none() || b.values.len() != out || self.bias_moments.is_some() != b.exp_avg.is_some() {
                return Err(mismatch("adapter", "bias or its optimizer state does not match the layer"));
            }
        } else if self.bias.is_some() {
            return Err(mismatch("adapter", "the layer has a bias the adapter lacks"));
        }
        Ok(())
    }

    /// Applies an exported state to a layer freshly built from the same base weight and
    /// basis. Fails, leaving the layer unchanged, on another shape, basis or method.
    pub fn import_state(&mut self, state: &LayerState<F>) -> Result<()> {
        self.check_state(state)?;
        let LayerState::SparseGrad { weight_transformed: st, bias, step, .. } = state else {
            return Err(mismatch("adapter", "not a SparseGrad state"));
        };
        let be = self.backend.clone();
        let n = self.out * self.inp;
        // Merged: W += P (Wt_new - Wt_base)|entries Q^T, once.
        let merged = match &self.weight {
            Weight::Merged { w, .. } => {
                let w_host = be.download(w, n)?;
                let wt_base = be.download(&self.basis_change(w, true)?, n)?;
                let mut d = vec![F::ZERO; n];
                for (e, &i) in st.indices.iter().enumerate() {
                    d[i as usize] = st.values[e] - wt_base[i as usize];
                }
                let change = be.download(&self.basis_change(&be.upload(&d)?, false)?, n)?;
                Some(w_host.iter().zip(&change).map(|(&a, &b)| a + b).collect::<Vec<F>>())
            }
            Weight::Transformed { .. } => None,
        };
        match &mut self.weight {
            Weight::Transformed { wt, .. } => {
                let mut host = be.download(wt, n)?;
                for (e, &i) in st.indices.iter().enumerate() {
                    host[i as usize] = st.values[e];
                }
                be.upload_into(&host, wt)?;
            }
            Weight::Merged { w, .. } => be.upload_into(merged.as_deref().unwrap_or_default(), w)?,
        }
        if let (Some(m), Some((dm, dv))) = (self.moments.as_mut(), st.scatter_moments()) {
            m.set_from_host(&be, &dm, &dv)?;
        }
        if let Some((mask, _)) = self.sgd_mask.as_mut() {
            let mut host = vec![F::ZERO; n];
            st.indices.iter().for_each(|&i| host[i as usize] = F::ONE);
            be.upload_into(&host, mask)?;
        }
        if let (Some(b), Some(dst)) = (bias, self.bias.as_mut()) {
            b.upload(&be, dst, self.bias_moments.as_mut())?;
        }
        for m in [self.moments.as_mut(), self.bias_moments.as_mut()].into_iter().flatten() {
            m.set_steps(&be, *step)?;
        }
        self.step = *step;
        self.grad_ready = false;
        self.refresh_half_weight()
    }
}
