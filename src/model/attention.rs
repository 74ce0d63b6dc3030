//! Fused multi-head self-attention for the CPU in f32: `softmax(Q K^T / sqrt(d) + bias) V`, one
//! batch row at a time on each core, every head's scores in one small buffer. The composed form
//! (`transpose`, `contiguous`, two batched matmuls, `affine`, `broadcast_add`, softmax from
//! primitives) makes a dozen passes over a `[b, heads, l, l]` tensor each way and runs its
//! `b * heads` tiny products one after another; this op reads q, k and v side by side as one
//! projection gives them (`[b, l, 3h]`) and writes the context as `[b, l, h]`; its gradient is
//! one `[b, l, 3h]` tensor (one node instead of three). The backward recomputes the probabilities (a
//! `l x l x d` product per head) instead of keeping them. CUDA, f64, half precision and causal
//! masks keep the composed form (`BertClassifier::attention`).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

use super::ops::{exp_nonpositive, f32_slice, par_rows, with_simd};

/// Self-attention over `qkv` `[b, l, 3h]` (the query, key and value projections side by side,
/// contiguous f32 on the CPU) with `heads` heads and an additive per-key bias `[b, l]` (0
/// attended, a large negative number padded); the context `[b, l, h]`.
pub fn self_attention(qkv: &Tensor, key_bias: Vec<f32>, heads: usize) -> Result<Tensor> {
    let (b, l, h3) = qkv.dims3()?;
    let h = h3 / 3;
    if h3 % 3 != 0 || key_bias.len() != b * l || heads == 0 || h % heads != 0 {
        return Err(candle_core::Error::Msg(format!(
            "fused attention: qkv {:?}, bias of {} for {heads} heads",
            qkv.dims(),
            key_bias.len()
        )));
    }
    qkv.apply_op1(SelfAttention {
        dims: Dims { l, h, heads },
        key_bias,
    })
}

#[derive(Clone, Copy)]
struct Dims {
    l: usize,
    h: usize,
    heads: usize,
}

impl Dims {
    fn head(&self) -> usize {
        self.h / self.heads
    }
    /// Elements of one batch row of the context.
    fn item(&self) -> usize {
        self.l * self.h
    }
    /// Elements of one batch row of qkv (and of its gradient).
    fn item3(&self) -> usize {
        3 * self.item()
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head() as f32).sqrt()
    }
}

struct SelfAttention {
    dims: Dims,
    key_bias: Vec<f32>,
}

/// A matrix in memory: its first element and its row and column strides (in elements).
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

impl View {
    /// The `rows x cols` matrix at `s[off..]` with row stride `rs`.
    fn rows(s: &[f32], off: usize, rs: usize) -> Self {
        View {
            ptr: s[off..].as_ptr(),
            rs,
            cs: 1,
        }
    }
    /// The same memory read transposed.
    fn t(self) -> Self {
        View {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst[m x n] (row stride dst_rs) = scale * a[m x k] @ b[k x n]`, on this thread (gemm's own
/// argument list, shortened).
///
/// # Safety
/// `a`, `b` and `dst` must address `m x k`, `k x n` and `m x n` elements through their strides;
/// `dst` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    a: View,
    b: View,
    scale: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        a.ptr,
        a.cs as isize,
        a.rs as isize,
        b.ptr,
        b.cs as isize,
        b.rs as isize,
        0.0,
        scale,
        false,
        false,
        false,
        Parallelism::None,
    )
}

impl SelfAttention {
    /// One head's probabilities for one batch row (`qkv`, `l` rows of `3h`) into `p` `[l, l]`:
    /// the scaled scores of its query and key columns (the head's at `off`), plus the key bias,
    /// softmaxed per query.
    fn probs(&self, qkv: &[f32], off: usize, bias: &[f32], p: &mut [f32]) {
        let Dims { l, h, .. } = self.dims;
        // SAFETY: qkv holds l rows of 3h, the head's columns from off (q) and h + off (k); p is
        // l x l.
        unsafe {
            matmul(
                l,
                l,
                self.dims.head(),
                p.as_mut_ptr(),
                l,
                View::rows(qkv, off, 3 * h),
                View::rows(qkv, h + off, 3 * h).t(),
                self.dims.scale(),
            )
        };
        with_simd(|| {
            for row in p.chunks_mut(l) {
                let mut max = f32::NEG_INFINITY;
                for (s, &b) in row.iter_mut().zip(bias) {
                    *s += b;
                    max = max.max(*s);
                }
                let mut sum = 0f32;
                for s in row.iter_mut() {
                    *s = exp_nonpositive(*s - max);
                    sum += *s;
                }
                for s in row.iter_mut() {
                    *s /= sum;
                }
            }
        })
    }

    /// The context of one batch row (`item`) into `out` `[l, h]`.
    fn forward_item(&self, qkv: &[f32], item: usize, out: &mut [f32], p: &mut [f32]) {
        let Dims { l, h, .. } = self.dims;
        let qkv = &qkv[item * self.dims.item3()..][..self.dims.item3()];
        let bias = &self.key_bias[item * l..][..l];
        for off in (0..h).step_by(self.dims.head()) {
            self.probs(qkv, off, bias, p);
            // SAFETY: p is l x l, the head's value columns l x d from 2h + off (row stride 3h),
            // out's head l x d from off (row stride h).
            unsafe {
                matmul(
                    l,
                    self.dims.head(),
                    l,
                    out[off..].as_mut_ptr(),
                    h,
                    View::rows(p, 0, l),
                    View::rows(qkv, 2 * h + off, 3 * h),
                    1.0,
                )
            };
        }
    }

    /// The gradient of one batch row's qkv (`d`, `l` rows of `3h`) from the gradient `g` of its
    /// context (`l` rows of `h`).
    fn backward_item(
        &self,
        qkv: &[f32],
        g: &[f32],
        item: usize,
        d: &mut [f32],
        scratch: &mut [f32],
    ) {
        let Dims { l, h, .. } = self.dims;
        let (hd, h3) = (self.dims.head(), 3 * h);
        let qkv = &qkv[item * self.dims.item3()..][..self.dims.item3()];
        let g = &g[item * self.dims.item()..][..self.dims.item()];
        let bias = &self.key_bias[item * l..][..l];
        let (p, dp) = scratch.split_at_mut(l * l);
        let scale = self.dims.scale();
        for off in (0..h).step_by(hd) {
            self.probs(qkv, off, bias, p);
            let (q, k, v) = (
                View::rows(qkv, off, h3),
                View::rows(qkv, h + off, h3),
                View::rows(qkv, 2 * h + off, h3),
            );
            let gv = View::rows(g, off, h);
            // SAFETY (both blocks): p and dp are l x l; qkv and d hold l rows of 3h, g l rows of
            // h, each head's d columns at the offsets given; d and dp overlap no input.
            unsafe {
                // dv = p^T g; dp = g v^T.
                let dv = d[2 * h + off..].as_mut_ptr();
                matmul(l, hd, l, dv, h3, View::rows(p, 0, l).t(), gv, 1.0);
                matmul(l, l, hd, dp.as_mut_ptr(), l, gv, v.t(), 1.0);
            }
            // ds = p * (dp - sum_j p dp), times the scale (so dq and dk need no pass of their own).
            with_simd(|| {
                for (pr, dr) in p.chunks(l).zip(dp.chunks_mut(l)) {
                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    for (d, &pv) in dr.iter_mut().zip(pr) {
                        *d = pv * (*d - dot) * scale;
                    }
                }
            });
            unsafe {
                // dq = ds k; dk = ds^T q.
                let ds = View::rows(dp, 0, l);
                matmul(l, hd, l, d[off..].as_mut_ptr(), h3, ds, k, 1.0);
                matmul(l, hd, l, d[h + off..].as_mut_ptr(), h3, ds.t(), q, 1.0);
            }
        }
    }
}

impl CustomOp1 for SelfAttention {
    fn name(&self) -> &'static str {
        "self-attention-fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(s, layout, "attention")?;
        let (n, l) = (self.dims.item(), self.dims.l);
        let items = qkv.len() / self.dims.item3();
        let mut out = vec![0f32; items * n];
        par_rows(&mut out, n, |first, part| {
            let mut p = vec![0f32; l * l];
            for (i, o) in part.chunks_mut(n).enumerate() {
                self.forward_item(qkv, first + i, o, &mut p);
            }
        });
        let (b, l, _) = layout.shape().dims3()?;
        Ok((CpuStorage::F32(out), Shape::from((b, l, self.dims.h))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(qkv.apply_op2_no_bwd(&grad, &SelfAttentionGrad(self))?))
    }
}

/// The backward of [`SelfAttention`] as an op of (qkv, grad of the context): the grad of qkv.
struct SelfAttentionGrad<'a>(&'a SelfAttention);

impl CustomOp2 for SelfAttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "self-attention-fused-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.0;
        let qkv = f32_slice(s1, l1, "attention backward")?;
        let g = f32_slice(s2, l2, "attention backward")?;
        let (n3, l) = (op.dims.item3(), op.dims.l);
        let items = qkv.len() / n3;
        let mut d = vec![0f32; items * n3];
        par_rows(&mut d, n3, |first, part| {
            let mut scratch = vec![0f32; 2 * l * l];
            for (i, di) in part.chunks_mut(n3).enumerate() {
                op.backward_item(qkv, g, first + i, di, &mut scratch);
            }
        });
        Ok((CpuStorage::F32(d), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::{attention_bias, softmax_last};
    use candle_core::{Device, Var, D};

    /// The composed attention the model uses elsewhere (CUDA, f64, causal masks).
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, l, h) = q.dims3()?;
        let hd = h / heads;
        let split = |t: &Tensor| t.reshape((b, l, heads, hd))?.transpose(1, 2)?.contiguous();
        let scores = split(q)?
            .matmul(&split(k)?.t()?)?
            .affine(1.0 / (hd as f64).sqrt(), 0.0)?
            .broadcast_add(bias)?;
        softmax_last(&scores)?
            .matmul(&split(v)?)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, l, h))
    }

    /// Output and gradient against the composed form (whose gradients the suite proves
    /// numerically), with padded keys, more batch rows than cores, and a loss that weighs every
    /// output differently; the padded keys get no attention.
    #[test]
    fn fused_attention_matches_composed_attention_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        // 10 rows of 16 x 3 * 48: par_rows splits them over two cores (blocks of 7 and 3).
        let (b, l, h, heads) = (10, 16, 48, 4);
        let raw: Vec<f32> = (0..b * l * 3 * h)
            .map(|i| (((i as u64 * 2654435761) % 1000) as f32 / 500.0 - 1.0) * 1.5)
            .collect();
        let qkv = Var::from_vec(raw, (b, l, 3 * h), &dev)?;
        let lens = [16u32, 3, 9, 1, 12, 16, 7, 2, 15, 10];
        let mask: Vec<u32> = lens
            .iter()
            .flat_map(|&n| (0..l as u32).map(move |j| u32::from(j < n)))
            .collect();
        let mask = Tensor::from_vec(mask, (b, l), &dev)?;
        let bias = attention_bias(&mask, candle_core::DType::F32)?;
        let key_bias = bias.flatten_all()?.to_vec1::<f32>()?;
        let weights = Tensor::arange(0f32, (b * l * h) as f32, &dev)?
            .affine(0.01, -1.0)?
            .sin()?
            .reshape((b, l, h))?;
        let fused = self_attention(&qkv, key_bias.clone(), heads)?;
        let part = |i: usize| qkv.narrow(2, i * h, h);
        let want = composed(&part(0)?, &part(1)?, &part(2)?, &bias, heads)?;
        let diff = (&fused - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "output differs by {diff}");
        let gf = (&fused * &weights)?.sum_all()?.backward()?;
        let gc = (&want * &weights)?.sum_all()?.backward()?;
        let (a, c) = (
            gf.get(&qkv).expect("fused grad"),
            gc.get(&qkv).expect("composed grad"),
        );
        for (i, name) in ["q", "k", "v"].iter().enumerate() {
            let (a, c) = (a.narrow(2, i * h, h)?, c.narrow(2, i * h, h)?);
            let scale = c.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (a - c)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(scale > 1e-3, "d{name} is not trivial");
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "d{name} differs by {diff} (scale {scale})"
            );
        }
        // A padded key gets no weight: changing its value leaves the output as it was.
        let mut moved = qkv.as_tensor().to_vec3::<f32>()?;
        for x in &mut moved[1][5][2 * h..] {
            *x = 100.0;
        }
        let again = self_attention(&Tensor::new(moved, &dev)?, key_bias, heads)?;
        let diff = (&again - &fused)?
            .abs()?
            .max_keepdim(D::Minus1)?
            .max_all()?;
        assert!(
            diff.to_scalar::<f32>()? < 1e-6,
            "a padded key moved the output"
        );
        Ok(())
    }
}
