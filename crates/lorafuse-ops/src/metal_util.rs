//! Shared Metal plumbing for the fused ops: kernel libraries compiled from `src/<op>/<op>.metal`
//! (prefixed with `src/metal_util.metal`), compiled once per device and cached with their
//! pipelines, and a small dispatch helper.
//!
//! Candle's own Metal kernels are compiled once per device by `Kernels`; ours follow the same
//! rule through a process-wide cache keyed by (device, module, function), so no library is ever
//! compiled per call. Dispatches go through the device's command encoder, whose input/output
//! tracking inserts the memory barriers between a kernel and the next one that reads its output.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::metal_backend::DeviceId;
use candle_core::{DType, Layout, MetalDevice, MetalStorage, Result};
use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder, ComputePipeline, Library};
use objc2_metal::MTLSize;

use crate::error::OpError;

/// A Metal kernel library: the shared header and one op's `.metal` source.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MetalModule {
    /// Crate-unique name, part of the cache key.
    pub name: &'static str,
    /// The MSL source, embedded at compile time.
    pub src: &'static str,
}

/// `metal_module!("rms_norm")`: `src/metal_util.metal` + `src/rms_norm/rms_norm.metal`.
macro_rules! metal_module {
    ($stem:literal) => {
        $crate::metal_util::MetalModule {
            name: concat!("lorafuse_", $stem),
            src: concat!(
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/metal_util.metal")),
                include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/src/",
                    $stem,
                    "/",
                    $stem,
                    ".metal"
                ))
            ),
        }
    };
}
pub(crate) use metal_module;

type LibraryCache = HashMap<(DeviceId, &'static str), Library>;
type PipelineCache = HashMap<(DeviceId, &'static str, String), ComputePipeline>;

static LIBRARIES: OnceLock<Mutex<LibraryCache>> = OnceLock::new();
static PIPELINES: OnceLock<Mutex<PipelineCache>> = OnceLock::new();

fn kernel_err(op: &'static str, msg: impl std::fmt::Display) -> candle_core::Error {
    OpError::Kernel {
        op,
        msg: msg.to_string(),
    }
    .into()
}

impl MetalModule {
    /// The pipeline for `fn_name`, compiling the library on `dev` the first time.
    pub fn pipeline(
        &self,
        dev: &MetalDevice,
        fn_name: &str,
        op: &'static str,
    ) -> Result<ComputePipeline> {
        let key = (dev.id(), self.name, fn_name.to_string());
        let pipelines = PIPELINES.get_or_init(Default::default);
        if let Some(p) = pipelines.lock().map_err(|e| kernel_err(op, e))?.get(&key) {
            return Ok(p.clone());
        }
        let library = {
            let libs = LIBRARIES.get_or_init(Default::default);
            let mut libs = libs.lock().map_err(|e| kernel_err(op, e))?;
            match libs.get(&(dev.id(), self.name)) {
                Some(l) => l.clone(),
                None => {
                    let l = dev
                        .device()
                        .new_library_with_source(self.src, None)
                        .map_err(|e| kernel_err(op, format!("compiling {}: {e}", self.name)))?;
                    libs.insert((dev.id(), self.name), l.clone());
                    l
                }
            }
        };
        let function = library
            .get_function(fn_name, None)
            .map_err(|e| kernel_err(op, format!("no kernel {fn_name}: {e}")))?;
        let pipeline = dev
            .device()
            .new_compute_pipeline_state_with_function(&function)
            .map_err(|e| kernel_err(op, format!("pipeline {fn_name}: {e}")))?;
        pipelines
            .lock()
            .map_err(|e| kernel_err(op, e))?
            .insert(key, pipeline.clone());
        Ok(pipeline)
    }

    /// The pipeline `<base>_<dtype>`; an [`OpError::DType`] for a dtype without kernels.
    pub fn pipeline_for(
        &self,
        dev: &MetalDevice,
        base: &str,
        dtype: DType,
        op: &'static str,
    ) -> Result<ComputePipeline> {
        let suffix = match dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            dtype => return Err(OpError::DType { op, dtype }.into()),
        };
        self.pipeline(dev, &format!("{base}_{suffix}"), op)
    }
}

/// One kernel argument, bound at its index in the order given.
pub(crate) enum Arg<'a> {
    /// A buffer the kernel reads, with a byte offset.
    In(&'a Buffer, usize),
    /// A buffer the kernel writes, with a byte offset.
    Out(&'a Buffer, usize),
    U32(u32),
    F32(f32),
}

/// The contiguous storage of an argument as `(buffer, byte offset)`.
pub(crate) fn input<'a>(s: &'a MetalStorage, l: &Layout, op: &'static str) -> Result<Arg<'a>> {
    if !l.is_contiguous() {
        return Err(kernel_err(
            op,
            format!("expects a contiguous input, got stride {:?}", l.stride()),
        ));
    }
    Ok(Arg::In(
        s.buffer(),
        l.start_offset() * s.dtype().size_in_bytes(),
    ))
}

/// Converts a size to the `uint` our kernels take.
pub(crate) fn to_u32(n: usize, what: &str, op: &'static str) -> Result<u32> {
    u32::try_from(n).map_err(|_| kernel_err(op, format!("{what} = {n} exceeds 32 bits")))
}

/// Encodes one dispatch of `groups` threadgroups of `threads` threads each.
pub(crate) fn dispatch(
    dev: &MetalDevice,
    pipeline: &ComputePipeline,
    args: &[Arg],
    groups: usize,
    threads: usize,
) -> Result<()> {
    let encoder = dev.command_encoder()?;
    let enc: &ComputeCommandEncoder = encoder.as_ref();
    enc.set_compute_pipeline_state(pipeline);
    for (i, a) in args.iter().enumerate() {
        match a {
            Arg::In(b, off) => enc.set_input_buffer(i, Some(b), *off),
            Arg::Out(b, off) => enc.set_output_buffer(i, Some(b), *off),
            Arg::U32(v) => enc.set_bytes(i, v),
            Arg::F32(v) => enc.set_bytes(i, v),
        }
    }
    let size = |width: usize| MTLSize {
        width,
        height: 1,
        depth: 1,
    };
    enc.dispatch_thread_groups(size(groups.max(1)), size(threads));
    Ok(())
}

/// Threads per threadgroup for a one-group-per-row kernel: like CUDA's, 4 elements a thread,
/// a whole number of 32-wide SIMD groups, within the pipeline's limit.
pub(crate) fn row_threads(pipeline: &ComputePipeline, n_cols: usize) -> usize {
    let max = pipeline.max_total_threads_per_threadgroup().clamp(32, 1024);
    n_cols.div_ceil(4).next_power_of_two().clamp(32, max)
}

/// `(groups, threads)` covering `n` elements with 256-thread groups.
pub(crate) fn elementwise(n: usize) -> (usize, usize) {
    (n.div_ceil(256).max(1), 256)
}

/// A new output buffer of `count` elements on `dev`.
pub(crate) fn output(
    dev: &MetalDevice,
    count: usize,
    dtype: DType,
    label: &str,
) -> Result<std::sync::Arc<Buffer>> {
    dev.new_buffer(count.max(1), dtype, label)
}

/// Wraps an output buffer as storage.
pub(crate) fn storage(
    buf: std::sync::Arc<Buffer>,
    dev: &MetalDevice,
    count: usize,
    dtype: DType,
) -> MetalStorage {
    MetalStorage::new(buf, dev.clone(), count, dtype)
}
