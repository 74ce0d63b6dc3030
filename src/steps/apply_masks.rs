//! `btu apply-masks`: replay a `dimension_masks` table (written by `btu unlearn`) onto another
//! checkpoint with the same vocabulary and hidden size; every other tensor stays byte-identical.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{BtuError, Result};
use crate::io::tables::DimensionMask;
use crate::model::checkpoint::Checkpoint;
use crate::model::tokenizer::BtuTokenizer;
use crate::steps::unlearn::{apply, matrix, raw_like, word_name, write_checkpoint, Matrix};

/// Check a mask table fits a checkpoint: hidden size, vocabulary, token ids and strings agree.
fn check_masks(
    masks: &[DimensionMask],
    meta: &std::collections::HashMap<String, String>,
    m: &Matrix,
    tok: &BtuTokenizer,
    masks_src: &Path,
) -> Result<()> {
    for (key, what, here) in [
        ("btu:vocab_size", "vocabulary size", m.rows),
        ("btu:hidden_size", "hidden size", m.cols),
    ] {
        if let Some(v) = meta.get(key).and_then(|v| v.parse::<usize>().ok()) {
            if v != here {
                return Err(BtuError::bad_data(
                    masks_src.display().to_string(),
                    format!("the masks were computed for {what} {v} but the checkpoint has {here}; replay them onto a checkpoint of the same model family"),
                ));
            }
        }
    }
    for (row, x) in masks.iter().enumerate() {
        if !x.written.is_finite() {
            return Err(BtuError::bad_data(
                masks_src.display().to_string(),
                format!(
                    "column 'written' holds {} at row {row} (token '{}', dimension {}); replay only masks btu unlearn wrote",
                    x.written, x.token, x.dim
                ),
            ));
        }
        if x.token_id as usize >= m.rows {
            return Err(BtuError::bad_data(
                masks_src.display().to_string(),
                format!(
                    "token id {} is outside the checkpoint's vocabulary of {}",
                    x.token_id, m.rows
                ),
            ));
        }
        if x.dim as usize >= m.cols {
            return Err(BtuError::bad_data(
                masks_src.display().to_string(),
                format!(
                    "dimension {} is outside the checkpoint's hidden size {}",
                    x.dim, m.cols
                ),
            ));
        }
        let here = tok.token(x.token_id);
        if here != x.token {
            return Err(BtuError::bad_data(
                masks_src.display().to_string(),
                format!("token id {} is '{}' in the table but '{here}' in the checkpoint's tokenizer; the vocabularies differ", x.token_id, x.token),
            ));
        }
    }
    Ok(())
}

/// Inputs of `btu apply-masks`.
pub struct ApplyMasksJob {
    /// Checkpoint directory to repair (`--checkpoint`): same vocabulary and hidden size as the
    /// masks.
    pub checkpoint: PathBuf,
    /// `dimension_masks.arrow` from `btu unlearn` (`--masks`).
    pub masks: PathBuf,
    /// Output, whether to replace it, seed and device (`--out`, `--overwrite`, `--seed`, `--device`).
    pub run: crate::steps::RunOpts,
}

/// `btu apply-masks`' result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApplyMasksReport {
    /// `apply-masks`.
    pub command: String,
    /// btu's version.
    pub version: String,
    /// The repaired checkpoint directory.
    pub out: PathBuf,
    /// sha256 of the input checkpoint's weights.
    pub checkpoint_sha256: String,
    /// Cells replaced.
    pub dimensions_replaced: usize,
    /// Tokens with a replaced cell.
    pub tokens: usize,
}

/// `btu apply-masks`: replay a `dimension_masks` table onto another checkpoint.
pub fn run(job: &ApplyMasksJob) -> Result<ApplyMasksReport> {
    crate::io::output::check_output(&job.run.out, job.run.overwrite)?;
    let Checkpoint {
        dir: ckpt,
        tokenizer: tok,
        weights: mut file,
        sha256: sha,
    } = Checkpoint::read(&job.checkpoint)?;
    let batch = crate::io::tables::read_ipc(&job.masks)?;
    let masks = crate::io::tables::read_dimension_masks(&batch, &job.masks)?;
    let wn = word_name(&file, &ckpt.weights)?;
    let mut m = matrix(&file.tensors[&wn], &wn, &ckpt.weights)?;
    check_masks(&masks, batch.schema().metadata(), &m, &tok, &job.masks)?;
    apply(&mut m, &masks);
    crate::validate::finite(
        &job.checkpoint.display().to_string(),
        &wn,
        m.data.iter().copied(),
    )?;
    let raw = raw_like(&m, &file.tensors[&wn])?;
    file.tensors.insert(wn, raw);
    file.metadata
        .insert("btu:command".into(), "apply-masks".into());
    file.metadata
        .insert("btu:unlearned_from_sha256".into(), sha.clone());
    let out = crate::io::output::OutputDir::create(&job.run.out, job.run.overwrite)?;
    write_checkpoint(&out, &job.checkpoint, &file, &batch)?;
    out.commit()?;
    Ok(ApplyMasksReport {
        command: "apply-masks".into(),
        version: crate::VERSION.into(),
        out: job.run.out.clone(),
        checkpoint_sha256: sha,
        dimensions_replaced: masks.len(),
        tokens: masks
            .iter()
            .map(|x| x.token_id)
            .collect::<BTreeSet<_>>()
            .len(),
    })
}
