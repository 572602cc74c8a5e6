//! AdamW CUDA launcher for `adamw.cu`: one launch per (device, dtype) group of tensors, in place.

use super::{Coeffs, OP};
use crate::cuda_util::{self, ptx_module, PtxModule};
use crate::error::shape_err;
use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{
    CudaDevice, DType, Device, Layout, Result, Storage, StorageRef, Tensor, Var, WithDType,
};
use half::{bf16, f16};

const MODULE: PtxModule = ptx_module!("adamw");
const THREADS: u32 = 256;
/// Blocks per tensor at most; the kernel's grid-stride loop covers longer tensors.
const MAX_BLOCKS_X: usize = 1024;

// SAFETY: `Coeffs` is `#[repr(C)]` with nine f32 fields, laid out as the kernel's `AdamCoeffs`.
unsafe impl DeviceRepr for Coeffs {}

/// Steps the listed CUDA tensors whose gradient shares the parameter's dtype (f32, bf16, f16);
/// returns the indices left for the reference.
pub(super) fn step(
    c: &Coeffs,
    idx: &[usize],
    params: &[Var],
    grads: &[Tensor],
    m: &[Var],
    v: &[Var],
) -> Result<Vec<usize>> {
    let mut rest = Vec::new();
    let mut groups: Vec<(CudaDevice, DType, Vec<usize>)> = Vec::new();
    for &i in idx {
        let (Device::Cuda(dev), dt) = (params[i].device(), params[i].dtype()) else {
            rest.push(i);
            continue;
        };
        if grads[i].dtype() != dt || !cuda_util::supported_dtype(dt) || params[i].elem_count() == 0
        {
            rest.push(i);
            continue;
        }
        match groups
            .iter_mut()
            .find(|(d, t, _)| d.same_device(dev) && *t == dt)
        {
            Some((_, _, members)) => members.push(i),
            None => groups.push((dev.clone(), dt, vec![i])),
        }
    }
    for (dev, dt, members) in &groups {
        match dt {
            DType::F32 => launch::<f32>(dev, c, members, params, grads, m, v)?,
            DType::BF16 => launch::<bf16>(dev, c, members, params, grads, m, v)?,
            _ => launch::<f16>(dev, c, members, params, grads, m, v)?,
        }
    }
    Ok(rest)
}

/// The contiguous device buffer behind a tensor's storage guard.
fn view<'a, T: CudaDType>(s: &'a StorageRef<'_>, l: &Layout) -> Result<CudaView<'a, T>> {
    match &**s {
        Storage::Cuda(s) => cuda_util::contiguous_view::<T>(s, l, OP),
        _ => Err(shape_err(OP, "tensor is not on the GPU")),
    }
}

fn launch<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    c: &Coeffs,
    idx: &[usize],
    params: &[Var],
    grads: &[Tensor],
    m: &[Var],
    v: &[Var],
) -> Result<()> {
    // Read guards on every storage for the whole launch: no Rust code can touch these buffers
    // while the kernel updates them (the same exclusion `Var::set` relies on).
    let guards: Vec<_> = idx
        .iter()
        .map(|&i| {
            [
                params[i].storage_and_layout(),
                grads[i].storage_and_layout(),
                m[i].storage_and_layout(),
                v[i].storage_and_layout(),
            ]
        })
        .collect();
    let mut typed = Vec::with_capacity(idx.len());
    for [(ps, pl), (gs, gl), (ms, ml), (vs, vl)] in &guards {
        typed.push((
            view::<T>(ps, pl)?,
            view::<T>(gs, gl)?,
            view::<f32>(ms, ml)?,
            view::<f32>(vs, vl)?,
        ));
    }
    let stream = dev.cuda_stream();
    let mut table = Vec::with_capacity(4 * idx.len());
    let mut lens = Vec::with_capacity(idx.len());
    let mut records = Vec::with_capacity(4 * idx.len());
    for (p, g, mm, vv) in &typed {
        let n = p.len();
        if g.len() != n || mm.len() != n || vv.len() != n {
            return Err(shape_err(
                OP,
                "a parameter, its gradient and its moments differ in length",
            ));
        }
        for (ptr, record) in [
            p.device_ptr(&stream),
            g.device_ptr(&stream),
            mm.device_ptr(&stream),
            vv.device_ptr(&stream),
        ] {
            table.push(ptr);
            records.push(record);
        }
        lens.push(n as u64);
    }
    let max_len = lens.iter().copied().max().unwrap_or(0) as usize;
    let table_dev = dev.clone_htod(&table)?;
    let lens_dev = dev.clone_htod(&lens)?;
    let n_tensors =
        u32::try_from(idx.len()).map_err(|_| shape_err(OP, "too many tensors for one launch"))?;
    let cfg = LaunchConfig {
        grid_dim: (
            max_len.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS_X) as u32,
            n_tensors,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let k = MODULE.kernel_for(dev, "adamw_fwd", T::DTYPE, OP)?;
    let mut b = k.builder();
    b.arg(&table_dev).arg(&lens_dev).arg(c);
    // SAFETY: matches `adamw_fwd_*(const u64* table, const u64* lens, AdamCoeffs)`; the table
    // holds, per tensor, live device pointers to p (T), g (T), m and v (f32) of lens[t] elements
    // each, kept alive and unaliased by the guards above; the launch is on the device's stream,
    // after every earlier write to these buffers.
    unsafe { b.launch(cfg) }.map_err(cuda_util::driver_err(OP))?;
    drop(records);
    Ok(())
}
