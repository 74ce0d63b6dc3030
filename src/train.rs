//! Training shared by every step that trains: PyTorch-equivalent AdamW over candle variables and
//! one epoch over length-bucketed batches. Returns what happened (steps, seconds, losses).

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use crate::error::Result;
use crate::model::ops::cross_entropy;
use crate::model::{Arch, BertClassifier};
use crate::tokenize::{make_batch, training_batches, Batch, Batching};

/// AdamW hyper-parameters (PyTorch defaults but for the learning rate).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
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
pub struct AdamW {
    cfg: AdamWConfig,
    step: i32,
    state: Vec<(Var, Tensor, Tensor)>,
}

impl AdamW {
    /// Optimise `vars`.
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let state = vars
            .into_iter()
            .map(|v| {
                let m = v.as_tensor().zeros_like()?;
                let s = v.as_tensor().zeros_like()?;
                Ok((v, m, s))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            cfg,
            step: 0,
            state,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> i32 {
        self.step
    }

    /// First and second moments of every variable, in the order given to [`AdamW::new`].
    pub fn moments(&self) -> Vec<(Tensor, Tensor)> {
        self.state
            .iter()
            .map(|(_, m, v)| (m.clone(), v.clone()))
            .collect()
    }

    /// Continue from saved moments and step count (resuming a run).
    pub fn restore(&mut self, steps: i32, moments: Vec<(Tensor, Tensor)>) -> Result<()> {
        if moments.len() != self.state.len() {
            return Err(crate::BtuError::internal(
                "optimizer state does not match the parameters",
            ));
        }
        for ((var, m, v), (m2, v2)) in self.state.iter_mut().zip(moments) {
            *m = m2.to_device(var.device())?.to_dtype(var.dtype())?;
            *v = v2.to_device(var.device())?.to_dtype(var.dtype())?;
        }
        self.step = steps;
        Ok(())
    }

    /// One update from the gradients in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step);
        let bc2 = 1.0 - c.beta2.powi(self.step);
        for (var, m, v) in self.state.iter_mut() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let p = var.as_tensor().detach();
            let decayed = p.affine(1.0 - c.lr * c.weight_decay, 0.0)?;
            *m = ((m.affine(c.beta1, 0.0)?) + g.affine(1.0 - c.beta1, 0.0)?)?;
            *v = ((v.affine(c.beta2, 0.0)?) + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
            let denom = v.affine(1.0 / bc2, 0.0)?.sqrt()?.affine(1.0, c.eps)?;
            let update = m.affine(c.lr / bc1, 0.0)?.div(&denom)?;
            var.set(&(decayed - update)?)?;
        }
        Ok(())
    }
}

/// What one epoch did.
#[derive(Debug, Clone, Serialize)]
pub struct EpochStats {
    pub steps: usize,
    pub samples: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub samples_per_s: f64,
    pub loss_first: f64,
    pub loss_mean: f64,
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
    pub seqs: &'a [Vec<u32>],
    pub labels: &'a [u32],
    pub pad_id: u32,
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
    let dtype = model.word.dtype();
    for idx in &batches {
        let b = make_batch(data.seqs, idx, data.pad_id, data.pad_to);
        let (ids, mask) = batch_tensors(&b, dev)?;
        let labels: Vec<u32> = idx.iter().map(|&i| data.labels[i]).collect();
        let logits = model.forward(arch, &ids, &mask.to_dtype(dtype)?)?;
        let loss = cross_entropy(&logits, &labels)?;
        let grads = loss.backward()?;
        opt.step(&grads)?;
        let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
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
