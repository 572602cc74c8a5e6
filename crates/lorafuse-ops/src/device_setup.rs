//! Per-device settings that training on a GPU wants and Candle leaves at the driver's defaults.

use candle_core::{Device, Result};

/// Prepares a freshly created device for many steps of allocation-heavy work. On CUDA:
///
/// - the stream-ordered memory pool keeps freed memory instead of handing it back to the driver
///   at every synchronisation (the default release threshold is 0, so each step that reads its
///   loss trims the pool and the next step maps tens of GiB again, page by page);
/// - tensors stop recording an event per use: Candle runs everything of a device on one stream,
///   where stream order already protects every buffer, and the events cost host time per launch.
///
/// With `LORAFUSE_TF32=1`, f32 matrix products (Candle's and the LoRA layers') may also use TF32
/// tensor cores: inputs rounded to a 10-bit mantissa, f32 accumulation. Off by default, as in
/// PyTorch (`allow_tf32`); MLX turns it on by default (`MLX_ENABLE_TF32`).
///
/// Call it once, before creating tensors (tensors made earlier keep their event tracking). Other
/// backends need nothing.
pub fn configure_device(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => configure_cuda(dev),
        _ => Ok(()),
    }
}

#[cfg(feature = "cuda")]
fn configure_cuda(dev: &candle_core::CudaDevice) -> Result<()> {
    use crate::cuda_util::driver_err;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    const OP: &str = "configure_device";
    if std::env::var("LORAFUSE_TF32").is_ok_and(|v| v.trim() == "1") {
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
    }
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().map_err(driver_err(OP))?;
    let mut threshold = u64::MAX;
    // SAFETY: `cu_device` comes from a live context; `cuMemPoolSetAttribute` reads a `cuuint64_t`
    // for the release threshold, which `threshold` is, and it outlives the call.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(driver_err(OP))?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(driver_err(OP))?;
    }
    // SAFETY: Candle and every op of this crate launch a device's work on its single stream
    // (`CudaDevice::cuda_stream`), so stream order already orders each buffer's uses and frees;
    // the per-use events only matter across streams, which nothing here creates.
    unsafe { dev.disable_event_tracking() };
    Ok(())
}

/// The most device memory that was ever allocated at once from the device's memory pool (CUDA:
/// the default pool's `USED_MEM_HIGH`, which is what `torch.cuda.max_memory_allocated` reports
/// for PyTorch), or `None` on other backends or if the driver does not say.
pub fn peak_allocated_bytes(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda_pool_attr(
            dev,
            candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        ),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
fn cuda_pool_attr(
    dev: &candle_core::CudaDevice,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
) -> Option<u64> {
    use candle_core::cuda_backend::cudarc::driver::result;
    if std::env::var("LORAFUSE_TF32").is_ok_and(|v| v.trim() == "1") {
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
    }
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().ok()?;
    let mut value = 0u64;
    // SAFETY: the pool comes from a live context's device; the memory attributes are written as
    // one `cuuint64_t`, which `value` is, and it outlives the call.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device()).ok()?;
        result::mem_pool::get_attribute(pool, attr, (&mut value as *mut u64).cast()).ok()?;
    }
    Some(value)
}
