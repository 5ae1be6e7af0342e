//! `DenseLinear`: `y = x W^T + b` with the weight either frozen (no weight gradient is
//! ever computed: the `dW` GEMM is skipped) or fully trained with AdamW.

use crate::backend::{AdamParams, Backend, Gemm};
use crate::error::{Error, Result};
use crate::linear::{check_activation, check_finite, mm, stage, Operand, OperandRef, Precision};
use crate::scalar::Real;
use half::bf16;

/// Optimizer state and gradients of a trained dense weight.
struct DenseTraining<B: Backend, F: Real> {
    grad_w: B::Buf<F>,
    exp_avg: B::Buf<F>,
    exp_avg_sq: B::Buf<F>,
}

/// A dense linear layer; see the module docs.
pub struct DenseLinear<B: Backend, F: Real = f32> {
    backend: B,
    out: usize,
    inp: usize,
    adam: AdamParams,
    precision: Precision,
    w: B::Buf<F>,
    w_half: Option<B::Buf<bf16>>,
    bias: Option<B::Buf<F>>,
    /// Trained weight: gradient and AdamW state. `None` when frozen.
    training: Option<DenseTraining<B, F>>,
    /// The bias trains (AdamW) whenever the weight does.
    bias_state: Option<[B::Buf<F>; 3]>,
    saved: Operand<B, F>,
    x_half: Option<B::Buf<bf16>>,
    g_half: Option<B::Buf<bf16>>,
    capacity: usize,
    saved_tokens: Option<usize>,
    grad_ready: bool,
    step: u64,
}

impl<B: Backend + Clone, F: Real> DenseLinear<B, F> {
    /// `trainable = false` freezes weight and bias.
    pub fn new(backend: &B, weight: &[F], bias: Option<&[F]>, out: usize, inp: usize, trainable: bool, adam: AdamParams, precision: Precision) -> Result<Self> {
        if weight.len() != out * inp {
            return Err(Error::shape("DenseLinear::new", "weight", format!("{out} x {inp}"), weight.len()));
        }
        if let Some(b) = bias {
            if b.len() != out {
                return Err(Error::shape("DenseLinear::new", "bias", out, b.len()));
            }
        }
        if let Some(i) = weight.iter().chain(bias.unwrap_or(&[])).position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: "weight or bias".into(), count: 1, first_index: i });
        }
        adam.validate()?;
        let training = if trainable {
            Some(DenseTraining { grad_w: backend.alloc(out * inp)?, exp_avg: backend.alloc(out * inp)?, exp_avg_sq: backend.alloc(out * inp)? })
        } else {
            None
        };
        let bias_state = match (trainable, bias.is_some()) {
            (true, true) => Some([backend.alloc(out)?, backend.alloc(out)?, backend.alloc(out)?]),
            _ => None,
        };
        let w = backend.upload(weight)?;
        let mut w_half = if precision == Precision::Bf16 { Some(backend.alloc(out * inp)?) } else { None };
        if let Some(h) = w_half.as_mut() {
            backend.cast_to_bf16(&w, h, out * inp)?;
        }
        Ok(DenseLinear {
            backend: backend.clone(),
            out,
            inp,
            adam,
            precision,
            w,
            w_half,
            bias: bias.map(|b| backend.upload(b)).transpose()?,
            training,
            bias_state,
            saved: Operand::alloc(backend, precision, 0)?,
            x_half: None,
            g_half: None,
            capacity: 0,
            saved_tokens: None,
            grad_ready: false,
            step: 0,
        })
    }

    pub fn is_trainable(&self) -> bool {
        self.training.is_some()
    }
    /// Weight plus bias entries when trained, 0 when frozen.
    pub fn trainable_parameters(&self) -> usize {
        if self.training.is_some() {
            self.out * self.inp + if self.bias.is_some() { self.out } else { 0 }
        } else {
            0
        }
    }

    fn ensure_tokens(&mut self, tokens: usize) -> Result<()> {
        if tokens <= self.capacity {
            return Ok(());
        }
        // Only a trained weight needs x for backward (dW = g^T x); dx = g W does not.
        let keep_x = if self.training.is_some() { tokens * self.inp } else { 0 };
        self.saved = Operand::alloc(&self.backend, self.precision, keep_x)?;
        let half = self.precision == Precision::Bf16;
        self.x_half = if half && self.training.is_none() { Some(self.backend.alloc(tokens * self.inp)?) } else { None };
        self.g_half = if half { Some(self.backend.alloc(tokens * self.out)?) } else { None };
        self.capacity = tokens;
        Ok(())
    }

    pub fn forward(&mut self, x: &B::Buf<F>, tokens: usize, y: &mut B::Buf<F>) -> Result<()> {
        let (out, inp) = (self.out, self.inp);
        check_activation(&self.backend, "DenseLinear::forward", "x", x, tokens, inp)?;
        check_activation(&self.backend, "DenseLinear::forward", "y", y, tokens, out)?;
        check_finite(&self.backend, x, tokens * inp, "layer input x")?;
        self.saved_tokens = None;
        self.ensure_tokens(tokens)?;
        let be = &self.backend;
        let w_op = self.w_half.as_ref().map_or(OperandRef::Full(&self.w), OperandRef::Half);
        let x_op = if self.training.is_some() {
            self.saved.store(be, x, tokens * inp)?;
            self.saved.as_ref()
        } else {
            stage(be, x, self.x_half.as_mut(), tokens * inp)?
        };
        mm(be, &Gemm::nt(tokens, out, inp), x_op, w_op, y)?;
        if let Some(b) = &self.bias {
            be.add_bias(y, b, tokens, out)?;
        }
        self.saved_tokens = Some(tokens);
        Ok(())
    }

    /// `dx = g W` into `dx` if given; `dW = g^T x` and `db` only when trained.
    pub fn backward(&mut self, g: &B::Buf<F>, tokens: usize, dx: Option<&mut B::Buf<F>>) -> Result<()> {
        let (out, inp) = (self.out, self.inp);
        if self.saved_tokens != Some(tokens) {
            return Err(Error::invalid("DenseLinear::backward", format!("no forward of {tokens} tokens to go back through")));
        }
        check_activation(&self.backend, "DenseLinear::backward", "grad_y", g, tokens, out)?;
        check_finite(&self.backend, g, tokens * out, "output gradient grad_y")?;
        self.grad_ready = false;
        let be = &self.backend;
        let g_op = stage(be, g, self.g_half.as_mut(), tokens * out)?;
        if let Some(dx) = dx {
            check_activation(be, "DenseLinear::backward", "dx", dx, tokens, inp)?;
            let w_op = self.w_half.as_ref().map_or(OperandRef::Full(&self.w), OperandRef::Half);
            mm(be, &Gemm::nn(tokens, inp, out), g_op, w_op, dx)?;
        }
        if let Some(tr) = self.training.as_mut() {
            mm(be, &Gemm::tn(out, inp, tokens), g_op, self.saved.as_ref(), &mut tr.grad_w)?;
            if let Some([db, _, _]) = self.bias_state.as_mut() {
                be.bias_grad(g, tokens, out, db, F::ZERO)?;
            }
            self.grad_ready = true;
        }
        Ok(())
    }

    /// AdamW on weight and bias. A frozen layer has nothing to step and returns Ok.
    pub fn step(&mut self) -> Result<()> {
        let Some(tr) = self.training.as_mut() else { return Ok(()) };
        if !self.grad_ready {
            return Err(Error::invalid("DenseLinear::step", "no gradient: call backward first"));
        }
        let be = &self.backend;
        let step = self.step + 1;
        be.adamw(&mut self.w, &tr.grad_w, &mut tr.exp_avg, &mut tr.exp_avg_sq, self.out * self.inp, step, &self.adam)?;
        if let (Some(b), Some([db, m, v])) = (self.bias.as_mut(), self.bias_state.as_mut()) {
            be.adamw(b, db, m, v, self.out, step, &self.adam)?;
        }
        if let Some(h) = self.w_half.as_mut() {
            be.cast_to_bf16(&self.w, h, self.out * self.inp)?;
        }
        self.step = step;
        self.grad_ready = false;
        Ok(())
    }

    pub fn weight_host(&self) -> Result<Vec<F>> {
        self.backend.download(&self.w, self.out * self.inp)
    }
    pub fn bias_host(&self) -> Result<Option<Vec<F>>> {
        self.bias.as_ref().map(|b| self.backend.download(b, self.out)).transpose()
    }
    /// The dense weight gradient of the last backward (trained layers only).
    pub fn grad_host(&self) -> Result<Vec<F>> {
        match (&self.training, self.grad_ready) {
            (Some(tr), true) => self.backend.download(&tr.grad_w, self.out * self.inp),
            _ => Err(Error::invalid("DenseLinear::grad_host", "no weight gradient (frozen layer, or no backward yet)")),
        }
    }
}
