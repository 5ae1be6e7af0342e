//! The basis of a SparseGrad layer on its backend, shared by every layer of the group:
//! the first layer that needs a copy of `P` and `Q` in a given layout uploads it, later
//! layers with the same basis on the same backend instance reuse it, and it is freed with
//! the last of them (the registry holds it weakly).

use super::{transpose, MergedUpdate};
use crate::backend::operand::{to_f, Operand};
use crate::backend::{Backend, Precision};
use crate::basis::Basis;
use crate::error::Result;
use crate::scalar::Real;
use std::any::{Any, TypeId};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// How a layer holds its basis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BasisLayout {
    /// `P` and `Q` in the operand precision: transformed layers, and merged layers updating
    /// by [`MergedUpdate::Dense`] or (f32) [`MergedUpdate::SparseColumns`].
    Plain(Precision),
    /// `P^T` (so a step can gather its rows) and `Q`, in `F`: merged layers updating by
    /// [`MergedUpdate::SparseRows`] (the CPU, f32).
    PTransposed,
    /// `P` and `Q^T` (whose rows `coo_mm` gathers), in `F`: merged layers updating by
    /// [`MergedUpdate::Runs`] (a GPU, f32).
    QTransposed,
}

impl BasisLayout {
    /// `update`: the merged update (`None` for transformed layers).
    pub(crate) fn of(precision: Precision, update: Option<MergedUpdate>) -> Self {
        match update {
            Some(MergedUpdate::SparseRows) => BasisLayout::PTransposed,
            Some(MergedUpdate::Runs) => BasisLayout::QTransposed,
            Some(MergedUpdate::SparseColumns) => BasisLayout::Plain(Precision::Full),
            Some(MergedUpdate::Dense) | None => BasisLayout::Plain(precision),
        }
    }
}

/// A basis on the device in one [`BasisLayout`].
pub(crate) struct DeviceBasis<B: Backend, F: Real> {
    pub(super) p: Operand<B, F>,
    pub(super) q: Operand<B, F>,
    /// Whether `p` holds `P^T` and `q` holds `Q^T`.
    pub(super) p_transposed: bool,
    pub(super) q_transposed: bool,
    /// The f32 `P` and `Q` when the device copies are rounded to bf16: merging back into a
    /// dense weight uses the basis `Wt` was built from, not its rounding.
    pub(super) exact: Option<(Vec<f32>, Vec<f32>)>,
}

/// Which device copy: the backend instance, the element type, the layout, and the basis
/// content (an edited basis gets its own copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key {
    backend: usize,
    elem: TypeId,
    layout: BasisLayout,
    fingerprint: u64,
}

type Registry = Mutex<Vec<(Key, Weak<dyn Any + Send + Sync>)>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Vec::new()))
}

impl<B: Backend, F: Real> DeviceBasis<B, F> {
    /// The live device copy of `basis` in `layout` on `backend`, or a new one.
    pub(crate) fn shared(backend: &B, basis: &Basis, layout: BasisLayout) -> Result<Arc<Self>>
    where
        Self: Send + Sync + 'static,
    {
        let key =
            Key { backend: backend.instance_id(), elem: TypeId::of::<F>(), layout, fingerprint: basis.fingerprint() };
        // A poisoned lock only means another thread panicked mid-insert; the list is still valid.
        let mut entries = registry().lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(_, w)| w.strong_count() > 0);
        if let Some(found) = entries.iter().filter(|(k, _)| *k == key).find_map(|(_, w)| w.upgrade()) {
            if let Ok(t) = found.downcast::<Self>() {
                return Ok(t);
            }
        }
        let made = Arc::new(Self::upload(backend, basis, layout)?);
        let erased: Arc<dyn Any + Send + Sync> = made.clone();
        entries.push((key, Arc::downgrade(&erased)));
        Ok(made)
    }

    fn upload(backend: &B, basis: &Basis, layout: BasisLayout) -> Result<Self> {
        let (p_host, q_host): (Vec<F>, Vec<F>) = (to_f(basis.p()), to_f(basis.q()));
        let (out, inp) = basis.shape();
        let full = |m: &[F]| Operand::upload(backend, Precision::Full, m);
        Ok(match layout {
            BasisLayout::Plain(precision) => DeviceBasis {
                p: Operand::upload(backend, precision, &p_host)?,
                q: Operand::upload(backend, precision, &q_host)?,
                p_transposed: false,
                q_transposed: false,
                exact: (precision == Precision::Bf16).then(|| (basis.p().to_vec(), basis.q().to_vec())),
            },
            BasisLayout::PTransposed => DeviceBasis {
                p: full(&transpose(&p_host, out, out))?,
                q: full(&q_host)?,
                p_transposed: true,
                q_transposed: false,
                exact: None,
            },
            BasisLayout::QTransposed => DeviceBasis {
                p: full(&p_host)?,
                q: full(&transpose(&q_host, inp, inp))?,
                p_transposed: false,
                q_transposed: true,
                exact: None,
            },
        })
    }
}
