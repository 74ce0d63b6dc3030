//! The training path must reach the word embeddings (stack-notes trap 1) and must not compute
//! gradients for frozen weights (trap 2): autograd gradients checked against central differences.

use btu::model::ops::cross_entropy;
use btu::model::{Arch, BertClassifier, Trainable};
use btu::steps::init_model::{config_for, ModelSize};
use candle_core::{DType, Device, Tensor};

/// Every model family btu supports.
const FAMILIES: [btu::model::Family; 4] = [
    btu::model::Family::Bert,
    btu::model::Family::Roberta,
    btu::model::Family::Distilbert,
    btu::model::Family::Gpt2,
];

fn tiny(seed: u64) -> BertClassifier {
    tiny_of(seed, btu::model::Family::Bert)
}

fn tiny_of(seed: u64, arch: btu::model::Family) -> BertClassifier {
    let size = ModelSize {
        arch,
        layers: 2,
        hidden: 16,
        heads: 2,
        intermediate: 32,
        max_position: 16,
        num_labels: 3,
        ..Default::default()
    };
    let cfg = config_for(40, &size, 0);
    BertClassifier::random(cfg, seed, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

fn batch() -> (Tensor, Tensor, Vec<u32>) {
    // Two rows, the second padded (pad id 0); tokens 5, 7, 9, 11 and 13 occur.
    let ids = Tensor::from_vec(
        vec![2u32, 5, 7, 9, 3, 2, 11, 13, 3, 0],
        (2, 5),
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::from_vec(
        vec![1f64, 1., 1., 1., 1., 1., 1., 1., 1., 0.],
        (2, 5),
        &Device::Cpu,
    )
    .unwrap();
    (ids, mask, vec![2, 0])
}

fn loss(m: &BertClassifier, arch: Arch) -> f64 {
    let (ids, mask, labels) = batch();
    cross_entropy(&m.forward(arch, &ids, &mask).unwrap(), &labels)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn check_arch(arch: Arch) {
    check(arch, btu::model::Family::Bert);
}

fn check(arch: Arch, family: btu::model::Family) {
    let mut m = tiny_of(7, family);
    // A non-trivial head so gradients are not tiny.
    m.classifier.w = (m.classifier.w.clone() * 20.0).unwrap();
    let vars = m.make_trainable(Trainable::WordEmbeddings).unwrap();
    assert_eq!(vars.len(), 1);
    let var = &vars[0].1;
    let (ids, mask, labels) = batch();
    let l = cross_entropy(&m.forward(arch, &ids, &mask).unwrap(), &labels).unwrap();
    let grads = l.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("the word embeddings get a gradient")
        .to_vec2::<f64>()
        .unwrap();
    // Frozen weights are not even on the gradient path.
    assert!(
        grads.get(&m.layers[0].query.w).is_none(),
        "frozen query weight got a gradient"
    );
    assert!(
        grads.get(&m.classifier.w).is_none(),
        "frozen head got a gradient"
    );
    let base: Vec<Vec<f64>> = var.as_tensor().to_vec2().unwrap();
    let eps = 1e-5;
    let mut max_abs = 0f64;
    for &tok in &[5usize, 9, 13, 2, 0, 20] {
        for dim in [0usize, 3, 15] {
            let mut plus = base.clone();
            plus[tok][dim] += eps;
            var.set(&Tensor::new(plus, &Device::Cpu).unwrap()).unwrap();
            let lp = loss(&m, arch);
            let mut minus = base.clone();
            minus[tok][dim] -= eps;
            var.set(&Tensor::new(minus, &Device::Cpu).unwrap()).unwrap();
            let lm = loss(&m, arch);
            var.set(&Tensor::new(base.clone(), &Device::Cpu).unwrap())
                .unwrap();
            let num = (lp - lm) / (2.0 * eps);
            let ana = g[tok][dim];
            max_abs = max_abs.max(ana.abs());
            assert!(
                (num - ana).abs() <= 1e-7 + 1e-5 * num.abs(),
                "{arch:?} token {tok} dim {dim}: autograd {ana} vs numerical {num}"
            );
        }
    }
    assert!(
        max_abs > 1e-4,
        "{arch:?}: gradients suspiciously small ({max_abs})"
    );
    // Token 20 never occurs: its row gets exactly zero gradient.
    assert!(g[20].iter().all(|&x| x == 0.0));
}

#[test]
fn word_embedding_gradient_matches_numerical_full_model() {
    check_arch(Arch::Full);
}

/// RoBERTa (positions after the padding position), DistilBERT (no token types, ReLU head) and
/// GPT-2 (causal pre-LayerNorm blocks, the last token's state).
#[test]
fn word_embedding_gradient_matches_numerical_in_every_family() {
    for family in [
        btu::model::Family::Roberta,
        btu::model::Family::Distilbert,
        btu::model::Family::Gpt2,
    ] {
        check(Arch::Full, family);
        check(Arch::EmbeddingMean, family);
    }
}

#[test]
fn word_embedding_gradient_matches_numerical_mean_pooling() {
    check_arch(Arch::WordMean);
}

#[test]
fn word_embedding_gradient_matches_numerical_embedding_block() {
    check_arch(Arch::EmbeddingMean);
}

#[test]
fn frozen_path_and_trainable_path_give_the_same_embedding_gradient() {
    let (ids, mask, labels) = batch();
    let mut frozen = tiny(3);
    let vf = frozen.make_trainable(Trainable::WordEmbeddings).unwrap();
    let lf = cross_entropy(&frozen.forward(Arch::Full, &ids, &mask).unwrap(), &labels).unwrap();
    let gf = lf.backward().unwrap();
    let mut all = tiny(3);
    let va = all.make_trainable(Trainable::All).unwrap();
    assert_eq!(va.len(), all.named().len());
    let la = cross_entropy(&all.forward(Arch::Full, &ids, &mask).unwrap(), &labels).unwrap();
    let ga = la.backward().unwrap();
    let a = gf.get(vf[0].1.as_tensor()).unwrap();
    let b = ga.get(va[0].1.as_tensor()).unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_keepdim(0)
        .unwrap()
        .max(1)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    assert!(diff < 1e-12, "embedding gradients differ by {diff}");
    // With every weight trainable, the encoder weights do get gradients.
    assert!(ga
        .get(
            va.iter()
                .find(|(n, _)| n.ends_with("layer.0.attention.self.query.weight"))
                .unwrap()
                .1
                .as_tensor()
        )
        .is_some());
}

#[test]
fn differentiable_layer_norm_matches_reference_formula() {
    let x = Tensor::new(&[[1f64, 2., 4., 8.], [-1., 0., 1., 3.]], &Device::Cpu).unwrap();
    let w = Tensor::new(&[1f64, 2., 0.5, 1.], &Device::Cpu).unwrap();
    let b = Tensor::new(&[0f64, 1., 0., -1.], &Device::Cpu).unwrap();
    let y = btu::model::ops::layer_norm(&x, &w, &b, 1e-12)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    for (row, out) in [[1f64, 2., 4., 8.], [-1., 0., 1., 3.]].iter().zip(&y) {
        let mean = row.iter().sum::<f64>() / 4.0;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
        for i in 0..4 {
            let expect = (row[i] - mean) / var.sqrt() * [1., 2., 0.5, 1.][i] + [0., 1., 0., -1.][i];
            assert!((out[i] - expect).abs() < 1e-9);
        }
    }
}

/// `--precision bf16`: the frozen weights and activations in bf16, the trained parameters f32.
/// Its gradients must be those of f32 up to bf16's rounding (the f32 path is proven against
/// central differences above), land on the f32 variables, and skip frozen weights as f32 does;
/// with every parameter trained, each one still gets its gradient through the per-step cast.
#[test]
fn mixed_precision_gradients_follow_f32_in_every_family() {
    let rel = |a: &Tensor, b: &Tensor| -> f64 {
        let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let d = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
        let n = b.sqr().unwrap().sum_all().unwrap();
        (d.to_scalar::<f64>().unwrap() / n.to_scalar::<f64>().unwrap()).sqrt()
    };
    for family in FAMILIES {
        for which in [Trainable::WordEmbeddings, Trainable::All] {
            let mut base = tiny_of(7, family).to_dtype(DType::F32).unwrap();
            base.classifier.w = (base.classifier.w.clone() * 20.0).unwrap();
            let (ids, mask, labels) = batch();
            let mask = mask.to_dtype(DType::F32).unwrap();
            let grads_of = |bf16: bool| {
                let mut m = base.clone();
                let vars = m.make_trainable(which).unwrap();
                if bf16 {
                    m.set_compute_dtype(DType::BF16).unwrap();
                }
                let logits = m.forward(Arch::Full, &ids, &mask).unwrap();
                assert_eq!(logits.dtype(), if bf16 { DType::BF16 } else { DType::F32 });
                let loss = cross_entropy(&logits, &labels).unwrap();
                assert_eq!(loss.dtype(), DType::F32, "the loss is scored in f32");
                let g = loss.backward().unwrap();
                let frozen_grad = g.get(&m.layers[0].query.w).is_some();
                let out: Vec<(String, Tensor)> = vars
                    .iter()
                    .map(|(n, v)| {
                        assert_eq!(v.dtype(), DType::F32, "{n}: the master copy stays f32");
                        let gv = g.get(v.as_tensor()).unwrap_or_else(|| {
                            panic!("{family:?} {which:?} bf16={bf16}: {n} got no gradient")
                        });
                        assert_eq!(gv.dtype(), DType::F32);
                        (n.clone(), gv.clone())
                    })
                    .collect();
                (out, frozen_grad, m)
            };
            let (f32_grads, _, _) = grads_of(false);
            let (bf_grads, frozen_grad, m) = grads_of(true);
            if which == Trainable::WordEmbeddings {
                assert!(!frozen_grad, "{family:?}: a frozen weight got a gradient");
                assert_eq!(m.layers[0].query.w.dtype(), DType::BF16);
            }
            for ((n, a), (_, b)) in bf_grads.iter().zip(&f32_grads) {
                // The key bias adds one constant to a query's scores over all keys, which the
                // softmax removes: its gradient is zero up to rounding, in f32 as in bf16.
                if n.ends_with("key.bias") {
                    continue;
                }
                let e = rel(a, b);
                assert!(
                    e < 0.05,
                    "{family:?} {which:?} {n}: bf16 gradient off by {e:.3} (relative)"
                );
            }
        }
    }
}

/// On the CPU in f32 the model runs fused ops (linear layers, self-attention over q, k and v
/// projected together, LayerNorm, GELU); the central-difference checks above run in f64, where it
/// is composed from primitives. Every parameter's fused f32 gradient must be the composed f64
/// one up to f32's rounding, in every family (GPT-2's causal attention stays composed).
#[test]
fn fused_f32_gradients_match_the_composed_f64_ones_in_every_family() {
    for family in FAMILIES {
        let grads_of = |dtype: DType| -> Vec<(String, Tensor)> {
            let mut m = tiny_of(7, family).to_dtype(dtype).unwrap();
            let vars = m.make_trainable(Trainable::All).unwrap();
            let (ids, mask, labels) = batch();
            let mask = mask.to_dtype(dtype).unwrap();
            let logits = m.forward(Arch::Full, &ids, &mask).unwrap();
            let g = cross_entropy(&logits, &labels).unwrap().backward().unwrap();
            vars.iter()
                .map(|(n, v)| {
                    let gv = g
                        .get(v.as_tensor())
                        .unwrap_or_else(|| panic!("{n}: no gradient"));
                    (n.clone(), gv.to_dtype(DType::F64).unwrap())
                })
                .collect()
        };
        let (fused, composed) = (grads_of(DType::F32), grads_of(DType::F64));
        assert_eq!(fused.len(), composed.len());
        for ((n, a), (_, b)) in fused.iter().zip(&composed) {
            let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
            let d = d.max(0).unwrap().to_scalar::<f64>().unwrap();
            let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let scale = scale.to_scalar::<f64>().unwrap();
            // The key bias's gradient is zero up to rounding (the softmax removes a constant).
            if n.ends_with("key.bias") || n.ends_with("k_lin.bias") || n.ends_with("c_attn.bias") {
                assert!(d < 1e-6, "{family:?} {n}: {d}");
                continue;
            }
            assert!(
                scale > 1e-8,
                "{family:?} {n}: a trivial gradient proves nothing"
            );
            assert!(
                d <= 1e-4 * scale + 1e-7,
                "{family:?} {n}: fused f32 gradient off by {d:e} (largest {scale:e})"
            );
        }
    }
}

/// A training step on the CPU in f32 trains only the word-embedding rows its batch reads
/// (`train_step`, a small leaf variable instead of the whole matrix's gradient); every parameter
/// must come out bit for bit as the dense gradient and AdamW leave it, over steps whose batches
/// read different rows, in every family, with only the embeddings or everything trained.
#[test]
fn training_on_gathered_embedding_rows_gives_the_dense_step_bit_for_bit() {
    use btu::training::{train_step, AdamW, AdamWConfig};
    let batches = [
        vec![2u32, 5, 7, 9, 3, 2, 11, 13, 3, 0],
        vec![2u32, 17, 7, 3, 0, 2, 19, 19, 5, 3],
        vec![2u32, 23, 29, 31, 3, 2, 5, 3, 0, 0],
    ];
    let masks = [
        vec![1f32, 1., 1., 1., 1., 1., 1., 1., 1., 0.],
        vec![1f32, 1., 1., 1., 0., 1., 1., 1., 1., 1.],
        vec![1f32, 1., 1., 1., 1., 1., 1., 1., 0., 0.],
    ];
    for family in FAMILIES {
        for which in [Trainable::WordEmbeddings, Trainable::All] {
            let base = tiny_of(7, family).to_dtype(DType::F32).unwrap();
            let (mut dense, mut gathered) = (base.clone(), base);
            let cfg = AdamWConfig::with_lr(1e-2);
            let vars = |m: &mut BertClassifier| {
                let v = m.make_trainable(which).unwrap();
                AdamW::new(v.into_iter().map(|(_, v)| v).collect(), cfg).unwrap()
            };
            let (mut od, mut og) = (vars(&mut dense), vars(&mut gathered));
            assert!(og.steps_rows_of(&gathered.word));
            for (b, (ids, mask)) in batches.iter().zip(&masks).enumerate() {
                let ids = Tensor::from_vec(ids.clone(), (2, 5), &Device::Cpu).unwrap();
                let mask = Tensor::from_vec(mask.clone(), (2, 5), &Device::Cpu).unwrap();
                let labels = [(b % 3) as u32, ((b + 1) % 3) as u32];
                let logits = dense.forward(Arch::Full, &ids, &mask).unwrap();
                let grads = cross_entropy(&logits, &labels).unwrap().backward().unwrap();
                od.step(&grads, None).unwrap();
                train_step(&gathered, Arch::Full, &mut og, &ids, &mask, &labels).unwrap();
            }
            let bits = |t: &Tensor| -> Vec<u32> {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                v.iter().map(|f| f.to_bits()).collect()
            };
            let moved =
                bits(&dense.word) != bits(&tiny_of(7, family).word.to_dtype(DType::F32).unwrap());
            assert!(moved, "{family:?} {which:?}: the embeddings did not train");
            for ((n, a), (_, b)) in dense.named().iter().zip(gathered.named().iter()) {
                assert!(
                    bits(a) == bits(b),
                    "{family:?} {which:?} {n}: gathered rows trained differently"
                );
            }
        }
    }
}
