//! What a trained layer adds to its base weight, plus the optimizer state needed to
//! resume training exactly: the in-memory form of an adapter (see [`crate::adapter`]).

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::optim::Moments;
use crate::scalar::Real;

/// A dense trained tensor with its Adam moments (absent under SGD).
#[derive(Clone, Debug, PartialEq)]
pub struct DenseParam<F> {
    pub values: Vec<F>,
    pub exp_avg: Option<Vec<F>>,
    pub exp_avg_sq: Option<Vec<F>>,
}

/// Changed entries of a `shape` matrix, ascending linear indices, the entries' current
/// values (replacing the base's) and their Adam moments.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseParam<F> {
    pub shape: (usize, usize),
    pub indices: Vec<u64>,
    pub values: Vec<F>,
    pub exp_avg: Option<Vec<F>>,
    pub exp_avg_sq: Option<Vec<F>>,
}

impl<F: Real> SparseParam<F> {
    /// Checks lengths, bounds and strict ascending order.
    pub fn validate(&self) -> Result<()> {
        let n = self.indices.len();
        let total = (self.shape.0 * self.shape.1) as u64;
        let lens_ok = self.values.len() == n
            && self.exp_avg.as_ref().is_none_or(|m| m.len() == n)
            && self.exp_avg_sq.as_ref().is_none_or(|v| v.len() == n);
        if !lens_ok {
            return Err(Error::shape("adapter", "indices/values/moments lengths", n, self.values.len()));
        }
        if self.indices.windows(2).any(|w| w[0] >= w[1]) || self.indices.last().is_some_and(|&l| l >= total) {
            return Err(Error::invalid("adapter", format!("indices must be strictly increasing and below {total}")));
        }
        Ok(())
    }

    /// Picks the entries `indices` of dense `(values, exp_avg, exp_avg_sq)`.
    pub(crate) fn gather(
        shape: (usize, usize),
        indices: Vec<u64>,
        values: &[F],
        moments: Option<(Vec<F>, Vec<F>)>,
    ) -> Self {
        let pick = |v: &[F]| indices.iter().map(|&i| v[i as usize]).collect::<Vec<F>>();
        let (exp_avg, exp_avg_sq) = match moments {
            Some((m, v)) => (Some(pick(&m)), Some(pick(&v))),
            None => (None, None),
        };
        SparseParam { shape, values: pick(values), exp_avg, exp_avg_sq, indices }
    }

    /// Writes the moments into dense zeroed vectors of the full size.
    pub(crate) fn scatter_moments(&self) -> Option<(Vec<F>, Vec<F>)> {
        let (m, v) = (self.exp_avg.as_ref()?, self.exp_avg_sq.as_ref()?);
        let total = self.shape.0 * self.shape.1;
        let (mut dm, mut dv) = (vec![F::ZERO; total], vec![F::ZERO; total]);
        for (e, &i) in self.indices.iter().enumerate() {
            dm[i as usize] = m[e];
            dv[i as usize] = v[e];
        }
        Some((dm, dv))
    }
}

/// A layer's trained state, by method.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerState<F> {
    /// Nothing trains (also the preliminary phase's collecting layers).
    Frozen,
    Full {
        weight: DenseParam<F>,
        bias: Option<DenseParam<F>>,
        step: u64,
    },
    MeProp {
        weight: SparseParam<F>,
        bias: Option<DenseParam<F>>,
        step: u64,
    },
    /// Entries of `Wt = P^T W Q`; `basis_fingerprint` identifies `(P, Q)`.
    SparseGrad {
        weight_transformed: SparseParam<F>,
        bias: Option<DenseParam<F>>,
        step: u64,
        basis_group: String,
        basis_fingerprint: u64,
    },
    Lora {
        a: DenseParam<F>,
        b: DenseParam<F>,
        rank: usize,
        alpha: f32,
        step: u64,
    },
}

impl<F> LayerState<F> {
    pub fn method(&self) -> &'static str {
        match self {
            LayerState::Frozen => "frozen",
            LayerState::Full { .. } => "full",
            LayerState::MeProp { .. } => "meprop",
            LayerState::SparseGrad { .. } => "sparsegrad",
            LayerState::Lora { .. } => "lora",
        }
    }
}

/// Entries that changed: under Adam those with a nonzero second moment (an entry moves
/// only after a nonzero gradient, which makes `exp_avg_sq > 0` forever after); under SGD
/// those the layer marked.
pub(crate) fn touched_indices<F: Real>(exp_avg_sq: Option<&[F]>, sgd_mask: Option<&[F]>) -> Vec<u64> {
    let mask = exp_avg_sq.or(sgd_mask).unwrap_or(&[]);
    mask.iter().enumerate().filter(|(_, &v)| v != F::ZERO).map(|(i, _)| i as u64).collect()
}

impl<F: Real> DenseParam<F> {
    /// The first `len` values of `values` and of the moments, if the parameter has them.
    pub(crate) fn download<B: Backend>(
        be: &B,
        values: &B::Buf<F>,
        moments: Option<&Moments<B, F>>,
        len: usize,
    ) -> Result<Self> {
        let (exp_avg, exp_avg_sq) = moments.map(|m| m.to_host(be, len)).transpose()?.unzip();
        Ok(DenseParam { values: be.download(values, len)?, exp_avg, exp_avg_sq })
    }

    /// Writes the values and, where both sides have them, the moments back.
    pub(crate) fn upload<B: Backend>(
        &self,
        be: &B,
        values: &mut B::Buf<F>,
        moments: Option<&mut Moments<B, F>>,
    ) -> Result<()> {
        be.upload_into(&self.values, values)?;
        if let (Some(m), Some(em), Some(ev)) = (moments, &self.exp_avg, &self.exp_avg_sq) {
            m.set_from_host(be, em, ev)?;
        }
        Ok(())
    }
}

pub(crate) fn mismatch(what: &str, msg: impl Into<String>) -> Error {
    Error::Incompatible { what: what.to_string(), msg: msg.into() }
}
