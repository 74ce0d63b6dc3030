//! Sparse word-embedding gradients: a batch reads a few hundred of the vocabulary's rows, so it
//! trains on a copy of just those rows (a small variable, the leaf the backward pass reaches)
//! instead of the whole matrix. The dense way costs, every step, a zeroed gradient the size of the
//! matrix (47 MB for a 30,522 x 384 vocabulary), a copy of it to add the batch's rows into, and a
//! read of it in the optimiser; the sparse way hands the optimiser the touched rows' gradients and
//! their ids, and the optimiser steps every other row with a gradient of zero, so the parameters
//! come out bit for bit the same (PyTorch's dense `nn.Embedding` + AdamW: untouched rows still
//! decay and their moments still fade).

use candle_core::{Tensor, TensorId, Var};

use crate::error::Result;

/// The rows of an embedding matrix one batch reads.
pub struct GatheredRows {
    /// The matrix the rows come from.
    pub table: TensorId,
    /// The distinct token ids of the batch, ascending.
    pub ids: Vec<u32>,
    /// A copy of those rows, `[ids.len(), h]`: the variable the batch trains.
    pub leaf: Var,
    /// The batch's token ids renumbered into `leaf`'s rows, same shape as the batch's ids.
    pub local: Tensor,
}

impl GatheredRows {
    /// The rows of `table` (`[vocab, h]`) that `ids` (u32, any shape, on the CPU) reads.
    pub fn gather(table: &Tensor, ids: &Tensor) -> Result<Self> {
        let flat: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let mut distinct = flat.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let local: Vec<u32> = flat
            .iter()
            .map(|id| distinct.partition_point(|d| d < id) as u32)
            .collect();
        let picked = Tensor::from_slice(&distinct, distinct.len(), table.device())?;
        let leaf = Var::from_tensor(&table.detach().index_select(&picked, 0)?)?;
        Ok(GatheredRows {
            table: table.id(),
            ids: distinct,
            leaf,
            local: Tensor::from_vec(local, ids.shape(), ids.device())?,
        })
    }
}

/// A gradient as the optimiser reads it: every element, or only some rows (the rest are zero).
#[derive(Clone, Copy)]
pub enum GradView<'a> {
    /// One value per parameter element.
    Dense(&'a [f32]),
    /// The gradients of rows `ids` (ascending), `width` values each, one after the other; every
    /// other row's gradient is zero.
    Rows {
        /// Ids of the rows that have a gradient, ascending.
        ids: &'a [u32],
        /// Their gradients, `width` values per id, in the order of `ids`.
        grads: &'a [f32],
        /// Elements per row.
        width: usize,
    },
}

impl GradView<'_> {
    /// Whether this is a gradient for a parameter of `n` elements: one value each, or whole rows
    /// of it (ids ascending, every id a row of the parameter).
    pub fn covers(&self, n: usize) -> bool {
        match *self {
            GradView::Dense(g) => g.len() == n,
            GradView::Rows { ids, grads, width } => {
                width > 0
                    && n.is_multiple_of(width)
                    && grads.len() == ids.len() * width
                    && ids.last().is_none_or(|&id| (id as usize + 1) * width <= n)
            }
        }
    }

    /// Elements per row: the unit the optimiser splits the parameter into.
    pub fn width(&self) -> usize {
        match self {
            GradView::Dense(_) => 1,
            GradView::Rows { width, .. } => *width,
        }
    }

    /// Calls `f(offset, gradient)` for consecutive runs covering elements `[start, start + n)`
    /// (`start` and `n` whole rows), zeros where a row has no gradient.
    pub fn runs(&self, start: usize, n: usize, zeros: &[f32], mut f: impl FnMut(usize, &[f32])) {
        match *self {
            GradView::Dense(g) => f(0, &g[start..start + n]),
            GradView::Rows { ids, grads, width } => {
                let first = start / width;
                let mut k = ids.partition_point(|&id| (id as usize) < first);
                for r in 0..n / width {
                    let row = first + r;
                    let g = if k < ids.len() && ids[k] as usize == row {
                        k += 1;
                        &grads[(k - 1) * width..k * width]
                    } else {
                        &zeros[..width]
                    };
                    f(r * width, g);
                }
            }
        }
    }
}
