//! Parsing `--device` and `--dtype`, and picking the best available device.

use crate::{Error, Result};
use candle_core::{DType, Device};

/// Parses `cpu`, `cuda`, `cuda:N` or `metal`; `None` or `auto` picks the best available.
pub fn parse_device(spec: Option<&str>) -> Result<Device> {
    match spec.unwrap_or("auto") {
        "auto" => Ok(best_device()),
        "cpu" => Ok(Device::Cpu),
        "metal" => Device::new_metal(0).map_err(|e| Error::Invalid(format!("--device metal: {e}"))),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| Error::Invalid(format!("--device {s}: expected cuda:N")))?,
                None => 0,
            };
            let dev = Device::new_cuda(ordinal)
                .map_err(|e| Error::Invalid(format!("--device {s}: {e}")))?;
            // The settings only speed things up: a device that refuses them still works.
            let _ = lorafuse_ops::configure_device(&dev);
            Ok(dev)
        }
        other => Err(Error::Invalid(format!(
            "--device {other}: expected cpu, cuda, cuda:N, metal or auto"
        ))),
    }
}

/// CUDA if this build has it and a GPU answers, else Metal likewise, else the CPU.
pub fn best_device() -> Device {
    if candle_core::utils::cuda_is_available() {
        if let Ok(d) = Device::new_cuda(0) {
            // The settings only speed things up: a device that refuses them still works.
            let _ = lorafuse_ops::configure_device(&d);
            return d;
        }
    }
    if candle_core::utils::metal_is_available() {
        if let Ok(d) = Device::new_metal(0) {
            return d;
        }
    }
    Device::Cpu
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::Invalid(format!(
            "--dtype {other}: expected f32, bf16 or f16"
        ))),
    }
}

/// A short human name for a device (`cpu`, `cuda:0`, `metal:0`).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
