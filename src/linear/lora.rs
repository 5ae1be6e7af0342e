//! `LoraLinear`: `y = x W^T + b + s (x A^T) B^T` with `W`, `b` frozen, trainable
//! `A` `(r, in)` and `B` `(out, r)`, `s = alpha / r` (Hu et al. 2021; PEFT's defaults:
//! `A` Kaiming-uniform with bound `1/sqrt(in)`, `B = 0`, so training starts at the frozen
//! model's output exactly). Backward: `v = g B`, `dx = g W + s v A`, `dB = s g^T u`,
//! `dA = s v^T x` with `u = x A^T` saved from the forward.

use crate::backend::operand::{mm, Operand, OperandRef};
use crate::backend::Precision;
use crate::backend::{AdamwJob, Backend, Gemm};
use crate::error::{ensure_finite, Error, Result};
use crate::linear::state::{mismatch, DenseParam, LayerState};
use crate::linear::{check_backward, check_forward, check_weight_and_bias, GradY, LayerWeights, INPUT_X};
use crate::optim::{adamw_job, dense_step, Moments, Optimizer};
use crate::scalar::Real;
use half::bf16;

/// A trainable LoRA factor with its gradient, moments and bf16 compute copy.
struct Factor<B: Backend, F: Real> {
    value: B::Buf<F>,
    half: Option<B::Buf<bf16>>,
    grad: B::Buf<F>,
    moments: Option<Moments<B, F>>,
    len: usize,
}

impl<B: Backend, F: Real> Factor<B, F> {
    fn new(be: &B, host: &[F], opt: &Optimizer, precision: Precision) -> Result<Self> {
        let value = be.upload(host)?;
        let mut half = if precision == Precision::Bf16 { Some(be.alloc(host.len())?) } else { None };
        if let Some(h) = half.as_mut() {
            be.cast_to_bf16(&value, h, host.len())?;
        }
        Ok(Factor {
            value,
            half,
            grad: be.alloc(host.len())?,
            moments: Moments::for_optimizer(be, opt, host.len())?,
            len: host.len(),
        })
    }
    fn op(&self) -> OperandRef<'_, B, F> {
        self.half.as_ref().map_or(OperandRef::Full(&self.value), OperandRef::Half)
    }
    fn step(&mut self, be: &B, opt: &Optimizer) -> Result<()> {
        dense_step(be, opt, &mut self.value, self.half.as_mut(), &self.grad, self.moments.as_mut(), self.len)
    }

    /// The step as one AdamW job (`None` under SGD).
    fn adamw_job(&mut self, opt: &Optimizer) -> Result<Option<AdamwJob<'_, B, F>>> {
        adamw_job(opt, &mut self.value, self.half.as_mut(), &self.grad, self.moments.as_mut(), self.len)
    }
}

/// Token-dependent buffers, grown to the largest batch seen.
struct LoraWorkspace<B: Backend, F: Real> {
    capacity: usize,
    saved_x: Operand<B, F>,
    /// `u = x A^T` (saved) and `v = g B`, only ever GEMM operands: in the layer's
    /// precision, written by their GEMMs (rounded once there in bf16).
    u_op: Operand<B, F>,
    v_op: Operand<B, F>,
    g_half: Option<B::Buf<bf16>>,
}

/// Construction options of a [`LoraLinear`] (default: rank 8, alpha 16, seed 0, AdamW
/// defaults, f32).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraConfig {
    /// The rank `r` of `B A` (1 ..= min(out, in)).
    pub rank: usize,
    /// The update is scaled by `alpha / r`, as in PEFT.
    pub alpha: f32,
    /// Seeds [`lora_init_a`] in [`LoraLinear::new`].
    pub seed: u64,
    pub optimizer: Optimizer,
    pub precision: Precision,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { rank: 8, alpha: 16.0, seed: 0, optimizer: Optimizer::default(), precision: Precision::Full }
    }
}

/// A LoRA-adapted linear layer; see the module docs.
pub struct LoraLinear<B: Backend, F: Real = f32> {
    backend: B,
    out: usize,
    inp: usize,
    rank: usize,
    scaling: f32,
    opt: Optimizer,
    precision: Precision,
    w: B::Buf<F>,
    w_half: Option<B::Buf<bf16>>,
    bias: Option<B::Buf<F>>,
    a: Factor<B, F>,
    b: Factor<B, F>,
    ws: LoraWorkspace<B, F>,
    saved_tokens: Option<usize>,
    grad_ready: bool,
    step: u64,
}

/// PEFT's initialisation of `A`: uniform in `[-1/sqrt(in), 1/sqrt(in))`, from a seeded
/// splitmix64 stream so runs are reproducible.
pub fn lora_init_a<F: Real>(rank: usize, inp: usize, seed: u64) -> Vec<F> {
    let bound = 1.0 / (inp.max(1) as f64).sqrt();
    let mut state = seed;
    (0..rank * inp)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
            F::from_f64((2.0 * unit - 1.0) * bound)
        })
        .collect()
}

impl<B: Backend + Clone, F: Real> LoraLinear<B, F> {
    /// A LoRA layer over the frozen `weights`, with `A` from [`lora_init_a`] (seeded by
    /// `config.seed`) and `B = 0`.
    pub fn new(backend: &B, weights: LayerWeights<'_, F>, config: LoraConfig) -> Result<Self> {
        let a = lora_init_a::<F>(config.rank, weights.inp, config.seed);
        let b = vec![F::ZERO; weights.out * config.rank];
        Self::from_factors(backend, weights, (&a, &b), config)
    }

    /// A LoRA layer with given factors `(A, B)`: `A` `(r, in)` and `B` `(out, r)`
    /// (`config.seed` is unused).
    pub fn from_factors(
        backend: &B,
        weights: LayerWeights<'_, F>,
        (a, b): (&[F], &[F]),
        config: LoraConfig,
    ) -> Result<Self> {
        let LayerWeights { weight, bias, out, inp } = weights;
        let LoraConfig { rank, alpha, seed: _, optimizer: opt, precision } = config;
        if rank == 0 || rank > out.min(inp) {
            return Err(Error::invalid("LoraLinear::new", format!("rank {rank} outside 1..={}", out.min(inp))));
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(Error::invalid("LoraLinear::new", format!("alpha {alpha} must be finite and > 0")));
        }
        check_weight_and_bias("LoraLinear::new", weight, bias, out, inp)?;
        for (what, m, need) in [("A", a, rank * inp), ("B", b, out * rank)] {
            if m.len() != need {
                return Err(Error::shape("LoraLinear::new", what, need, m.len()));
            }
            ensure_finite(&format!("LoRA factor {what}"), m.iter().copied())?;
        }
        opt.validate()?;
        let w = backend.upload(weight)?;
        let mut w_half = if precision == Precision::Bf16 { Some(backend.alloc(out * inp)?) } else { None };
        if let Some(h) = w_half.as_mut() {
            backend.cast_to_bf16(&w, h, out * inp)?;
        }
        let half = precision == Precision::Bf16;
        Ok(LoraLinear {
            backend: backend.clone(),
            out,
            inp,
            rank,
            scaling: alpha / rank as f32,
            opt,
            precision,
            w,
            w_half,
            bias: bias.map(|b| backend.upload(b)).transpose()?,
            a: Factor::new(backend, a, &opt, precision)?,
            b: Factor::new(backend, b, &opt, precision)?,
            ws: LoraWorkspace {
                capacity: 0,
                saved_x: Operand::alloc(backend, precision, 0)?,
                u_op: Operand::alloc(backend, precision, 0)?,
                v_op: Operand::alloc(backend, precision, 0)?,
                g_half: if half { Some(backend.alloc(0)?) } else { None },
            },
            saved_tokens: None,
            grad_ready: false,
            step: 0,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn scaling(&self) -> f32 {
        self.scaling
    }
    pub fn out_features(&self) -> usize {
        self.out
    }
    pub fn in_features(&self) -> usize {
        self.inp
    }
    pub fn steps_taken(&self) -> u64 {
        self.step
    }
    /// `r (in + out)`: the factors; `W` and `b` stay frozen.
    pub fn trainable_parameters(&self) -> usize {
        self.rank * (self.inp + self.out)
    }

    fn ensure_tokens(&mut self, tokens: usize) -> Result<()> {
        if tokens <= self.ws.capacity {
            return Ok(());
        }
        let (be, p, r) = (&self.backend, self.precision, self.rank);
        let half = p == Precision::Bf16;
        self.ws.saved_x = Operand::alloc(be, p, tokens * self.inp)?;
        self.ws.u_op = Operand::alloc(be, p, tokens * r)?;
        self.ws.v_op = Operand::alloc(be, p, tokens * r)?;
        self.ws.g_half = if half { Some(be.alloc(tokens * self.out)?) } else { None };
        self.ws.capacity = tokens;
        Ok(())
    }

    pub fn forward(&mut self, x: &B::Buf<F>, tokens: usize, y: &mut B::Buf<F>) -> Result<()> {
        let (out, inp, r) = (self.out, self.inp, self.rank);
        check_forward(&self.backend, "LoraLinear::forward", x, y, tokens, (out, inp))?;
        self.saved_tokens = None;
        self.ensure_tokens(tokens)?;
        let be = &self.backend;
        let ws = &mut self.ws;
        ws.saved_x.store_checked(be, x, tokens * inp, INPUT_X)?;
        let w_op = self.w_half.as_ref().map_or(OperandRef::Full(&self.w), OperandRef::Half);
        mm(be, &Gemm::nt(tokens, out, inp), ws.saved_x.as_ref(), w_op, y)?;
        if let Some(b) = &self.bias {
            be.add_bias(y, b, tokens, out)?;
        }
        ws.u_op.store_product(be, &Gemm::nt(tokens, r, inp), ws.saved_x.as_ref(), self.a.op())?;
        mm(be, &Gemm::nt(tokens, out, r).alpha(self.scaling).beta(1.0), ws.u_op.as_ref(), self.b.op(), y)?;
        self.saved_tokens = Some(tokens);
        Ok(())
    }

    pub fn backward(&mut self, g: &B::Buf<F>, tokens: usize, dx: Option<&mut B::Buf<F>>) -> Result<()> {
        self.backward_grad(GradY::Raw(g), tokens, dx)
    }

    /// [`Self::backward`] from `g` as [`GradY`] gives it (the layer uses only its operand).
    pub(crate) fn backward_grad(
        &mut self,
        g: GradY<'_, B, F>,
        tokens: usize,
        dx: Option<&mut B::Buf<F>>,
    ) -> Result<()> {
        let (out, inp, r, s) = (self.out, self.inp, self.rank, self.scaling);
        check_backward(&self.backend, "LoraLinear::backward", self.saved_tokens, g, dx.as_deref(), tokens, (out, inp))?;
        self.grad_ready = false;
        let be = &self.backend;
        let ws = &mut self.ws;
        let g_op = g.operand(be, ws.g_half.as_mut(), tokens * out)?;
        ws.v_op.store_product(be, &Gemm::nn(tokens, r, out), g_op, self.b.op())?;
        let v_op = ws.v_op.as_ref();
        if let Some(dx) = dx {
            let w_op = self.w_half.as_ref().map_or(OperandRef::Full(&self.w), OperandRef::Half);
            mm(be, &Gemm::nn(tokens, inp, out), g_op, w_op, dx)?;
            mm(be, &Gemm::nn(tokens, inp, r).alpha(s).beta(1.0), v_op, self.a.op(), dx)?;
        }
        mm(be, &Gemm::tn(out, r, tokens).alpha(s), g_op, ws.u_op.as_ref(), &mut self.b.grad)?;
        mm(be, &Gemm::tn(r, inp, tokens).alpha(s), v_op, ws.saved_x.as_ref(), &mut self.a.grad)?;
        self.grad_ready = true;
        Ok(())
    }

    /// See [`crate::Linear::count_replayed_step`].
    pub(crate) fn count_replayed_step(&mut self) {
        self.step += 1;
    }

    /// AdamW (or SGD) on `A` and `B`.
    /// Pushes the step's AdamW jobs (both factors) for a caller that runs them in one batch
    /// with other layers', then calls [`Self::finish_batched_step`]. Returns false, pushing
    /// nothing, when the step is not Adam's; fails, pushing nothing, before a backward.
    pub(crate) fn optimizer_jobs<'a>(&'a mut self, jobs: &mut Vec<AdamwJob<'a, B, F>>) -> Result<bool> {
        if !self.grad_ready {
            return Err(Error::invalid("LoraLinear::step", "no gradient: call backward first"));
        }
        let opt = self.opt;
        match (self.a.adamw_job(&opt)?, self.b.adamw_job(&opt)?) {
            (Some(a), Some(b)) => {
                jobs.extend([a, b]);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Whether [`Self::optimizer_jobs`] covers the step: under Adam.
    pub(crate) fn batches_its_step(&self) -> bool {
        matches!(self.opt, Optimizer::Adam(_))
    }

    /// The batch of [`Self::optimizer_jobs`] ran: counts the step.
    pub(crate) fn finish_batched_step(&mut self) {
        self.step += 1;
        self.grad_ready = false;
    }

    pub fn step(&mut self) -> Result<()> {
        if !self.grad_ready {
            return Err(Error::invalid("LoraLinear::step", "no gradient: call backward first"));
        }
        self.a.step(&self.backend, &self.opt)?;
        self.b.step(&self.backend, &self.opt)?;
        self.step += 1;
        self.grad_ready = false;
        Ok(())
    }

    /// `(A, B)` on the host.
    pub fn factors_host(&self) -> Result<(Vec<F>, Vec<F>)> {
        Ok((self.backend.download(&self.a.value, self.a.len)?, self.backend.download(&self.b.value, self.b.len)?))
    }
    /// `(dA, dB)` of the last backward.
    pub fn grad_host(&self) -> Result<(Vec<F>, Vec<F>)> {
        if !self.grad_ready {
            return Err(Error::invalid("LoraLinear::grad_host", "no gradient: call backward first"));
        }
        Ok((self.backend.download(&self.a.grad, self.a.len)?, self.backend.download(&self.b.grad, self.b.len)?))
    }
    pub fn bias_host(&self) -> Result<Option<Vec<F>>> {
        self.bias.as_ref().map(|b| self.backend.download(b, self.out)).transpose()
    }
    /// The frozen base weight.
    pub fn base_weight_host(&self) -> Result<Vec<F>> {
        self.backend.download(&self.w, self.out * self.inp)
    }

    /// `W + s B A`, computed on the backend in `F`.
    pub fn merged_weight(&self) -> Result<Vec<F>> {
        let be = &self.backend;
        let mut w = be.alloc::<F>(self.out * self.inp)?;
        be.copy(&self.w, &mut w, self.out * self.inp)?;
        be.gemm(
            &Gemm::nn(self.out, self.inp, self.rank).alpha(self.scaling).beta(1.0),
            &self.b.value,
            &self.a.value,
            &mut w,
        )?;
        be.download(&w, self.out * self.inp)
    }

    /// The factors with their moments and the step (`W` and `b` stay the base's).
    pub fn export_state(&self) -> Result<LayerState<F>> {
        let be = &self.backend;
        let param = |f: &Factor<B, F>| DenseParam::download(be, &f.value, f.moments.as_ref(), f.len);
        Ok(LayerState::Lora {
            a: param(&self.a)?,
            b: param(&self.b)?,
            rank: self.rank,
            alpha: self.scaling * self.rank as f32,
            step: self.step,
        })
    }

    /// Checks that `state` fits this layer (method, rank, alpha, shapes, optimizer).
    pub fn check_state(&self, state: &LayerState<F>) -> Result<()> {
        let LayerState::Lora { a, b, rank, alpha, .. } = state else {
            return Err(mismatch("adapter", format!("a {} state cannot be loaded into a LoRA layer", state.method())));
        };
        let scaling = *alpha / *rank as f32;
        if *rank != self.rank || (scaling - self.scaling).abs() > 1e-6 * self.scaling.abs() {
            return Err(mismatch(
                "adapter",
                format!(
                    "LoRA rank {rank}, alpha {alpha} does not match the layer's rank {}, alpha {}",
                    self.rank,
                    self.scaling * self.rank as f32
                ),
            ));
        }
        for (name, p, f) in [("A", a, &self.a), ("B", b, &self.b)] {
            if p.values.len() != f.len || p.exp_avg.is_some() != f.moments.is_some() {
                return Err(mismatch(
                    "adapter",
                    format!("LoRA factor {name}: shape or optimizer state does not match the layer"),
                ));
            }
        }
        Ok(())
    }

    /// Loads factors, moments and step; fails, leaving the layer unchanged, on another
    /// method, rank, shape or optimizer.
    pub fn import_state(&mut self, state: &LayerState<F>) -> Result<()> {
        self.check_state(state)?;
        let LayerState::Lora { a, b, step, .. } = state else {
            return Err(mismatch("adapter", "not a LoRA state"));
        };
        let be = self.backend.clone();
        for (p, f) in [(a, &mut self.a), (b, &mut self.b)] {
            p.upload(&be, &mut f.value, f.moments.as_mut())?;
            if let Some(h) = f.half.as_mut() {
                be.cast_to_bf16(&f.value, h, f.len)?;
            }
            if let Some(m) = f.moments.as_mut() {
                m.set_steps(&be, *step)?;
            }
        }
        self.step = *step;
        self.grad_ready = false;
        Ok(())
    }
}
