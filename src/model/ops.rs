//! Differentiable building blocks. candle's fused `layer_norm` and `softmax_last_dim` have no
//! backward (stack-notes trap 1), so they are written here from primitives that do. A frozen
//! linear layer passes the gradient to its input only (trap 2): no weight-gradient matmul is
//! computed for weights that do not train.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// LayerNorm over the last dimension from differentiable primitives; a half-precision input is
/// normalised in f32 (as PyTorch's autocast does) and returned in its own dtype.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if is_half(x.dtype()) {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        return layer_norm(&f(x)?, &f(w)?, &f(b)?, eps)?.to_dtype(x.dtype());
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(w)?.broadcast_add(b)
}

/// bf16 or f16: computed in f32 where precision matters (LayerNorm, softmax, the loss).
fn is_half(d: DType) -> bool {
    matches!(d, DType::BF16 | DType::F16)
}

/// Softmax over the last dimension from differentiable primitives (a half-precision input in
/// f32, returned in its own dtype).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if is_half(x.dtype()) {
        return softmax_last(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype());
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let xs = x.broadcast_sub(&max)?;
    let lse = xs.exp()?.sum_keepdim(D::Minus1)?.log()?;
    xs.broadcast_sub(&lse)
}

/// Mean cross-entropy of `logits` [n, c] against `labels` (class indices); half-precision
/// logits are scored in f32.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    if is_half(logits.dtype()) {
        return cross_entropy(&logits.to_dtype(DType::F32)?, labels);
    }
    let (n, c) = logits.dims2()?;
    let mut onehot = vec![0f64; n * c];
    for (i, &l) in labels.iter().enumerate() {
        onehot[i * c + l as usize] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (n, c), logits.device())?.to_dtype(logits.dtype())?;
    let lp = log_softmax_last(logits)?;
    (lp * onehot)?.sum_all()?.affine(-1.0 / n as f64, 0.0)
}

/// `x @ w^T + b` for `x` of any rank (last dim = in features), `w` [out, in].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = *dims.last().expect("linear input has a rank");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((rows, inner))?;
    // A trained weight is a variable, or under mixed precision a cast of one (tracked).
    let trainable = w.track_op() || b.is_some_and(|b| b.track_op());
    let y = if trainable || !x2.track_op() {
        let y = x2.matmul(&w.t()?)?;
        match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }
    } else {
        // Frozen weights: compute the output without tracking, then attach a node whose
        // backward is grad @ w only.
        let xd = x2.detach();
        let y = xd.matmul(&w.t()?)?;
        let y = match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }
        .contiguous()?;
        x2.apply_op2(&y, InputGradOnly { w: w.clone() })?
    };
    let mut out = dims;
    *out.last_mut().expect("rank") = w.dim(0)?;
    y.reshape(out)
}

/// Custom op whose forward returns its second argument (the precomputed output of a frozen
/// linear layer) and whose backward sends `grad @ w` to its first argument (the input).
struct InputGradOnly {
    w: Tensor,
}

fn copy_contiguous(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("input-grad-only expects a contiguous output".into())
    })?;
    let out = match s {
        CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[start..end].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[start..end].to_vec()),
        _ => {
            return Err(candle_core::Error::Msg(
                "input-grad-only supports float tensors".into(),
            ))
        }
    };
    Ok((out, l.shape().clone()))
}

impl CustomOp2 for InputGradOnly {
    fn name(&self) -> &'static str {
        "input-grad-only"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_contiguous(s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if l2.start_offset() != 0 || !l2.is_contiguous() {
            return Err(candle_core::Error::Msg(
                "input-grad-only expects a fresh contiguous output".into(),
            ));
        }
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn bwd(
        &self,
        _a1: &Tensor,
        _a2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&self.w)?), None))
    }
}

/// Additive attention bias from a 0/1 mask [b, l]: 0 where attended, -1e9 where padded;
/// shaped [b, 1, 1, l].
pub fn attention_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let m = mask.to_dtype(dtype)?;
    m.affine(1e9, -1e9)?.reshape((b, 1, 1, l))
}
