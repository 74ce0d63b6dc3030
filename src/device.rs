//! `--device auto|cpu|cuda:N`: the compute device, chosen at run time. CUDA needs the `cuda`
//! cargo feature; the default build is CPU-only and says so when CUDA is asked for.

use candle_core::Device;

use crate::error::{BtuError, Result};

/// Resolve a `--device` value.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = s
                .strip_prefix("cuda:")
                .unwrap_or("0")
                .parse()
                .map_err(|_| BtuError::config("--device", format!("'{s}' is not cuda:N")))?;
            if !candle_core::utils::cuda_is_available() {
                return Err(BtuError::config(
                    "--device",
                    format!("'{s}' asked for, but this btu was built without the `cuda` feature or no GPU is visible; use --device cpu"),
                ));
            }
            Device::new_cuda(n)
                .map_err(|e| BtuError::config("--device", format!("cannot open {s}: {e}")))
        }
        other => Err(BtuError::config(
            "--device",
            format!("'{other}' is not auto, cpu or cuda:N"),
        )),
    }
}

/// A short name of a device for summaries.
pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// Keep freed memory in the process instead of handing it back to the kernel after every step
/// (glibc only; a no-op elsewhere, and where the user set `MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TRIM_THRESHOLD_` or `GLIBC_TUNABLES`). A training step allocates and frees hundreds of
/// MB of activations and gradients; by default glibc serves each large block with fresh zeroed
/// pages from the kernel and trims the heap after it, so page faults and page clearing took a
/// large share of a step. With blocks up to 32 MB served from the heap and no trimming, MiniLM
/// detection round 1 ran 1.9x, rounds 2-3 3.5x and training 1.25x as fast on 2 cores at the same
/// peak RSS (320 SST-2 rows, against the binary before, interleaved, two repeats; README,
/// "Against PyTorch on the same CPU"). Called once by the binary before any work.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set_by_user = [
            "MALLOC_MMAP_THRESHOLD_",
            "MALLOC_TRIM_THRESHOLD_",
            "GLIBC_TUNABLES",
        ]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
        if !set_by_user {
            // SAFETY: mallopt only changes the allocator's thresholds; called before any thread.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        }
    }
}

/// `--precision f32|tf32|bf16`: the arithmetic of a training step (`btu detect`, `btu train`).
/// Every variant keeps the trained parameters and AdamW's moments in f32; only the forward and
/// backward passes change. The default, f32, is what every committed result used.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// IEEE f32 throughout.
    #[default]
    F32,
    /// f32 tensors, matrix products on CUDA tensor cores in TF32 (10-bit mantissa inputs, f32
    /// accumulation); CUDA only.
    Tf32,
    /// Mixed precision: the frozen weights and the activations in bfloat16, LayerNorm, softmax
    /// and the loss in f32, the trained parameters (the f32 master copy) cast at each step.
    Bf16,
}

impl Precision {
    /// Whether this is the default (left out of serialized parameters, so existing step hashes and
    /// table provenance stay as they were).
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// Check that `dev` can run this precision; `flag` names the setting in the error.
    pub fn check(&self, flag: &str, dev: &Device) -> Result<()> {
        if *self == Precision::Tf32 && !dev.is_cuda() {
            return Err(BtuError::config(
                flag,
                "tf32 is a CUDA tensor-core mode and the device is the CPU; use f32 (or bf16)",
            ));
        }
        Ok(())
    }

    /// Switch the process's CUDA matrix products to TF32 for this precision until the returned
    /// guard drops (then back to f32, so later steps of the same process, an evaluation or a
    /// verification, run as asked); a no-op without the `cuda` feature or on the CPU.
    pub fn matmul_mode(&self) -> MatmulMode {
        candle_core::cuda::set_gemm_reduced_precision_f32(*self == Precision::Tf32);
        MatmulMode
    }

    /// The dtype the forward and backward passes compute in.
    pub fn compute_dtype(&self) -> candle_core::DType {
        match self {
            Precision::Bf16 => candle_core::DType::BF16,
            _ => candle_core::DType::F32,
        }
    }
}

/// Restores f32 matrix products when dropped ([`Precision::matmul_mode`]).
#[must_use = "the mode lasts as long as the guard"]
pub struct MatmulMode;

impl Drop for MatmulMode {
    fn drop(&mut self) {
        candle_core::cuda::set_gemm_reduced_precision_f32(false);
    }
}
