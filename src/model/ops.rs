//! Differentiable building blocks. candle's fused `layer_norm` and `softmax_last_dim` have no
//! backward (stack-notes trap 1), so they are written here from primitives that do. A frozen
//! linear layer passes the gradient to its input only (trap 2): no weight-gradient matmul is
//! computed for weights that do not train. On the CPU in f32, LayerNorm and the exact GELU are
//! fused ops with their own one-pass backward (tested against the primitives and central
//! differences below); they made MiniLM's round 1 ~13 % and training ~18 % faster (README). A
//! linear layer with a bias is one op there too (the bias is the product's starting value, no
//! reshape nodes, and only the tracked gradients are computed).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// LayerNorm over the last dimension; a half-precision input is normalised in f32 (as PyTorch's
/// autocast does) and returned in its own dtype. On the CPU in f32 a fused op (one pass forward,
/// one backward); elsewhere from differentiable primitives ([`layer_norm_primitives`]).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if is_half(x.dtype()) {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        return layer_norm(&f(x)?, &f(w)?, &f(b)?, eps)?.to_dtype(x.dtype());
    }
    if cpu_f32(&[x, w, b])
        && w.rank() == 1
        && b.dims() == w.dims()
        && x.dims().last() == Some(&w.dim(0)?)
    {
        return x.apply_op3(w, b, LayerNorm { eps: eps as f32 });
    }
    layer_norm_primitives(x, w, b, eps)
}

/// LayerNorm from differentiable primitives (any device and dtype).
pub fn layer_norm_primitives(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(w)?.broadcast_add(b)
}

/// Whether the fused CPU ops can take these tensors: all contiguous f32 on the CPU.
pub(crate) fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
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
    if let Some(b) = b.filter(|b| linear_f32_applies(x, w, b)) {
        // No reshape: each reshape is a node whose backward adds its gradient into a new one.
        return x.apply_op3(w, b, LinearF32);
    }
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

/// Whether [`LinearF32`] runs `x @ w^T + b`: contiguous f32 on the CPU, `w` [out, in] with `in`
/// the last dimension of `x`, `b` [out].
fn linear_f32_applies(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    cpu_f32(&[x, w, b])
        && x.rank() >= 1
        && w.rank() == 2
        && w.dims()[1] == x.dims()[x.rank() - 1]
        && b.dims() == [w.dims()[0]]
}

/// `x @ w^T + b` for contiguous f32 `x` [.., in], `w` [out, in], `b` [out] on the CPU: the bias
/// is the product's starting value (one pass fewer than matmul, then add, and no copy for a
/// frozen layer). The backward computes only what is tracked: dx for the input, and dw, db only
/// for weights that train (a frozen layer passes `grad @ w` to its input, as [`InputGradOnly`]).
struct LinearF32;

impl CustomOp3 for LinearF32 {
    fn name(&self) -> &'static str {
        "linear-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "linear")?;
        let w = f32_slice(s2, l2, "linear")?;
        let b = f32_slice(s3, l3, "linear")?;
        let (out_f, in_f) = l2.shape().dims2()?;
        let rows = x.len() / in_f;
        let mut y = Vec::with_capacity(rows * out_f);
        for _ in 0..rows {
            y.extend_from_slice(b);
        }
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: y is rows x out (row stride out), x rows x in (row stride in), and w^T read as
        // in x out through w's strides (w is out x in, contiguous); y overlaps neither.
        unsafe {
            gemm::gemm(
                rows,
                out_f,
                in_f,
                y.as_mut_ptr(),
                1,
                out_f as isize,
                true,
                x.as_ptr(),
                1,
                in_f as isize,
                w.as_ptr(),
                in_f as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        };
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = out_f;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // As matrices: reshaping inside a backward records nothing.
        let (out_f, in_f) = w.dims2()?;
        let g = grad.contiguous()?.reshape(((), out_f))?;
        let dx = x
            .track_op()
            .then(|| g.matmul(w).and_then(|d| d.reshape(x.shape())))
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| g.t().and_then(|gt| gt.matmul(&x.reshape(((), in_f))?)))
            .transpose()?;
        let db = b
            .track_op()
            .then(|| g.apply_op1_no_bwd(&SumRows))
            .transpose()?;
        Ok((dx, dw, db))
    }
}

/// The column sums of a contiguous f32 matrix `[rows, n]`, rows added in order (the same sums as
/// candle's `sum(0)`, which walks the matrix column by column, one strided element at a time).
struct SumRows;

impl candle_core::CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "sum-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, "sum of rows")?;
        let n = l.shape().dims2()?.1;
        let mut out = vec![0f32; n];
        with_simd(|| {
            for row in g.chunks(n) {
                for (o, &v) in out.iter_mut().zip(row) {
                    *o += v;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
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

/// GELU with the exact erf (BERT's `gelu`). On the CPU in f32 a fused op: one pass forward and
/// one backward (candle's own backward takes a dozen elementwise passes, each a new tensor, and
/// its erf and exp are scalar libm calls), written so the compiler vectorizes it and split over
/// the cores; elsewhere (CUDA, f64, bf16) candle's `gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[x]) {
        x.apply_op1(GeluErf)
    } else {
        x.gelu_erf()
    }
}

/// e^x for x <= 0 (all the GELU needs), branch-free so a loop over it vectorizes: x = n ln2 + r
/// with |r| <= ln2 / 2 (ln 2 split in two), e^r by its degree-7 Taylor polynomial (truncation
/// < 2e-8 there), 2^n by the exponent bits; below -87 it returns 0 (e^-87 is ~1.6e-38, near the
/// smallest normal f32). Never a subnormal: on many x86 CPUs every multiply or add that reads or
/// makes a subnormal takes a microcode assist (~100x slower), and the products after a softmax
/// or a GELU's tail would make them by the thousand (masked keys' probabilities times values).
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
    let underflow = x < -87.0;
    let x = x.max(-87.0);
    // Round to nearest by adding and removing 1.5 * 2^23 (no libm call, so the loop vectorizes).
    const ROUND: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // ln 2 in two parts (Cody-Waite), so r keeps its precision when n is large.
    let r = (x - n * 0.693_359_4) + n * 2.121_944_4e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    let e = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if underflow {
        0.0
    } else {
        e
    }
}

/// erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, f32's rounding; PyTorch's vectorized
/// CPU erf uses the same formula): one exp, one division.
#[inline(always)]
fn erf_fast(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - p * exp_nonpositive(-a * a);
    y.copysign(x)
}

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => Err(candle_core::Error::Msg(format!(
            "{op} expects a contiguous f32 tensor"
        ))),
    }
}

const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

struct GeluErf;

impl candle_core::CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu")?;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, 1, |start, part| {
            with_simd(|| {
                for (o, &v) in part.iter_mut().zip(&x[start..]) {
                    *o = 0.5 * v * (1.0 + erf_fast(v * std::f32::consts::FRAC_1_SQRT_2));
                }
            })
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfGrad)?,
        ))
    }
}

/// `grad * gelu'(x)`, `gelu'(x) = Phi(x) + x phi(x)`, in one pass.
struct GeluErfGrad;

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "gelu-erf-fused-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "gelu backward")?;
        let g = f32_slice(s2, l2, "gelu backward")?;
        if x.len() != g.len() {
            return Err(candle_core::Error::Msg(
                "gelu backward: shape mismatch".into(),
            ));
        }
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, 1, |start, part| {
            with_simd(|| {
                for ((o, &v), &gv) in part.iter_mut().zip(&x[start..]).zip(&g[start..]) {
                    let cdf = 0.5 * (1.0 + erf_fast(v * std::f32::consts::FRAC_1_SQRT_2));
                    let pdf = FRAC_1_SQRT_2PI * exp_nonpositive(-0.5 * v * v);
                    *o = gv * (cdf + v * pdf);
                }
            })
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Fused LayerNorm over the last dimension of a contiguous f32 `x` with weight and bias `[h]`.
struct LayerNorm {
    eps: f32,
}

/// Mean and 1 / standard deviation of one row (two passes, f32 as PyTorch's CPU kernel).
#[inline(always)]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let h = row.len() as f32;
    let mean = row.iter().sum::<f32>() / h;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer norm")?;
        let (w, b) = (
            f32_slice(s2, l2, "layer norm")?,
            f32_slice(s3, l3, "layer norm")?,
        );
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, h, |r0, part| {
            with_simd(|| {
                for (i, y) in part.chunks_mut(h).enumerate() {
                    let row = &x[(r0 + i) * h..(r0 + i + 1) * h];
                    let (mean, rstd) = row_stats(row, self.eps);
                    for j in 0..h {
                        y[j] = (row[j] - mean) * rstd * w[j] + b[j];
                    }
                }
            })
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = w.dim(0)?;
        let n = x.elem_count();
        let op = LayerNormGrad {
            eps: self.eps,
            params: w.track_op() || b.track_op(),
        };
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &op)?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = w.track_op().then(|| packed.narrow(0, n, h)).transpose()?;
        let db = b
            .track_op()
            .then(|| packed.narrow(0, n + h, h))
            .transpose()?;
        Ok((Some(dx), dw, db))
    }
}

/// LayerNorm's backward for (x, w, grad): `[dx (all of x) | dw (h) | db (h)]` in one buffer;
/// dw and db stay zero unless `params` (a frozen LayerNorm, as in detection, needs dx only).
struct LayerNormGrad {
    eps: f32,
    params: bool,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-fused-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer norm backward")?;
        let w = f32_slice(s2, l2, "layer norm backward")?;
        let g = f32_slice(s3, l3, "layer norm backward")?;
        let (h, n) = (w.len(), x.len());
        let mut out = vec![0f32; n + 2 * h];
        let (dx, dwb) = out.split_at_mut(n);
        // dw and db: each core's rows summed apart, then added in a fixed order (deterministic).
        let partial = std::sync::Mutex::new(Vec::new());
        par_rows(dx, h, |r0, part| {
            let mut acc = vec![0f32; 2 * h];
            let acc_rows = self.params.then_some(acc.as_mut_slice());
            with_simd(|| layer_norm_grad_rows(x, w, g, self.eps, r0, part, acc_rows));
            partial
                .lock()
                .expect("no panics while held")
                .push((r0, acc));
        });
        let mut partial = partial.into_inner().expect("no panics while held");
        partial.sort_by_key(|(r0, _)| *r0);
        for (_, acc) in partial {
            for (o, a) in dwb.iter_mut().zip(acc) {
                *o += a;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * h)))
    }
}

/// LayerNorm's backward over the rows of `part` (row `r0` on): dx into `part`, each row's dw and
/// db added to `acc` (`[dw | db]`) when given.
#[inline(always)]
fn layer_norm_grad_rows(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    r0: usize,
    part: &mut [f32],
    mut acc: Option<&mut [f32]>,
) {
    let h = w.len();
    for (i, d) in part.chunks_mut(h).enumerate() {
        let (row, gr) = (&x[(r0 + i) * h..][..h], &g[(r0 + i) * h..][..h]);
        let (mean, rstd) = row_stats(row, eps);
        // The two row sums in order (a scalar chain), then the per-column sums apart (they
        // vectorize); the same operations in the same order as one loop.
        let (mut s1, mut s2) = (0f32, 0f32);
        for j in 0..h {
            let xhat = (row[j] - mean) * rstd;
            let dxhat = gr[j] * w[j];
            s1 += dxhat;
            s2 += dxhat * xhat;
        }
        if let Some(acc) = acc.as_deref_mut() {
            let (dw, db) = acc.split_at_mut(h);
            for j in 0..h {
                let xhat = (row[j] - mean) * rstd;
                dw[j] += gr[j] * xhat;
                db[j] += gr[j];
            }
        }
        let (m1, m2) = (s1 / h as f32, s2 / h as f32);
        for j in 0..h {
            let xhat = (row[j] - mean) * rstd;
            d[j] = rstd * (gr[j] * w[j] - m1 - xhat * m2);
        }
    }
}

/// Run `f` compiled for AVX2 and FMA where the CPU has them, else as built (SSE2 on x86-64).
/// The kernels' arithmetic has no reassociation and no contraction into fused multiply-adds, so
/// both give the same bits; AVX2 gives 8 lanes instead of 4.
#[inline(always)]
pub(super) fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features `avx2` was compiled for (checked just above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `f(first_row, rows)` over `out` seen as rows of `h`, one contiguous block of rows per core.
pub(super) fn par_rows(out: &mut [f32], h: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / h.max(1);
    let threads = candle_core::utils::get_num_threads();
    let per = rows.div_ceil(threads).max((1 << 14) / h.max(1)).max(1);
    std::thread::scope(|s| {
        let mut parts = out.chunks_mut(per * h).enumerate();
        let first = parts.next();
        for (c, part) in parts {
            let f = &f;
            s.spawn(move || f(c * per, part));
        }
        if let Some((c, part)) = first {
            f(c * per, part);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused f32 GELU and its gradient against candle's GELU in f64 (exact erf), the exact
    /// derivative and central differences, over a range that covers the tails, on a tensor large
    /// enough to be split over the cores; the vectorizable exp against f64's.
    #[test]
    fn fused_gelu_matches_exact_gelu_and_numerical_gradient() {
        for i in 0..=20_000 {
            let x = -90.0 + 90.0 * i as f64 / 20_000.0;
            let xf = x as f32;
            let (got, want) = (exp_nonpositive(xf) as f64, (xf as f64).exp());
            assert!(
                (got - want).abs() <= 3e-7 * want + 1e-37,
                "exp({x}): {got} vs {want}"
            );
            assert!(
                got == 0.0 || got >= f32::MIN_POSITIVE as f64,
                "exp({x}) = {got:e} is subnormal"
            );
        }
        assert_eq!(
            exp_nonpositive(-1e9),
            0.0,
            "a masked key's weight is exactly zero"
        );
        let n = 70_001;
        let xs: Vec<f64> = (0..n)
            .map(|i| -9.0 + 18.0 * i as f64 / (n - 1) as f64)
            .collect();
        let x64 = Tensor::from_slice(&xs, n, &Device::Cpu).unwrap();
        let exact = x64.gelu_erf().unwrap().to_vec1::<f64>().unwrap();
        let var = Var::from_tensor(&x64.to_dtype(DType::F32).unwrap()).unwrap();
        let y = gelu_erf(var.as_tensor()).unwrap();
        let got = y.to_vec1::<f32>().unwrap();
        // Weights so the gradient is not all ones.
        let w: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) / 3.0).collect();
        let wt = Tensor::from_slice(&w, n, &Device::Cpu).unwrap();
        let grads = (y * &wt).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let f = |v: f64| 0.5 * v * (1.0 + erf_fast((v / std::f64::consts::SQRT_2) as f32) as f64);
        for i in 0..n {
            let v = xs[i];
            assert!(
                (got[i] as f64 - exact[i]).abs() <= 2e-6 * (1.0 + v.abs()),
                "gelu({v})"
            );
            // gelu'(v) = Phi(v) + v phi(v), and Phi(v) = gelu(v) / v.
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let cdf = if v == 0.0 { 0.5 } else { exact[i] / v };
            let (wi, gi) = (w[i] as f64, g[i] as f64);
            assert!(
                (gi - wi * (cdf + v * pdf)).abs() <= 1e-5,
                "gelu'({v}) exact"
            );
            let d = (f(v + 1e-3) - f(v - 1e-3)) / 2e-3;
            assert!((gi - wi * d).abs() <= 1e-3, "gelu'({v}) numerical");
        }
    }

    /// The fused f32 LayerNorm and its three gradients against the primitives (whose gradients
    /// `tests/suite/gradients.rs` proves against central differences), with rows split over the
    /// cores; frozen weight and bias get no gradient.
    #[test]
    fn fused_layer_norm_matches_primitives_and_their_gradients() {
        let (b, l, h) = (4, 100, 96); // 400 rows: two blocks of 200
        let val = |i: usize, k: usize| ((i * k % 97) as f32 - 48.0) / 17.0;
        let t = |n: usize, k: usize, shape: &[usize]| {
            let v: Vec<f32> = (0..n).map(|i| val(i, k)).collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        let x = Var::from_tensor(&t(b * l * h, 31, &[b, l, h])).unwrap();
        let w = Var::from_tensor(&t(h, 7, &[h]).affine(0.3, 1.0).unwrap()).unwrap();
        let bias = Var::from_tensor(&t(h, 11, &[h])).unwrap();
        let gw = t(b * l * h, 13, &[b, l, h]);
        let run = |fused: bool| {
            let f = if fused {
                layer_norm
            } else {
                layer_norm_primitives
            };
            let y = f(x.as_tensor(), w.as_tensor(), bias.as_tensor(), 1e-12).unwrap();
            let g = (&y * &gw).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let grad = |v: &Var| flat(g.get(v.as_tensor()).unwrap());
            [flat(&y), grad(&x), grad(&w), grad(&bias)]
        };
        let (fused, prim) = (run(true), run(false));
        for (what, (a, e)) in ["y", "dx", "dw", "db"].iter().zip(fused.iter().zip(&prim)) {
            let scale = e.iter().fold(1f32, |m, v| m.max(v.abs()));
            let d = a.iter().zip(e).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                d <= 2e-5 * scale,
                "{what}: fused differs by {d} (scale {scale})"
            );
        }
        // Frozen weight and bias: only the input gets a gradient, the same as when they train.
        let (wf, bf) = (w.as_tensor().detach(), bias.as_tensor().detach());
        let y = layer_norm(x.as_tensor(), &wf, &bf, 1e-12).unwrap();
        let g = (&y * &gw).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).expect("dx");
        let dx: Vec<f32> = dx.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(dx, fused[1], "dx with frozen weight and bias");
        assert!(g.get(&wf).is_none() && g.get(&bf).is_none());
    }
}
