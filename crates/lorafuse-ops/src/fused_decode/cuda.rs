//! Host side of the fused decode step: buffers, pointers, launches and the CUDA graph.
//!
//! The engine runs on a stream of its own: CUDA graphs cannot be captured on Candle's per-thread
//! default stream's legacy neighbours, and a private stream keeps the capture free of anything
//! Candle enqueues. Candle's stream is joined once, when the prefix is copied in.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::{
    self, CUfunction_attribute, CUgraphInstantiate_flags, CUlaunchAttributeID, CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::{
    result, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice,
};
use candle_core::{CudaDevice, DType, Device, Result, Storage, Tensor};

use super::{DecoderWeights, LayerWeights};
use crate::cuda_util::{driver_err, ptx_module, to_i32, PtxModule};
use crate::error::OpError;

const MODULE: PtxModule = ptx_module!("fused_decode");
const OP: &str = "fused_decode";
/// Threads per block of every kernel (`kThreads` in the .cu).
const THREADS: u32 = 256;
/// Warps per block (`kWarps`).
const WARPS: usize = 8;
/// Shared memory a block may take without opting in.
const DEFAULT_SHARED: usize = 48 * 1024;
/// Blocks a query head's attention splits over at long contexts (`kSplits` in the kernel source).
const ATT_SPLITS: usize = 8;

fn kernel_err(msg: impl Into<String>) -> candle_core::Error {
    OpError::Kernel {
        op: OP,
        msg: msg.into(),
    }
    .into()
}

struct Kernels {
    embed: CudaFunction,
    qkv_rope: CudaFunction,
    attention: CudaFunction,
    matvec_residual: CudaFunction,
    gate_up: CudaFunction,
    lm_head: CudaFunction,
    argmax: CudaFunction,
}

impl Kernels {
    fn load(dev: &CudaDevice, dtype: DType) -> Result<Self> {
        let get = |base: &str| -> Result<CudaFunction> {
            Ok(MODULE.kernel_for(dev, base, dtype, OP)?.function().clone())
        };
        Ok(Self {
            embed: get("fused_decode_embed")?,
            qkv_rope: get("fused_decode_qkv_rope")?,
            attention: get("fused_decode_attention")?,
            matvec_residual: get("fused_decode_matvec_residual")?,
            gate_up: get("fused_decode_gate_up")?,
            lm_head: get("fused_decode_lm_head")?,
            argmax: MODULE
                .kernel(dev, "fused_decode_argmax")?
                .function()
                .clone(),
        })
    }
}

/// One kernel argument, passed by value.
#[derive(Clone, Copy)]
enum Arg {
    /// A device address (`const T*` / `T*`; 0 is a null pointer).
    Ptr(u64),
    Int(i32),
    Float(f32),
}

/// Device addresses of one layer's weights (0 for an absent bias).
struct LayerPtrs {
    input_norm: u64,
    q: u64,
    k: u64,
    v: u64,
    q_bias: u64,
    k_bias: u64,
    v_bias: u64,
    o: u64,
    o_bias: u64,
    post_norm: u64,
    gate: u64,
    up: u64,
    down: u64,
    gate_bias: u64,
    up_bias: u64,
    down_bias: u64,
}

/// Sizes the launches need, as the kernels' `int`s.
#[derive(Clone, Copy)]
struct Dims {
    hidden: i32,
    inter: i32,
    vocab: i32,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
}

/// The device buffers of one step, each allocated once.
struct Buffers {
    /// `{token, pos, greedy next token}`.
    state: CudaSlice<i32>,
    x: CudaSlice<u8>,
    q: CudaSlice<u8>,
    attn: CudaSlice<u8>,
    act: CudaSlice<u8>,
    k_cache: CudaSlice<u8>,
    v_cache: CudaSlice<u8>,
    logits: CudaSlice<f32>,
    /// The attention's per-split records, `[heads][ATT_SPLITS][2 + head_dim]` f32, and its
    /// arrival counter per head (zeroed here; the kernel leaves it zeroed).
    att_part: CudaSlice<f32>,
    att_count: CudaSlice<i32>,
}

/// The buffers' device addresses, read once: taking an address can make the stream wait on an
/// event, which must not happen while a graph is being captured.
#[derive(Clone, Copy)]
struct BufferPtrs {
    state: u64,
    x: u64,
    q: u64,
    attn: u64,
    act: u64,
    k_cache: u64,
    v_cache: u64,
    logits: u64,
    att_part: u64,
    att_count: u64,
}

pub(crate) struct CudaDecoder {
    stream: Arc<CudaStream>,
    candle_stream: Arc<CudaStream>,
    kernels: Kernels,
    /// Keeps every weight alive for as long as the raw addresses below are used.
    _weights: DecoderWeights,
    layers: Vec<LayerPtrs>,
    embed: u64,
    norm: u64,
    lm_head: u64,
    rope_cos: u64,
    rope_sin: u64,
    dims: Dims,
    eps: f32,
    scale: f32,
    elem: usize,
    capacity: usize,
    max_positions: usize,
    bufs: Buffers,
    ptrs: BufferPtrs,
    /// Page-locked landing places of the logits and of the greedy token (a pageable copy costs
    /// a staging pass).
    host_logits: PinnedHostSlice<f32>,
    host_next: PinnedHostSlice<i32>,
    /// Launch with programmatic dependent launch (on unless `LORAFUSE_PDL=0`).
    pdl: bool,
    /// Per-layer cache stride in bytes (`capacity * kv_heads * head_dim` elements).
    layer_cache_bytes: usize,
    graph: Option<CudaGraph>,
    /// Capture and replay the step as a CUDA graph (on unless `LORAFUSE_CUDA_GRAPH=0`).
    want_graph: bool,
    graph_error: Option<String>,
}

/// The address of a contiguous tensor's first element, or `None` when the kernels cannot take it:
/// not on a CUDA device, not contiguous, of another dtype, or not 16-byte aligned.
fn tensor_ptr(t: &Tensor, dtype: DType, stream: &CudaStream) -> Option<u64> {
    if t.dtype() != dtype || !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return None;
    };
    let (start, _) = layout.contiguous_offsets()?;
    // The dtype was checked above, so the typed views cannot fail.
    let base = match dtype {
        DType::F32 => cs.as_cuda_slice::<f32>().ok()?.device_ptr(stream).0,
        DType::BF16 => cs.as_cuda_slice::<half::bf16>().ok()?.device_ptr(stream).0,
        DType::F16 => cs.as_cuda_slice::<half::f16>().ok()?.device_ptr(stream).0,
        _ => return None,
    };
    let ptr = base + (start * dtype.size_in_bytes()) as u64;
    ptr.is_multiple_of(16).then_some(ptr)
}

fn slice_ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// Checks a weight's shape; `None` (not supported) is for dtype/layout, an error for a shape that
/// contradicts the config.
fn expect_dims(t: &Tensor, dims: &[usize], what: &str) -> Result<()> {
    if t.dims() != dims {
        return Err(crate::error::shape_err(
            OP,
            format!("{what}: expected {dims:?}, got {:?}", t.dims()),
        ));
    }
    Ok(())
}

impl CudaDecoder {
    pub(crate) fn new(w: DecoderWeights, capacity: usize) -> Result<Option<Self>> {
        let Device::Cuda(dev) = w.embed.device().clone() else {
            return Ok(None);
        };
        let dtype = w.embed.dtype();
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) || w.layers.is_empty() {
            return Ok(None);
        }
        let (vocab, hidden) = w.embed.dims2()?;
        let (heads, kv_heads, head_dim) = (w.heads, w.kv_heads, w.head_dim);
        let inter = w.layers[0].gate.dims2()?.0;
        let pack = 16 / dtype.size_in_bytes();
        let fits = kv_heads > 0
            && heads.is_multiple_of(kv_heads)
            && head_dim.is_multiple_of(32)
            && head_dim <= 256
            && hidden.is_multiple_of(pack)
            && inter.is_multiple_of(pack)
            && (heads * head_dim).is_multiple_of(pack)
            && capacity > 0;
        if !fits {
            return Ok(None);
        }
        let max_positions = w.rope_cos.dims2()?.0;
        if w.rope_cos.dtype() != DType::F32 || w.rope_sin.dtype() != DType::F32 {
            return Ok(None);
        }
        let q_out = heads * head_dim;
        let kv_out = kv_heads * head_dim;
        expect_dims(&w.lm_head, &[vocab, hidden], "lm_head")?;
        for (i, l) in w.layers.iter().enumerate() {
            expect_dims(&l.q, &[q_out, hidden], &format!("layer {i} q"))?;
            expect_dims(&l.k, &[kv_out, hidden], &format!("layer {i} k"))?;
            expect_dims(&l.v, &[kv_out, hidden], &format!("layer {i} v"))?;
            expect_dims(&l.o, &[hidden, q_out], &format!("layer {i} o"))?;
            expect_dims(&l.gate, &[inter, hidden], &format!("layer {i} gate"))?;
            expect_dims(&l.up, &[inter, hidden], &format!("layer {i} up"))?;
            expect_dims(&l.down, &[hidden, inter], &format!("layer {i} down"))?;
        }

        let candle_stream = dev.cuda_stream();
        let ctx = candle_stream.context().clone();
        let stream = ctx.new_stream().map_err(driver_err(OP))?;
        // Weights were uploaded on Candle's stream.
        candle_stream.synchronize().map_err(driver_err(OP))?;

        let ptr = |t: &Tensor| tensor_ptr(t, dtype, &stream);
        // An absent bias is a null pointer.
        let opt = |t: &Option<Tensor>| t.as_ref().map_or(Some(0), ptr);
        let layer_ptrs = |l: &LayerWeights| {
            Some(LayerPtrs {
                input_norm: ptr(&l.input_norm)?,
                q: ptr(&l.q)?,
                k: ptr(&l.k)?,
                v: ptr(&l.v)?,
                q_bias: opt(&l.q_bias)?,
                k_bias: opt(&l.k_bias)?,
                v_bias: opt(&l.v_bias)?,
                o: ptr(&l.o)?,
                o_bias: opt(&l.o_bias)?,
                post_norm: ptr(&l.post_norm)?,
                gate: ptr(&l.gate)?,
                up: ptr(&l.up)?,
                down: ptr(&l.down)?,
                gate_bias: opt(&l.gate_bias)?,
                up_bias: opt(&l.up_bias)?,
                down_bias: opt(&l.down_bias)?,
            })
        };
        let Some(layers) = w.layers.iter().map(layer_ptrs).collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        let (Some(embed), Some(norm), Some(lm_head)) =
            (ptr(&w.embed), ptr(&w.norm), ptr(&w.lm_head))
        else {
            return Ok(None);
        };
        let f32_ptr = |t: &Tensor| tensor_ptr(t, DType::F32, &stream);
        let (Some(rope_cos), Some(rope_sin)) = (f32_ptr(&w.rope_cos), f32_ptr(&w.rope_sin)) else {
            return Ok(None);
        };

        let elem = dtype.size_in_bytes();
        let capacity = capacity.min(max_positions);
        let layer_cache = capacity * kv_out;
        let n_layers = w.layers.len();
        let alloc = |bytes: usize| {
            stream
                .alloc_zeros::<u8>(bytes.max(16))
                .map_err(driver_err(OP))
        };
        let bufs = Buffers {
            state: stream.alloc_zeros::<i32>(3).map_err(driver_err(OP))?,
            x: alloc(hidden * elem)?,
            q: alloc(q_out * elem)?,
            attn: alloc(q_out * elem)?,
            act: alloc(inter * elem)?,
            k_cache: alloc(n_layers * layer_cache * elem)?,
            v_cache: alloc(n_layers * layer_cache * elem)?,
            logits: stream.alloc_zeros::<f32>(vocab).map_err(driver_err(OP))?,
            att_part: stream
                .alloc_zeros::<f32>(heads * ATT_SPLITS * (2 + head_dim))
                .map_err(driver_err(OP))?,
            att_count: stream.alloc_zeros::<i32>(heads).map_err(driver_err(OP))?,
        };
        let ptrs = BufferPtrs {
            state: slice_ptr(&bufs.state, &stream),
            x: slice_ptr(&bufs.x, &stream),
            q: slice_ptr(&bufs.q, &stream),
            attn: slice_ptr(&bufs.attn, &stream),
            act: slice_ptr(&bufs.act, &stream),
            k_cache: slice_ptr(&bufs.k_cache, &stream),
            v_cache: slice_ptr(&bufs.v_cache, &stream),
            logits: slice_ptr(&bufs.logits, &stream),
            att_part: slice_ptr(&bufs.att_part, &stream),
            att_count: slice_ptr(&bufs.att_count, &stream),
        };
        // SAFETY: `vocab` f32s of page-locked memory; every step overwrites all of them (the
        // device-to-host copy of the logits) before anything reads them.
        let host_logits =
            unsafe { ctx.alloc_pinned_with_flags::<f32>(vocab, 0) }.map_err(driver_err(OP))?;
        // SAFETY: as above, one i32 that every greedy step overwrites.
        let host_next =
            unsafe { ctx.alloc_pinned_with_flags::<i32>(1, 0) }.map_err(driver_err(OP))?;
        let kernels = Kernels::load(&dev, dtype)?;
        // Matrix-vector kernels keep their input vector in shared memory as f32.
        let widest = 4 * hidden.max(inter).max(q_out).max((WARPS + 1) * head_dim);
        if widest > DEFAULT_SHARED {
            let bytes = i32::try_from(widest).unwrap_or(i32::MAX);
            for f in [
                &kernels.qkv_rope,
                &kernels.attention,
                &kernels.matvec_residual,
                &kernels.gate_up,
                &kernels.lm_head,
            ] {
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes,
                )
                .map_err(driver_err(OP))?;
            }
        }
        let dims = Dims {
            hidden: to_i32(hidden, "hidden", OP)?,
            inter: to_i32(inter, "intermediate", OP)?,
            vocab: to_i32(vocab, "vocab", OP)?,
            heads: to_i32(heads, "heads", OP)?,
            kv_heads: to_i32(kv_heads, "kv_heads", OP)?,
            head_dim: to_i32(head_dim, "head_dim", OP)?,
        };
        Ok(Some(Self {
            eps: w.rms_norm_eps as f32,
            scale: 1.0 / (head_dim as f32).sqrt(),
            stream,
            candle_stream,
            kernels,
            _weights: w,
            layers,
            embed,
            norm,
            lm_head,
            rope_cos,
            rope_sin,
            dims,
            elem,
            capacity,
            max_positions,
            bufs,
            ptrs,
            host_logits,
            host_next,
            pdl: std::env::var_os("LORAFUSE_PDL").is_none_or(|v| v != "0"),
            layer_cache_bytes: layer_cache * elem,
            graph: None,
            want_graph: std::env::var_os("LORAFUSE_CUDA_GRAPH").is_none_or(|v| v != "0"),
            graph_error: None,
        }))
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn uses_graph(&self) -> bool {
        self.graph.is_some()
    }

    pub(crate) fn graph_error(&self) -> Option<&str> {
        self.graph_error.as_deref()
    }

    pub(crate) fn load_prefix(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        if layer >= self.layers.len() {
            return Err(kernel_err(format!(
                "load_prefix: layer {layer} of a {}-layer model",
                self.layers.len()
            )));
        }
        let kv = self.dims.kv_heads as usize;
        let hd = self.dims.head_dim as usize;
        let (t, kh, d) = k.dims3()?;
        if (kh, d) != (kv, hd) || v.dims() != k.dims() {
            return Err(crate::error::shape_err(
                OP,
                format!(
                    "load_prefix: expected k and v [t, {kv}, {hd}], got {:?} and {:?}",
                    k.dims(),
                    v.dims()
                ),
            ));
        }
        if t > self.capacity {
            return Err(kernel_err(format!(
                "load_prefix: {t} positions exceed the cache capacity {}",
                self.capacity
            )));
        }
        let dtype = self._weights.embed.dtype();
        let k = k.to_dtype(dtype)?.contiguous()?;
        let v = v.to_dtype(dtype)?.contiguous()?;
        // The prefix was computed on Candle's stream.
        self.stream
            .join(&self.candle_stream)
            .map_err(driver_err(OP))?;
        let bytes = t * kv * hd * self.elem;
        let offset = (layer * self.layer_cache_bytes) as u64;
        for (src, dst) in [(&k, self.ptrs.k_cache), (&v, self.ptrs.v_cache)] {
            let src_ptr = tensor_ptr(src, dtype, &self.stream)
                .ok_or_else(|| kernel_err("load_prefix: keys/values not on the engine's device"))?;
            let dst_ptr = dst + offset;
            // SAFETY: `src` holds `bytes` bytes (t * kv * hd elements, contiguous); the destination
            // range starts at this layer's cache row 0 and `t <= capacity` keeps it inside the
            // layer's `layer_cache_bytes`. Both stay alive until the synchronize below.
            unsafe { result::memcpy_dtod_async(dst_ptr, src_ptr, bytes, self.stream.cu_stream()) }
                .map_err(driver_err(OP))?;
        }
        self.stream.synchronize().map_err(driver_err(OP))?;
        Ok(())
    }

    pub(crate) fn step(&mut self, token: u32, pos: usize) -> Result<Vec<f32>> {
        self.run_step(token, pos)?;
        self.stream
            .memcpy_dtoh(&self.bufs.logits, &mut self.host_logits)
            .map_err(driver_err(OP))?;
        self.stream.synchronize().map_err(driver_err(OP))?;
        Ok(self
            .host_logits
            .as_slice()
            .map_err(driver_err(OP))?
            .to_vec())
    }

    pub(crate) fn step_greedy(&mut self, token: u32, pos: usize) -> Result<u32> {
        self.run_step(token, pos)?;
        let next = self.bufs.state.slice(2..3);
        self.stream
            .memcpy_dtoh(&next, &mut self.host_next)
            .map_err(driver_err(OP))?;
        self.stream.synchronize().map_err(driver_err(OP))?;
        let id = self.host_next.as_slice().map_err(driver_err(OP))?[0];
        u32::try_from(id).map_err(|_| kernel_err(format!("argmax returned {id}")))
    }

    /// Writes `{token, pos}` and enqueues the step (graph replay, or kernel by kernel).
    fn run_step(&mut self, token: u32, pos: usize) -> Result<()> {
        if token as usize >= self.dims.vocab as usize {
            return Err(kernel_err(format!(
                "token id {token} is outside the vocabulary of {}",
                self.dims.vocab
            )));
        }
        if pos >= self.capacity || pos >= self.max_positions {
            return Err(kernel_err(format!(
                "position {pos} is past the cache capacity {}",
                self.capacity
            )));
        }
        let state = [token as i32, pos as i32];
        let mut head = self.bufs.state.slice_mut(0..2);
        self.stream
            .memcpy_htod(&state, &mut head)
            .map_err(driver_err(OP))?;
        // Captured at the first step; a refused capture is not retried.
        if self.want_graph && self.graph.is_none() && self.graph_error.is_none() {
            match self.capture() {
                Ok(g) => self.graph = Some(g),
                Err(e) => {
                    tracing::warn!(
                        "fused decode: no CUDA graph ({e}); launching kernels one by one"
                    );
                    self.graph_error = Some(e);
                }
            }
        }
        match &self.graph {
            Some(g) => g.launch().map_err(driver_err(OP)),
            None => self.enqueue(),
        }
    }

    /// Captures one step as a graph, or says why the driver refused.
    fn capture(&self) -> std::result::Result<CudaGraph, String> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| format!("begin capture: {e}"))?;
        let launched = self.enqueue();
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        launched.map_err(|e| format!("launch during capture: {e}"))?;
        match graph {
            Ok(Some(g)) => Ok(g),
            Ok(None) => Err("the capture recorded nothing".into()),
            Err(e) => Err(format!("end capture: {e}")),
        }
    }

    /// Launches `f` on the engine's stream with `grid` blocks of `block` threads, with the
    /// programmatic-dependent-launch attribute when enabled (the kernels' `griddepcontrol`
    /// instructions need it to overlap; without it they are no-ops).
    fn launch(
        &self,
        f: &CudaFunction,
        grid: u32,
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<()> {
        let mut vals = args.to_vec();
        let mut params: Vec<*mut std::ffi::c_void> = vals
            .iter_mut()
            .map(|a| match a {
                Arg::Ptr(v) => (v as *mut u64).cast(),
                Arg::Int(v) => (v as *mut i32).cast(),
                Arg::Float(v) => (v as *mut f32).cast(),
            })
            .collect();
        // SAFETY: a plain C union of integers; all-zero is a valid value of each member.
        let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attr = sys::CUlaunchAttribute {
            id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = sys::CUlaunchConfig {
            gridDimX: grid.max(1),
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: shared,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(self.pdl),
        };
        self.stream
            .context()
            .bind_to_thread()
            .map_err(driver_err(OP))?;
        // SAFETY: `params` points at one value per kernel parameter, in order and of the
        // parameter's size (device addresses as u64, ints, floats), all alive for the call; the
        // callers' SAFETY notes give each kernel's bounds.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(driver_err(OP))
    }

    /// Enqueues every kernel of one step on the engine's stream.
    fn enqueue(&self) -> Result<()> {
        let d = self.dims;
        let (hidden, inter, vocab) = (d.hidden as u32, d.inter as u32, d.vocab as u32);
        let (heads, kv_heads, head_dim) = (d.heads as u32, d.kv_heads as u32, d.head_dim as u32);
        let rows_per_block = (WARPS * 2) as u32;
        let BufferPtrs {
            state,
            x,
            q,
            attn,
            act,
            k_cache: k_base,
            v_cache: v_base,
            logits,
            att_part,
            att_count,
        } = self.ptrs;
        let q_cols = d.heads * d.head_dim;

        use Arg::{Float, Int, Ptr};
        let k = &self.kernels;
        let eps = Float(self.eps);
        // SAFETY (embed): `x` holds `hidden` elements; the row is that of a token id checked
        // against the vocabulary in `run_step`.
        self.launch(
            &k.embed,
            1,
            THREADS,
            0,
            &[Ptr(self.embed), Ptr(state), Ptr(x), Int(d.hidden)],
        )?;
        for (i, l) in self.layers.iter().enumerate() {
            let off = (i * self.layer_cache_bytes) as u64;
            let (kc, vc) = (k_base + off, v_base + off);
            // SAFETY (qkv_rope): head_dim / 16 blocks per q, k and v head (head_dim.is_multiple_of(32)
            // was checked), each warp writing one rotation pair of q or of this layer's cache
            // row `pos < capacity` (checked in `run_step`); shared memory holds the normalised
            // hidden vector.
            let blocks_per_head = head_dim / (2 * WARPS as u32);
            self.launch(
                &k.qkv_rope,
                (heads + 2 * kv_heads) * blocks_per_head,
                THREADS,
                4 * hidden,
                &[
                    Ptr(x),
                    Ptr(l.input_norm),
                    eps,
                    Ptr(l.q),
                    Ptr(l.k),
                    Ptr(l.v),
                    Ptr(l.q_bias),
                    Ptr(l.k_bias),
                    Ptr(l.v_bias),
                    Ptr(self.rope_cos),
                    Ptr(self.rope_sin),
                    Ptr(state),
                    Ptr(q),
                    Ptr(kc),
                    Ptr(vc),
                    Int(d.hidden),
                    Int(d.heads),
                    Int(d.kv_heads),
                    Int(d.head_dim),
                ],
            )?;
            // SAFETY (attention): ATT_SPLITS blocks per query head (the kernel's kSplits) read
            // cache rows 0..=pos of its KV head, all written by the prefix copy or earlier
            // steps; att_part holds heads * ATT_SPLITS records of 2 + head_dim floats and
            // att_count one zeroed counter per head, which the kernel leaves zeroed.
            self.launch(
                &k.attention,
                heads * ATT_SPLITS as u32,
                THREADS,
                4 * (WARPS as u32 + 1) * head_dim,
                &[
                    Ptr(q),
                    Ptr(kc),
                    Ptr(vc),
                    Ptr(state),
                    Ptr(attn),
                    Ptr(att_part),
                    Ptr(att_count),
                    Int(d.heads),
                    Int(d.kv_heads),
                    Int(d.head_dim),
                    Float(self.scale),
                ],
            )?;
            // SAFETY (o projection): o is [hidden, heads * head_dim]; each block updates its own
            // 16 rows of x.
            self.launch(
                &k.matvec_residual,
                hidden.div_ceil(rows_per_block),
                THREADS,
                4 * q_cols as u32,
                &[
                    Ptr(l.o),
                    Ptr(l.o_bias),
                    Ptr(attn),
                    Ptr(x),
                    Int(d.hidden),
                    Int(q_cols),
                ],
            )?;
            // SAFETY (gate_up): gate and up are [inter, hidden]; each block writes its own 16
            // entries of act.
            self.launch(
                &k.gate_up,
                inter.div_ceil(rows_per_block),
                THREADS,
                4 * hidden,
                &[
                    Ptr(x),
                    Ptr(l.post_norm),
                    eps,
                    Ptr(l.gate),
                    Ptr(l.up),
                    Ptr(l.gate_bias),
                    Ptr(l.up_bias),
                    Ptr(act),
                    Int(d.hidden),
                    Int(d.inter),
                ],
            )?;
            // SAFETY (down projection): down is [hidden, inter].
            self.launch(
                &k.matvec_residual,
                hidden.div_ceil(rows_per_block),
                THREADS,
                4 * inter,
                &[
                    Ptr(l.down),
                    Ptr(l.down_bias),
                    Ptr(act),
                    Ptr(x),
                    Int(d.hidden),
                    Int(d.inter),
                ],
            )?;
        }
        // SAFETY (lm_head): the head is [vocab, hidden]; each block writes its own 32 logits.
        self.launch(
            &k.lm_head,
            vocab.div_ceil((WARPS * 4) as u32),
            THREADS,
            4 * hidden,
            &[
                Ptr(x),
                Ptr(self.norm),
                eps,
                Ptr(self.lm_head),
                Ptr(logits),
                Int(d.hidden),
                Int(d.vocab),
            ],
        )?;
        // SAFETY (argmax): one block reads the `vocab` logits and writes state[2].
        self.launch(
            &k.argmax,
            1,
            1024,
            0,
            &[Ptr(logits), Int(d.vocab), Ptr(state + 8)],
        )?;
        Ok(())
    }
}
