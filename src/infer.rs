//! Inference with the candle classifier: class probabilities for tokenized texts, batched by
//! length, returned in input order.

use candle_core::{DType, Device};

use crate::error::Result;
use crate::model::ops::softmax_last;
use crate::model::{Arch, BertClassifier};
use crate::tokenize::{bucketed_batches, make_batch};
use crate::train::batch_tensors;

/// Class probabilities `[n][num_labels]` for `seqs`.
pub fn predict_proba(
    model: &BertClassifier,
    seqs: &[Vec<u32>],
    pad_id: u32,
    batch_size: usize,
    dev: &Device,
) -> Result<Vec<Vec<f32>>> {
    let lengths: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    let mut out = vec![Vec::new(); seqs.len()];
    for idx in bucketed_batches(&lengths, batch_size, None) {
        let b = make_batch(seqs, &idx, pad_id, None);
        let (ids, mask) = batch_tensors(&b, dev)?;
        let logits = model.forward(Arch::Full, &ids, &mask.to_dtype(model.word.dtype())?)?;
        let probs = softmax_last(&logits)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        for (i, p) in idx.into_iter().zip(probs) {
            out[i] = p;
        }
    }
    Ok(out)
}

/// Index of the largest probability (lowest index on ties).
pub fn argmax(p: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in p.iter().enumerate() {
        if *v > p[best] {
            best = i;
        }
    }
    best
}
