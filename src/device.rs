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
