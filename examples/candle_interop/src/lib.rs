//! sparsegrad's trainable layers as candle operations, so a candle model's MLP projections
//! train with SparseGrad while candle's autograd runs the rest of the model.
//!
//! [`SparseGradOp`] is a candle [`CustomOp1`]: its forward runs the sparsegrad layer
//! (`y = x W^T + b`, in the layer's basis), and its backward, called by candle's
//! `Tensor::backward`, runs the layer's backward: it returns `dx` to candle and keeps the
//! weight gradient (the top-k COO entries of `dWt`, or the dense gradient of a `Collect`
//! layer) inside the layer, where [`SparseGradOp::step`] applies it with sparsegrad's
//! optimizer (SparseAdam). Candle never sees the weight, so it cannot be trained twice.
//!
//! CPU only: the op converts candle's CPU storage to and from sparsegrad's CPU buffers. On a
//! GPU the same op would wrap candle's stream with `sparsegrad::Cuda::from_stream` and its
//! buffers with `Cuda::view` (see sparsegrad's tests/cuda_engine.rs).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use sparsegrad::backend::cpu::Cpu;
use sparsegrad::prelude::*;
use std::sync::{Arc, Mutex, MutexGuard};

/// A sparsegrad layer usable in a candle graph. Cloning shares the layer.
#[derive(Clone)]
pub struct SparseGradOp {
    name: &'static str,
    cpu: Cpu,
    layer: Arc<Mutex<Linear<Cpu>>>,
}

fn candle_err(e: sparsegrad::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl SparseGradOp {
    /// Wraps a layer built on `cpu` (any [`Method`]: SparseGrad, `Collect` for the
    /// preliminary phase, LoRA, ...).
    pub fn new(name: &'static str, cpu: &Cpu, layer: Linear<Cpu>) -> Self {
        SparseGradOp { name, cpu: cpu.clone(), layer: Arc::new(Mutex::new(layer)) }
    }

    /// The layer (for its step, its merged weight, its dense gradient, an adapter).
    pub fn layer(&self) -> MutexGuard<'_, Linear<Cpu>> {
        self.layer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `y = layer(x)` for `x` of shape `(tokens, in)`, recorded for candle's backward.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.apply_op1(self.clone())
    }

    /// Applies the weight gradient of the last backward (sparsegrad's optimizer step).
    pub fn step(&self) -> sparsegrad::Result<()> {
        self.layer().step()
    }
}

/// `(tokens, features)` of a rank-2 tensor's layout, and its values if contiguous f32.
fn rows_of<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
    features: usize,
) -> candle_core::Result<(usize, &'a [f32])> {
    let &[tokens, cols] = layout.shape().dims() else {
        candle_core::bail!("{op}: expected a (tokens, {features}) input, got shape {:?}", layout.shape())
    };
    if cols != features {
        candle_core::bail!("{op}: expected {features} features per token, got {cols}")
    }
    let CpuStorage::F32(values) = storage else { candle_core::bail!("{op}: only f32 tensors are supported") };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous (call .contiguous() first)")
    };
    Ok((tokens, &values[start..end]))
}

impl CustomOp1 for SparseGradOp {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut layer = self.layer();
        let (out, inp) = (layer.out_features(), layer.in_features());
        let (tokens, x) = rows_of(self.name, storage, layout, inp)?;
        let x = self.cpu.upload(x).map_err(candle_err)?;
        let mut y = self.cpu.alloc::<f32>(tokens * out).map_err(candle_err)?;
        layer.forward(&x, tokens, &mut y).map_err(candle_err)?;
        let y = self.cpu.download(&y, tokens * out).map_err(candle_err)?;
        Ok((CpuStorage::F32(y), Shape::from((tokens, out))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let mut layer = self.layer();
        let (out, inp) = (layer.out_features(), layer.in_features());
        let tokens = arg.dim(0)?;
        let g = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        if g.len() != tokens * out {
            candle_core::bail!("{}: the output gradient has {} values, expected {tokens} x {out}", self.name, g.len())
        }
        let g = self.cpu.upload(&g).map_err(candle_err)?;
        let mut dx = self.cpu.alloc::<f32>(tokens * inp).map_err(candle_err)?;
        layer.backward(&g, tokens, Some(&mut dx)).map_err(candle_err)?;
        let dx = self.cpu.download(&dx, tokens * inp).map_err(candle_err)?;
        Ok(Some(Tensor::from_vec(dx, (tokens, inp), arg.device())?))
    }
}
