//! Shared CUDA plumbing for every fused op: the PTX modules that `build.rs` compiles from
//! `src/<op>/<op>.cu`, kernel lookup with per-device caching, device-buffer helpers and launch
//! shapes.
//!
//! Kernels are loaded through `CudaDevice::get_or_load_custom_func`, which caches the loaded
//! module per device **by module name** (the first PTX loaded under a name wins), so each
//! [`PtxModule`] carries a crate-unique name (`lorafuse_<stem>`) and is compiled once per device,
//! never per call. Every launch goes on the device's own stream ([`Kernel::builder`]), so fused
//! ops order correctly with Candle's own kernels without extra synchronisation.
//!
//! Typical use inside a `cuda_fwd`:
//! ```ignore
//! const MODULE: PtxModule = ptx_module!("rms_norm");
//! let x = cuda_util::contiguous_view::<f32>(storage, layout, "rms_norm")?;
//! let out = cuda_util::alloc::<f32>(dev, n)?;
//! let k = MODULE.kernel(dev, &cuda_util::kernel_name("rms_norm_fwd", DType::F32, "rms_norm")?)?;
//! let mut b = k.builder();
//! b.arg(&x).arg(&out).arg(&n_cols_i32);
//! // SAFETY: argument list matches the kernel's signature; buffers hold n_rows * n_cols elements.
//! unsafe { b.launch(cuda_util::row_launch(n_rows, n_cols)) }.map_err(cuda_util::driver_err("rms_norm"))?;
//! ```

// Not every op uses every helper; the set is the shared API, kept whole.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, DriverError, LaunchArgs,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

use crate::error::OpError;

/// A PTX module compiled by `build.rs` from `src/<stem>/<stem>.cu`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PtxModule {
    /// Crate-unique module name, the key of Candle's per-device module cache.
    pub name: &'static str,
    /// The PTX text, embedded at compile time.
    pub ptx: &'static str,
}

/// `ptx_module!("rms_norm")`: the module compiled from `src/rms_norm/rms_norm.cu`, cached under
/// `lorafuse_rms_norm`.
macro_rules! ptx_module {
    ($stem:literal) => {
        $crate::cuda_util::PtxModule {
            name: concat!("lorafuse_", $stem),
            ptx: include_str!(concat!(env!("OUT_DIR"), "/", $stem, ".ptx")),
        }
    };
}
pub(crate) use ptx_module;

/// A loaded kernel bound to the device's stream.
pub(crate) struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
    /// `<module>.<function>`: the key of the launch-shape caches.
    name: String,
}

/// Blocks per SM and SM count of a (kernel, block size, device): driver queries that cost host
/// time on every launch otherwise, for answers that never change.
type FitCache = Mutex<HashMap<(String, u32, usize), (u32, u32)>>;

impl Kernel {
    /// The loaded function, for launches on a stream of the caller's own.
    pub fn function(&self) -> &CudaFunction {
        &self.func
    }

    /// A launch builder on the device's own stream; push arguments in the kernel's order.
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }

    /// Lets launches of this kernel take up to `bytes` of dynamic shared memory: past the default
    /// 48 KB a block needs this opt-in (the setting stays with the loaded function).
    pub fn allow_dynamic_shared(&self, bytes: u32, op: &'static str) -> Result<()> {
        let bytes = i32::try_from(bytes).unwrap_or(i32::MAX);
        self.func
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes,
            )
            .map_err(driver_err(op))
    }
}

impl Kernel {
    /// `(blocks per SM, SMs)` for blocks of `threads` threads and no dynamic shared memory: the
    /// occupancy the compiled kernel allows (registers, static shared memory) and the card's SM
    /// count, asked of the driver once per (kernel, block size, device).
    pub fn fit(&self, threads: u32, op: &'static str) -> Result<(u32, u32)> {
        static FIT: OnceLock<FitCache> = OnceLock::new();
        let ctx = self.stream.context();
        let key = (self.name.clone(), threads, ctx.ordinal());
        let cache = FIT.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(fit) = cache.lock().ok().and_then(|c| c.get(&key).copied()) {
            return Ok(fit);
        }
        let per_sm = self
            .func
            .occupancy_max_active_blocks_per_multiprocessor(threads, 0, None)
            .map_err(driver_err(op))?;
        let sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_err(op))?;
        let fit = (per_sm, sms.max(1) as u32);
        if let Ok(mut c) = cache.lock() {
            c.insert(key, fit);
        }
        Ok(fit)
    }

    /// `launch` (its block size) with the grid of a persistent launch over `rows` work items: as
    /// many blocks as fit on the card at once (`fit`), never more than `rows`, so each block loops
    /// over its share and nothing waits for a second wave. `None` when not even one block fits
    /// on an SM (registers).
    pub fn persistent_launch(
        &self,
        launch: LaunchConfig,
        rows: usize,
        op: &'static str,
    ) -> Result<Option<LaunchConfig>> {
        let (per_sm, sms) = self.fit(launch.block_dim.0, op)?;
        if per_sm == 0 {
            return Ok(None);
        }
        let grid = (per_sm as usize * sms as usize)
            .min(rows.max(1))
            .min(u32::MAX as usize) as u32;
        Ok(Some(LaunchConfig {
            grid_dim: (grid, 1, 1),
            ..launch
        }))
    }

    /// Row `dst_row` of `out` (rows of `n`) as the column sums of `n_chunks` rows of f32 partial
    /// sums, with `self` the op's instantiation of `column_finish` (`cuda_util.cuh`).
    pub fn finish_columns<T: DeviceRepr>(
        &self,
        partial: &CudaSlice<f32>,
        out: &mut CudaSlice<T>,
        (n, dst_row): (usize, usize),
        n_chunks: usize,
        op: &'static str,
    ) -> Result<()> {
        let n_i = to_i32(n, "hidden size", op)?;
        let chunks_i = to_i32(n_chunks, "chunks", op)?;
        let mut dst = out.slice_mut(dst_row * n..(dst_row + 1) * n);
        let mut b = self.builder();
        b.arg(partial).arg(&mut dst).arg(&n_i).arg(&chunks_i);
        // SAFETY: `column_finish` kernels take (const float* partial, T* out, int n, int
        // n_chunks); partial holds n_chunks * n floats (the callers' allocations) and dst is one
        // row of n elements of out.
        unsafe { b.launch(elementwise_launch(n)) }.map_err(driver_err(op))?;
        Ok(())
    }
}

impl PtxModule {
    /// Looks `fn_name` up in this module, loading the module on `dev` the first time.
    pub fn kernel(&self, dev: &CudaDevice, fn_name: &str) -> Result<Kernel> {
        let func = dev
            .get_or_load_custom_func(fn_name, self.name, self.ptx)?
            .into_cuda_function();
        Ok(Kernel {
            func,
            stream: dev.cuda_stream(),
            name: format!("{}.{fn_name}", self.name),
        })
    }

    /// The kernel `<base>_<dtype>` (e.g. `rms_norm_fwd_bf16`), with a typed error for a dtype
    /// the module has no kernel for.
    pub fn kernel_for(
        &self,
        dev: &CudaDevice,
        base: &str,
        dtype: DType,
        op: &'static str,
    ) -> Result<Kernel> {
        self.kernel(dev, &kernel_name(base, dtype, op)?)
    }
}

/// The suffix our kernels use for `dtype`: `f32`, `bf16` or `f16`; an [`OpError::DType`] otherwise.
pub(crate) fn dtype_suffix(dtype: DType, op: &'static str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        dtype => Err(OpError::DType { op, dtype }.into()),
    }
}

/// `<base>_<suffix>`, the naming rule shared by the `.cu` and `.metal` sources.
pub(crate) fn kernel_name(base: &str, dtype: DType, op: &'static str) -> Result<String> {
    Ok(format!("{base}_{}", dtype_suffix(dtype, op)?))
}

/// True when `dtype` has CUDA kernels (f32, bf16, f16): dispatch falls back to the reference else.
pub(crate) fn supported_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// The contiguous data of a tensor argument as a typed view starting at its first element, or
/// `None` for a strided layout (for callers that fall back to another route).
pub(crate) fn try_contiguous_view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<Option<CudaView<'a, T>>> {
    let slice = storage.as_cuda_slice::<T>()?;
    Ok(layout
        .contiguous_offsets()
        .map(|(start, end)| slice.slice(start..end)))
}

/// The contiguous data of a tensor argument as a typed view starting at its first element; an
/// [`OpError::Kernel`] names the op when the layout is strided (callers make inputs contiguous).
pub(crate) fn contiguous_view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
    op: &'static str,
) -> Result<CudaView<'a, T>> {
    match try_contiguous_view(storage, layout)? {
        Some(view) => Ok(view),
        None => Err(OpError::Kernel {
            op,
            msg: format!(
                "expects a contiguous input, got shape {:?} stride {:?}",
                layout.dims(),
                layout.stride()
            ),
        }
        .into()),
    }
}

/// An uninitialised device buffer of `len` elements, for outputs every element of which the
/// kernel writes.
pub(crate) fn alloc<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the buffer is uninitialised; callers pass it only to kernels that write every
    // element before anything reads it.
    unsafe { dev.alloc::<T>(len) }
}

/// A zero-filled device buffer of `len` elements (accumulators, atomics targets).
pub(crate) fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    len: usize,
) -> Result<CudaSlice<T>> {
    dev.alloc_zeros::<T>(len)
}

/// Wraps a device buffer as Candle storage on `dev`.
pub(crate) fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

/// Maps a driver error from a launch into the crate's error, naming the op.
pub(crate) fn driver_err(op: &'static str) -> impl Fn(DriverError) -> candle_core::Error {
    move |e| {
        OpError::Kernel {
            op,
            msg: format!("kernel launch failed: {e}"),
        }
        .into()
    }
}

/// Converts a size to the `int` our kernels take, erroring (not wrapping) past `i32::MAX`.
pub(crate) fn to_i32(n: usize, what: &str, op: &'static str) -> Result<i32> {
    i32::try_from(n).map_err(|_| {
        OpError::Kernel {
            op,
            msg: format!("{what} = {n} exceeds the kernel's 32-bit index range"),
        }
        .into()
    })
}

/// Threads per block for a row-wise kernel (one block per row): enough threads to cover a row
/// with 4-wide vector loads, a whole number of warps, at least one warp and at most 1024.
pub(crate) fn row_block_size(n_cols: usize) -> u32 {
    let per_thread = 4usize;
    let want = n_cols.div_ceil(per_thread).next_power_of_two();
    want.clamp(32, 1024) as u32
}

/// One block per row ([`row_block_size`] threads), `shared_mem_bytes` of dynamic shared memory.
pub(crate) fn row_launch(n_rows: usize, n_cols: usize, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n_rows.max(1) as u32, 1, 1),
        block_dim: (row_block_size(n_cols), 1, 1),
        shared_mem_bytes,
    }
}

/// Elements of a 16-byte pack (the kernels' vector width) for elements of `elem_bytes`.
fn pack_elems(elem_bytes: usize) -> usize {
    (16 / elem_bytes.max(1)).max(1)
}

/// One block per row for the row-wise forwards that hold a row in registers (rms_norm, layer_norm,
/// softmax): about four 16-byte packs per thread, so that every thread has work and loads in
/// flight (a row-length-sized block left half its threads idle on half-precision rows), and small
/// blocks let more rows share an SM. Rows too
/// long for `kRowPacksPerThread` packs per thread get 1024 threads and the kernels' two-pass path.
/// `LORAFUSE_ROW_PACKS` (1, 2 or 4) overrides the four packs per thread, for tuning on a new card.
pub(crate) fn row_launch_packed(n_rows: usize, n_cols: usize, elem_bytes: usize) -> LaunchConfig {
    let pack = pack_elems(elem_bytes);
    let threads = n_cols
        .div_ceil(pack)
        .div_ceil(row_packs())
        .next_power_of_two()
        .clamp(32, 1024);
    LaunchConfig {
        grid_dim: (n_rows.max(1) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The classic register-row forward's kernel for rows of `n_cols`: `<base>8` (8 packs per thread)
/// for rows of 4 to 8 x 1024 whole packs (f32 rows of 16K-32K values: one read of the row instead
/// of the two-pass kernel's two), `<base>` otherwise.
pub(crate) fn row_fwd_kernel(base: &str, n_cols: usize, elem_bytes: usize) -> String {
    let pack = pack_elems(elem_bytes);
    let packs = n_cols / pack;
    if n_cols.is_multiple_of(pack) && packs > 4 * 1024 && packs <= 8 * 1024 {
        format!("{base}8")
    } else {
        base.to_string()
    }
}

/// Packs per thread of the row forwards' blocks: 4, or `LORAFUSE_ROW_PACKS` (1, 2 or 4), read once.
fn row_packs() -> usize {
    static PACKS: OnceLock<usize> = OnceLock::new();
    *PACKS.get_or_init(|| {
        std::env::var("LORAFUSE_ROW_PACKS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|p| matches!(p, 1 | 2 | 4))
            .unwrap_or(4)
    })
}

/// Whether the register-row forwards (rms_norm, layer_norm, softmax) take their persistent form
/// (`<op>_fwd_rows_*`: blocks walk rows and load the next one during the current one's
/// reductions) for rows that fit in registers. On an H200 it wins for 2-byte types (bf16
/// 16384x4096 layer_norm 90 -> 80 us, 16384x32000 888 -> 572 us, where a 1024-thread block sits
/// alone on its SM) and loses for f32 (16384x4096 rms_norm 134 -> 145 us: twice the row
/// registers halve the resident blocks), so it is the default for half types only.
/// `LORAFUSE_ROWS_PERSISTENT=0` turns it off, `=1` turns it on for f32 too.
pub(crate) fn rows_persistent(elem_bytes: usize) -> bool {
    static MODE: OnceLock<Option<bool>> = OnceLock::new();
    let forced = *MODE.get_or_init(
        || match std::env::var("LORAFUSE_ROWS_PERSISTENT").as_deref() {
            Ok("0") => Some(false),
            Ok("1") => Some(true),
            _ => None,
        },
    );
    forced.unwrap_or(elem_bytes == 2)
}

/// Whether a row op's persistent forward (`<op>_fwd_rows_*`) takes rows of `n_cols` at `launch`'s
/// block size: [`rows_persistent`] for the element size, rows of whole 16-byte packs, at most
/// four a thread (`kRowPacksPerThread`), and blocks of at least `min_threads`.
pub(crate) fn persistent_rows_apply(
    n_cols: usize,
    elem_bytes: usize,
    launch: &LaunchConfig,
    min_threads: u32,
) -> bool {
    let pack = pack_elems(elem_bytes);
    let threads = launch.block_dim.0;
    rows_persistent(elem_bytes)
        && threads >= min_threads
        && n_cols.is_multiple_of(pack)
        && n_cols / pack <= 4 * threads as usize
}

/// Launch plans for the norms' register-row backward kernels (`<op>_bwd_rows{2,4}_*`), in order
/// of preference: `(P, launch)`, the packs per thread the kernel is instantiated for and a block
/// size that covers a row with them (the grid is [`Kernel::persistent_launch`]'s). Two packs a
/// thread first (measured faster than four on an H200: half the registers, twice the resident
/// rows); four for rows too long for two. Empty when the row does not split into whole 16-byte
/// packs or exceeds 4 packs x 1024 threads (the two-pass kernels take it), or when
/// `LORAFUSE_NORM_BWD_ROWS=0` turns the path off. A plan may still not launch (too many registers
/// for its block size).
pub(crate) fn bwd_rows_plans(n_cols: usize, elem_bytes: usize) -> Vec<(usize, LaunchConfig)> {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled = *ENABLED
        .get_or_init(|| std::env::var("LORAFUSE_NORM_BWD_ROWS").map_or(true, |v| v.trim() != "0"));
    let pack = pack_elems(elem_bytes);
    if !enabled || n_cols == 0 || !n_cols.is_multiple_of(pack) {
        return Vec::new();
    }
    let packs = n_cols / pack;
    [2usize, 4]
        .into_iter()
        .filter(|p| packs <= p * 1024)
        .map(|p| {
            let threads = packs.div_ceil(p).next_power_of_two().clamp(32, 1024) as u32;
            let launch = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            (p, launch)
        })
        .collect()
}

/// A grid-stride elementwise launch over `n` elements: 256 threads a block and at most enough
/// blocks to fill the card a few times over (the kernel loops for the rest).
pub(crate) fn elementwise_launch(n: usize) -> LaunchConfig {
    const THREADS: usize = 256;
    const MAX_BLOCKS: usize = 65_535;
    let blocks = n.div_ceil(THREADS).clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// How `column_partial_sums` (in `cuda_util.cuh`) splits `rows` into chunks: at least 32 rows a
/// chunk and at most 256 chunks, so a gradient reduction keeps the card busy without a huge
/// partial buffer. Returns `(rows_per_chunk, n_chunks)`.
pub(crate) fn column_chunks(rows: usize) -> (usize, usize) {
    const MAX_CHUNKS: usize = 256;
    let rows_per_chunk = rows.div_ceil(MAX_CHUNKS).max(32);
    (rows_per_chunk, rows.div_ceil(rows_per_chunk).max(1))
}

/// Launch shape of a `column_partial_sums` kernel: 32 x 8 threads, one block per 32 columns and
/// row chunk.
pub(crate) fn column_partial_launch(n_cols: usize, n_chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n_cols.div_ceil(32).max(1) as u32, n_chunks.max(1) as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}
