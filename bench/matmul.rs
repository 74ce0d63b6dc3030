//! Matrix products of MiniLM's shapes on the CPU, as candle runs them (its gemm crate kernels):
//! GFLOP/s per shape, forward (x . W^T, W stored [out, in] as in a checkpoint) and the input
//! gradient of a frozen layer (dY . W). Prints JSON. Compare with PyTorch on the same cores:
//! `scripts/bench_matmul_torch.py`.
//!
//!     cargo run --release --example bench_matmul

use candle_core::{Device, Tensor};
use std::time::Instant;

/// Rows (batch 32 x ~30 tokens), and MiniLM's (in, out) layer sizes.
const ROWS: usize = 960;
const SHAPES: [(usize, usize); 3] = [(384, 384), (384, 1536), (1536, 384)];

fn gflops(flop: f64, f: &dyn Fn() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    for _ in 0..5 {
        f()?;
    }
    let n = 50;
    let t = Instant::now();
    for _ in 0..n {
        f()?;
    }
    Ok(flop * n as f64 / t.elapsed().as_secs_f64() / 1e9)
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rows = Vec::new();
    for (k, n) in SHAPES {
        let x = Tensor::randn(0f32, 1.0, (ROWS, k), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let dy = Tensor::randn(0f32, 1.0, (ROWS, n), &dev)?;
        let flop = 2.0 * (ROWS * k * n) as f64;
        let fwd = gflops(flop, &|| x.matmul(&w.t()?))?;
        let bwd = gflops(flop, &|| dy.matmul(&w))?;
        rows.push(serde_json::json!({"m": ROWS, "k": k, "n": n, "forward_gflops": fwd, "input_grad_gflops": bwd}));
    }
    let out = serde_json::json!({
        "threads": candle_core::utils::get_num_threads(),
        "shapes": rows,
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    Ok(())
}
