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
