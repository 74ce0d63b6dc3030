//! Inference with the candle classifier: class logits, probabilities or representations of
//! tokenized texts, batched by length, returned in input order.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::model::tokenizer::{bucketed_batches, make_batch};
use crate::model::{Arch, BertClassifier};
use crate::training::batch_tensors;

/// Class logits `[n][num_labels]` for `seqs`.
pub fn predict_logits(
    model: &BertClassifier,
    seqs: &[Vec<u32>],
    pad_id: u32,
    batch_size: usize,
    dev: &Device,
) -> Result<Vec<Vec<f32>>> {
    per_row(seqs, pad_id, batch_size, dev, &|ids, mask| {
        model.forward(Arch::Full, ids, &mask.to_dtype(model.compute)?)
    })
}

/// Each text's representation in `model` `[n][hidden]`: the mean of its final hidden states
/// ([`BertClassifier::mean_hidden`]).
pub fn mean_hidden_states(
    model: &BertClassifier,
    seqs: &[Vec<u32>],
    pad_id: u32,
    batch_size: usize,
    dev: &Device,
) -> Result<Vec<Vec<f32>>> {
    per_row(seqs, pad_id, batch_size, dev, &|ids, mask| {
        model.mean_hidden(ids, mask)
    })
}

/// `f`'s rows `[b, d]` for batches of `seqs` (bucketed by length), in input order.
fn per_row(
    seqs: &[Vec<u32>],
    pad_id: u32,
    batch_size: usize,
    dev: &Device,
    f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Vec<Vec<f32>>> {
    let lengths: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    let mut out = vec![Vec::new(); seqs.len()];
    for idx in bucketed_batches(&lengths, batch_size, None) {
        let b = make_batch(seqs, &idx, pad_id, None);
        let (ids, mask) = batch_tensors(&b, dev)?;
        let rows = f(&ids, &mask)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        for (i, p) in idx.into_iter().zip(rows) {
            out[i] = p;
        }
    }
    Ok(out)
}

/// Class probabilities `[n][num_labels]` for `seqs`.
pub fn predict_proba(
    model: &BertClassifier,
    seqs: &[Vec<u32>],
    pad_id: u32,
    batch_size: usize,
    dev: &Device,
) -> Result<Vec<Vec<f32>>> {
    Ok(predict_logits(model, seqs, pad_id, batch_size, dev)?
        .iter()
        .map(|l| softmax(l))
        .collect())
}

/// Softmax of one row of logits (computed in f64).
pub fn softmax(l: &[f32]) -> Vec<f32> {
    let m = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = l.iter().map(|&x| (x as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| (v / s) as f32).collect()
}

/// Index of the largest value (lowest index on ties).
pub fn argmax(p: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in p.iter().enumerate() {
        if *v > p[best] {
            best = i;
        }
    }
    best
}
