//! Training shared by every step that trains: PyTorch-equivalent AdamW over candle variables and
//! one epoch over length-bucketed batches. Returns what happened (steps, seconds, losses).

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor, Var};
use serde::Serialize;

use crate::error::Result;
use crate::model::ops::{cross_entropy, f32_slice};
use crate::model::tokenizer::{make_batch, training_batches, Batch, Batching};
use crate::model::{Arch, BertClassifier};

mod rows;
pub use rows::{GatheredRows, GradView};

/// AdamW hyper-parameters (PyTorch defaults but for the learning rate).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay rate of the first moment (PyTorch's `betas[0]`, default 0.9).
    pub beta1: f64,
    /// Decay rate of the second moment (PyTorch's `betas[1]`, default 0.999).
    pub beta2: f64,
    /// Added to the bias-corrected root of the second moment (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies parameters by `1 - lr * weight_decay`
    /// (default 0.01).
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// PyTorch's `torch.optim.AdamW` defaults with learning rate `lr`.
    pub fn with_lr(lr: f64) -> Self {
        AdamWConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW with decoupled weight decay, as `torch.optim.AdamW` computes it. A variable without a
/// gradient in a step is left untouched (PyTorch skips parameters whose `.grad` is None).
///
/// On the CPU, f32 variables take a fused path: the moments live in host vectors and one pass
/// over each parameter does decay, both moments and the update (the tensor path allocates a dozen
/// temporaries per step; for a 30,522 x 384 embedding matrix that was most of a step's time when
/// only the embeddings train). Both paths compute the same formula in f32.
pub struct AdamW {
    cfg: AdamWConfig,
    step: i32,
    state: Vec<(Var, Moments)>,
}

/// First and second moments of one variable.
enum Moments {
    Tensors(Tensor, Tensor),
    Host(Vec<f32>, Vec<f32>),
}

fn fused(var: &Var) -> bool {
    var.device().is_cpu() && var.dtype() == DType::F32
}

impl AdamW {
    /// Optimise `vars`.
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let state = vars
            .into_iter()
            .map(|v| {
                let moments = if fused(&v) {
                    let n = v.elem_count();
                    Moments::Host(vec![0.0; n], vec![0.0; n])
                } else {
                    Moments::Tensors(v.as_tensor().zeros_like()?, v.as_tensor().zeros_like()?)
                };
                Ok((v, moments))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            cfg,
            step: 0,
            state,
        })
    }

    /// The optimiser's settings.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Steps taken so far.
    pub fn steps(&self) -> i32 {
        self.step
    }

    /// First and second moments of every variable, in the order given to [`AdamW::new`].
    pub fn moments(&self) -> Result<Vec<(Tensor, Tensor)>> {
        self.state
            .iter()
            .map(|(var, mo)| match mo {
                Moments::Tensors(m, v) => Ok((m.clone(), v.clone())),
                Moments::Host(m, v) => Ok((
                    Tensor::from_slice(m, var.shape(), var.device())?,
                    Tensor::from_slice(v, var.shape(), var.device())?,
                )),
            })
            .collect()
    }

    /// Continue from saved moments and step count (resuming a run).
    pub fn restore(&mut self, steps: i32, moments: Vec<(Tensor, Tensor)>) -> Result<()> {
        if moments.len() != self.state.len() {
            return Err(crate::BtuError::internal(
                "optimizer state does not match the parameters",
            ));
        }
        for ((var, mo), (m2, v2)) in self.state.iter_mut().zip(moments) {
            if m2.elem_count() != var.elem_count() || v2.elem_count() != var.elem_count() {
                return Err(crate::BtuError::internal(
                    "optimizer state does not match the parameters",
                ));
            }
            *mo = match mo {
                Moments::Host(..) => Moments::Host(
                    m2.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
                    v2.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
                ),
                Moments::Tensors(..) => Moments::Tensors(
                    m2.to_device(var.device())?.to_dtype(var.dtype())?,
                    v2.to_device(var.device())?.to_dtype(var.dtype())?,
                ),
            };
        }
        self.step = steps;
        Ok(())
    }

    /// Whether `table` is one of the variables stepped on the host (CPU f32), the ones
    /// [`AdamW::step`] can take as gathered rows.
    pub fn steps_rows_of(&self, table: &Tensor) -> bool {
        self.state
            .iter()
            .any(|(var, mo)| matches!(mo, Moments::Host(..)) && var.as_tensor().id() == table.id())
    }

    /// One update from the gradients in `grads`. `rows`, when given, carries the gradient of
    /// the variable it was gathered from (see [`GatheredRows`]): the rows it holds take their
    /// gradients, every other row of that variable a gradient of zero, as a dense gradient
    /// would give them.
    pub fn step(&mut self, grads: &GradStore, rows: Option<&GatheredRows>) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step);
        let bc2_sqrt = (1.0 - c.beta2.powi(self.step)).sqrt();
        for (var, mo) in self.state.iter_mut() {
            let gathered = rows.filter(|r| r.table == var.as_tensor().id());
            match mo {
                Moments::Host(m, v) => {
                    // The gradient: of the gathered rows (the leaf), or of the whole variable.
                    let leaf = gathered.map(|r| r.leaf.as_tensor());
                    let Some(g) = grads.get(leaf.unwrap_or(var.as_tensor())) else {
                        continue;
                    };
                    let hyper = HostStep::new(&c, bc1, bc2_sqrt);
                    with_host_f32(g, |g| {
                        let view = match gathered {
                            Some(r) => GradView::Rows {
                                ids: &r.ids,
                                grads: g,
                                width: var.elem_count() / var.dim(0)?.max(1),
                            },
                            None => GradView::Dense(g),
                        };
                        host_step(var, hyper, view, m, v)
                    })?;
                }
                Moments::Tensors(m, v) => {
                    let Some(g) = grads.get(var.as_tensor()) else {
                        continue;
                    };
                    let p = var.as_tensor().detach();
                    let decayed = p.affine(1.0 - c.lr * c.weight_decay, 0.0)?;
                    *m = ((m.affine(c.beta1, 0.0)?) + g.affine(1.0 - c.beta1, 0.0)?)?;
                    *v = ((v.affine(c.beta2, 0.0)?) + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
                    let denom = v.sqrt()?.affine(1.0 / bc2_sqrt, c.eps)?;
                    let update = m.affine(c.lr / bc1, 0.0)?.div(&denom)?;
                    var.set(&(decayed - update)?)?;
                }
            }
        }
        Ok(())
    }
}

/// Calls `f` with the values of `t` (an f32 tensor on the CPU) as a contiguous slice.
fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(c) = &*s else {
        return Err(crate::BtuError::internal("fused AdamW runs on the CPU"));
    };
    f(f32_slice(c, l, "AdamW gradient")?)
}

/// The fused step of one host variable, written into the variable's own storage (no new
/// matrix, no copy back).
fn host_step(
    var: &Var,
    hyper: HostStep,
    grad: GradView,
    m: &mut [f32],
    v: &mut [f32],
) -> Result<()> {
    let op = InPlaceStep {
        hyper,
        grad,
        moments: std::cell::RefCell::new((m, v)),
    };
    var.as_tensor().inplace_op1(&op)?;
    Ok(())
}

/// [`HostStep`] as candle's in-place op over the variable's storage.
struct InPlaceStep<'a> {
    hyper: HostStep,
    grad: GradView<'a>,
    moments: std::cell::RefCell<(&'a mut [f32], &'a mut [f32])>,
}

impl candle_core::InplaceOp1 for InPlaceStep<'_> {
    fn name(&self) -> &'static str {
        "adamw-host-step"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(all) = s else {
            candle_core::bail!("AdamW's host step takes an f32 parameter")
        };
        let n = l.shape().elem_count();
        if !l.is_contiguous() || l.start_offset() + n > all.len() {
            candle_core::bail!("AdamW's host step takes a contiguous parameter")
        }
        let p = &mut all[l.start_offset()..l.start_offset() + n];
        let mut mo = self.moments.borrow_mut();
        let (m, v) = &mut *mo;
        if !self.grad.covers(n) || m.len() != n || v.len() != n {
            candle_core::bail!("AdamW: gradient or moments do not match the parameter")
        }
        self.hyper.run(p, self.grad, m, v);
        Ok(())
    }
}

/// One fused AdamW step over host slices, in f32, split over the cores by whole rows (each
/// element's arithmetic is the same wherever it runs, so the result does not depend on the
/// split).
struct HostStep {
    decay: f32,
    b1: f32,
    b2: f32,
    a1: f32,
    a2: f32,
    step_size: f32,
    inv_bc2_sqrt: f32,
    eps: f32,
}

impl HostStep {
    fn new(c: &AdamWConfig, bc1: f64, bc2_sqrt: f64) -> Self {
        HostStep {
            decay: (1.0 - c.lr * c.weight_decay) as f32,
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            a1: (1.0 - c.beta1) as f32,
            a2: (1.0 - c.beta2) as f32,
            step_size: (c.lr / bc1) as f32,
            inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
            eps: c.eps as f32,
        }
    }

    /// Updates the parameters `p` and the moments `m`, `v` in place.
    fn run(&self, p: &mut [f32], g: GradView, m: &mut [f32], v: &mut [f32]) {
        let n = p.len();
        let w = g.width();
        let threads = candle_core::utils::get_num_threads().max(1);
        let per = ((n / w).div_ceil(threads).max((1 << 16) / w).max(1)) * w;
        let zeros = vec![0.0f32; w];
        let zeros = &zeros;
        let parts = p
            .chunks_mut(per)
            .zip(m.chunks_mut(per).zip(v.chunks_mut(per)));
        std::thread::scope(|s| {
            let last = n.div_ceil(per).saturating_sub(1);
            for (i, (p, (m, v))) in parts.enumerate() {
                let mut job = move || {
                    g.runs(i * per, p.len(), zeros, |at, g| {
                        let end = at + g.len();
                        self.chunk(&mut p[at..end], g, &mut m[at..end], &mut v[at..end]);
                    })
                };
                if i == last {
                    job();
                } else {
                    s.spawn(job);
                }
            }
        });
    }

    /// The update of one run of elements. The moments of a row no batch touches fade by
    /// `beta1` (`beta2`) a step; a moment that fades below the smallest normal f32 becomes 0
    /// instead of a subnormal float (on many x86 CPUs every operation on one takes a microcode
    /// assist, ~100x slower, and a long run would leave thousands of rare tokens' rows there).
    /// Its share of the update was below 1e-30 of the parameter's own size.
    fn chunk(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let normal = |x: f32| if x.abs() < f32::MIN_POSITIVE { 0.0 } else { x };
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
            *m = normal(self.b1 * *m + self.a1 * g);
            *v = normal(self.b2 * *v + self.a2 * (g * g));
            let denom = v.sqrt() * self.inv_bc2_sqrt + self.eps;
            *p = *p * self.decay - self.step_size * (*m / denom);
        }
    }
}

/// One optimiser step on one batch; returns the batch's mean loss. When the optimiser steps the
/// word embeddings on the host, the batch trains only the rows it reads ([`GatheredRows`]; the
/// same parameters as the dense gradient, bit for bit).
pub fn train_step(
    model: &BertClassifier,
    arch: Arch,
    opt: &mut AdamW,
    ids: &Tensor,
    mask: &Tensor,
    labels: &[u32],
) -> Result<f64> {
    let (loss, rows) = if opt.steps_rows_of(&model.word) {
        let rows = GatheredRows::gather(&model.word, ids)?;
        let on_rows = BertClassifier {
            word: rows.leaf.as_tensor().clone(),
            ..model.clone()
        };
        let logits = on_rows.forward(arch, &rows.local, mask)?;
        (cross_entropy(&logits, labels)?, Some(rows))
    } else {
        (
            cross_entropy(&model.forward(arch, ids, mask)?, labels)?,
            None,
        )
    };
    opt.step(&loss.backward()?, rows.as_ref())?;
    Ok(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// What one epoch did.
#[derive(Debug, Clone, Serialize)]
pub struct EpochStats {
    /// Optimiser steps (batches).
    pub steps: usize,
    /// Rows trained on.
    pub samples: usize,
    /// Real (non-padding) tokens trained on.
    pub tokens: usize,
    /// Wall-clock seconds of the epoch.
    pub seconds: f64,
    /// `samples / seconds`.
    pub samples_per_s: f64,
    /// Mean cross-entropy of the first batch (NaN when there was none).
    pub loss_first: f64,
    /// Mean of the batches' losses.
    pub loss_mean: f64,
    /// Mean cross-entropy of the last batch (NaN when there was none).
    pub loss_last: f64,
}

/// Token ids and mask of a batch as tensors on `dev`.
pub fn batch_tensors(b: &Batch, dev: &Device) -> Result<(Tensor, Tensor)> {
    let ids = Tensor::from_vec(b.ids.clone(), (b.rows, b.seq_len), dev)?;
    let mask = Tensor::from_vec(b.mask.clone(), (b.rows, b.seq_len), dev)?.to_dtype(DType::F32)?;
    Ok((ids, mask))
}

/// The data one epoch trains on.
pub struct EpochData<'a> {
    /// Token ids of every row.
    pub seqs: &'a [Vec<u32>],
    /// Label of every row, parallel to `seqs`.
    pub labels: &'a [u32],
    /// Padding token id.
    pub pad_id: u32,
    /// Rows per batch (the last batch may be smaller).
    pub batch_size: usize,
    /// Pad every batch to this length (the released code pads to 128) instead of its longest row.
    pub pad_to: Option<usize>,
    /// Random or length-bucketed batches.
    pub batching: Batching,
    /// Seed of the batch order.
    pub seed: u64,
}

/// Train `model` (whose trainable parameters are the optimiser's variables) for one epoch.
pub fn train_epoch(
    model: &BertClassifier,
    arch: Arch,
    opt: &mut AdamW,
    data: &EpochData,
    dev: &Device,
    on_step: &mut dyn FnMut(usize, f64),
) -> Result<EpochStats> {
    let lengths: Vec<usize> = data.seqs.iter().map(|s| s.len()).collect();
    let batches = training_batches(&lengths, data.batch_size, data.batching, data.seed);
    let start = Instant::now();
    let mut losses = Vec::with_capacity(batches.len());
    let mut samples = 0usize;
    let mut tokens = 0usize;
    let dtype = model.compute;
    for idx in &batches {
        let b = make_batch(data.seqs, idx, data.pad_id, data.pad_to);
        let (ids, mask) = batch_tensors(&b, dev)?;
        let labels: Vec<u32> = idx.iter().map(|&i| data.labels[i]).collect();
        let l = train_step(model, arch, opt, &ids, &mask.to_dtype(dtype)?, &labels)?;
        if !l.is_finite() {
            return Err(crate::BtuError::bad_data(
                "training",
                format!(
                    "the loss became {l} at step {} of the epoch: training diverged; lower the learning rate (now {})",
                    losses.len() + 1,
                    opt.config().lr
                ),
            ));
        }
        losses.push(l);
        samples += b.rows;
        tokens += b.mask.iter().map(|&m| m as usize).sum::<usize>();
        on_step(b.rows, l);
    }
    let seconds = start.elapsed().as_secs_f64();
    let n = losses.len().max(1) as f64;
    Ok(EpochStats {
        steps: batches.len(),
        samples,
        tokens,
        seconds,
        samples_per_s: samples as f64 / seconds.max(1e-9),
        loss_first: losses.first().copied().unwrap_or(f64::NAN),
        loss_mean: losses.iter().sum::<f64>() / n,
        loss_last: losses.last().copied().unwrap_or(f64::NAN),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `torch.optim.AdamW.step` for one parameter vector, in f64, written from the PyTorch docs.
    fn reference(p: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f64], t: i32, c: AdamWConfig) {
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for i in 0..p.len() {
            p[i] *= 1.0 - c.lr * c.weight_decay;
            m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
            p[i] -= c.lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + c.eps);
        }
    }

    fn grads_of(var: &Var, g: &[f64]) -> GradStore {
        let gt = Tensor::from_slice(g, var.shape(), var.device())
            .unwrap()
            .to_dtype(var.dtype())
            .unwrap();
        var.as_tensor()
            .mul(&gt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    fn values(var: &Var) -> Vec<f64> {
        var.as_tensor()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Both paths (fused f32 on the CPU, tensor ops for anything else: here f64) follow
    /// PyTorch's AdamW over several steps with changing gradients, and resuming from saved
    /// moments continues exactly where an uninterrupted run goes.
    #[test]
    fn adamw_matches_pytorch_formula_on_both_paths() {
        let n = 257;
        let init: Vec<f64> = (0..n)
            .map(|i| ((i * 37 % 101) as f64 - 50.0) / 40.0)
            .collect();
        let grad = |t: usize| -> Vec<f64> {
            (0..n)
                .map(|i| {
                    (((i * 13 + t * 7) % 29) as f64 - 14.0) / 9.0
                        * if i % 5 == 0 { 0.0 } else { 1.0 }
                })
                .collect()
        };
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::with_lr(1e-2)
        };
        for dtype in [DType::F32, DType::F64] {
            let var = Var::from_tensor(
                &Tensor::from_slice(&init, (n,), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let mut opt = AdamW::new(vec![var.clone()], cfg).unwrap();
            assert_eq!(
                matches!(opt.state[0].1, Moments::Host(..)),
                dtype == DType::F32
            );
            let (mut p, mut m, mut v) = (init.clone(), vec![0.0; n], vec![0.0; n]);
            for t in 1..=5 {
                let g = grad(t);
                opt.step(&grads_of(&var, &g), None).unwrap();
                reference(&mut p, &mut m, &mut v, &g, t as i32, cfg);
                let got = values(&var);
                let tol = if dtype == DType::F32 { 2e-6 } else { 1e-12 };
                for i in 0..n {
                    assert!(
                        (got[i] - p[i]).abs() <= tol,
                        "{dtype:?} step {t} [{i}]: {} vs {}",
                        got[i],
                        p[i]
                    );
                }
            }
            // Resume: a fresh optimizer restored from the saved moments takes the same step.
            let saved = opt.moments().unwrap();
            let var2 = Var::from_tensor(var.as_tensor()).unwrap();
            let mut opt2 = AdamW::new(vec![var2.clone()], cfg).unwrap();
            opt2.restore(opt.steps(), saved).unwrap();
            let g = grad(6);
            opt.step(&grads_of(&var, &g), None).unwrap();
            opt2.step(&grads_of(&var2, &g), None).unwrap();
            assert_eq!(values(&var), values(&var2));
            // A variable without a gradient is left alone.
            let before = values(&var);
            let other = Var::new(&[1.0f32], &Device::Cpu).unwrap();
            opt.step(
                &other.as_tensor().sum_all().unwrap().backward().unwrap(),
                None,
            )
            .unwrap();
            assert_eq!(values(&var), before);
        }
    }

    /// The host step given a batch's rows and their gradients takes the same step, bit for bit,
    /// as given the dense gradient (zeros elsewhere), over a matrix large enough to be split
    /// over the cores, rows touched and untouched, moments that fade to signed zeros.
    #[test]
    fn host_step_on_gathered_rows_equals_the_dense_step_bit_for_bit() {
        let (rows, width) = (300usize, 512usize);
        let n = rows * width;
        let init: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 1013) as f32 - 506.0) / 300.0)
            .collect();
        let hyper = || HostStep::new(&AdamWConfig::with_lr(1e-3), 0.1, 0.03);
        let (mut pd, mut md, mut vd) = (init.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        let (mut ps, mut ms, mut vs) = (init, vec![0.0f32; n], vec![0.0f32; n]);
        for step in 0..4usize {
            // Rows touched this step: a different subset each time, including the first and last.
            let ids: Vec<u32> = (0..rows as u32)
                .filter(|r| {
                    (*r as usize * 7 + step).is_multiple_of(5) || *r == 0 || *r == rows as u32 - 1
                })
                .collect();
            let grads: Vec<f32> = (0..ids.len() * width)
                .map(|i| ((i * 13 + step * 7) % 29) as f32 / 9.0 - 1.5)
                .map(|g| if step == 0 { -g * 1e-30 } else { g })
                .collect();
            let mut dense = vec![0.0f32; n];
            for (k, &id) in ids.iter().enumerate() {
                let at = id as usize * width;
                dense[at..at + width].copy_from_slice(&grads[k * width..(k + 1) * width]);
            }
            hyper().run(&mut pd, GradView::Dense(&dense), &mut md, &mut vd);
            let view = GradView::Rows {
                ids: &ids,
                grads: &grads,
                width,
            };
            hyper().run(&mut ps, view, &mut ms, &mut vs);
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert!(bits(&pd) == bits(&ps), "parameters differ at step {step}");
            assert!(
                bits(&md) == bits(&ms),
                "first moments differ at step {step}"
            );
            assert!(
                bits(&vd) == bits(&vs),
                "second moments differ at step {step}"
            );
        }
    }

    /// A moment that fades below the smallest normal f32 becomes zero, never a subnormal.
    #[test]
    fn fading_moments_flush_to_zero_instead_of_subnormals() {
        let n = 64;
        let mut p = vec![0.5f32; n];
        let mut m: Vec<f32> = (0..n)
            .map(|i| f32::MIN_POSITIVE * (1.0 + i as f32 / 8.0))
            .collect();
        let mut v = m.clone();
        let hyper = HostStep::new(&AdamWConfig::with_lr(1e-3), 0.5, 0.5);
        let zeros = vec![0.0f32; n];
        for _ in 0..40 {
            hyper.run(&mut p, GradView::Dense(&zeros), &mut m, &mut v);
            for x in m.iter().chain(&v) {
                assert!(
                    *x == 0.0 || x.is_normal(),
                    "a moment became subnormal: {x:e}"
                );
            }
        }
        assert!(
            m.iter().all(|&x| x == 0.0),
            "the first moments faded to zero"
        );
        assert!(p.iter().all(|&x| x.is_normal()));
    }
}
