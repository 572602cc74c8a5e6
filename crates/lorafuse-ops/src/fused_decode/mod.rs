//! One batch-1 decode step of a Llama-family decoder as a handful of fused CUDA kernels per layer,
//! replayed as a CUDA graph.
//!
//! A decode step through Candle is ~300 separate ops, each with its own host work (allocation,
//! layout bookkeeping, a launch): milliseconds of host time for well under a millisecond of GPU
//! work. [`FusedDecoder`] instead owns every buffer of the step (hidden state, q, attention output,
//! MLP activation, a fixed-capacity KV cache, logits) and runs five kernels per layer:
//!
//! 1. RMSNorm + Q/K/V projections (+ bias) + RoPE + KV-cache write,
//! 2. attention of the new query over the cache,
//! 3. O projection + residual add,
//! 4. RMSNorm + gate/up projections + SiLU x up,
//! 5. down projection + residual add,
//!
//! plus the embedding lookup and RMSNorm + LM head. Every kernel reads the token and position from
//! a device buffer, so the whole step is captured once as a CUDA graph and replayed each token.
//!
//! The reference (and the fallback everywhere this does not apply: CPU, Metal, LoRA adapters that
//! are not merged, `LORAFUSE_KERNELS=reference`) is the model's ordinary Candle forward pass.
//! `LORAFUSE_CUDA_GRAPH=0` launches the kernels one by one instead of replaying the graph.

#[cfg(feature = "cuda")]
mod cuda;

/// Without the `cuda` feature no engine can exist: an uninhabited stand-in with the same methods,
/// so that [`FusedDecoder`] delegates without a `cfg` per method.
#[cfg(not(feature = "cuda"))]
mod cuda {
    use candle_core::{Result, Tensor};

    pub(crate) enum CudaDecoder {}

    impl CudaDecoder {
        pub(crate) fn new(_: super::DecoderWeights, _: usize) -> Result<Option<Self>> {
            Ok(None)
        }
        pub(crate) fn capacity(&self) -> usize {
            match *self {}
        }
        pub(crate) fn uses_graph(&self) -> bool {
            match *self {}
        }
        pub(crate) fn graph_error(&self) -> Option<&str> {
            match *self {}
        }
        pub(crate) fn load_prefix(&mut self, _: usize, _: &Tensor, _: &Tensor) -> Result<()> {
            match *self {}
        }
        pub(crate) fn step(&mut self, _: u32, _: usize) -> Result<Vec<f32>> {
            match *self {}
        }
        pub(crate) fn step_greedy(&mut self, _: u32, _: usize) -> Result<u32> {
            match *self {}
        }
    }
}

use candle_core::{Result, Tensor};

/// The weights of one decoder layer, as the checkpoint stores them (`[out, in]` projections).
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub input_norm: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    pub o: Tensor,
    pub o_bias: Option<Tensor>,
    pub post_norm: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    pub gate_bias: Option<Tensor>,
    pub up_bias: Option<Tensor>,
    pub down_bias: Option<Tensor>,
}

/// Everything a decode step reads. All tensors live on one CUDA device in one dtype (f32, bf16 or
/// f16), except the RoPE tables, which are f32 `[max_positions, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct DecoderWeights {
    /// `[vocab, hidden]`.
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    /// The final RMSNorm weight `[hidden]`.
    pub norm: Tensor,
    /// `[vocab, hidden]` (the embedding again for tied models).
    pub lm_head: Tensor,
    pub rope_cos: Tensor,
    pub rope_sin: Tensor,
    pub rms_norm_eps: f64,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// A decode-step engine for one sequence, with its own KV cache of fixed capacity.
///
/// ```ignore
/// let Some(mut dec) = FusedDecoder::new(weights, prompt.len() + max_new)? else { /* fall back */ };
/// // after a Candle prefill: copy each layer's keys and values, [t, kv_heads, head_dim]
/// dec.load_prefix(layer, &k, &v)?;
/// let logits = dec.step(next_token, prompt.len())?;
/// ```
pub struct FusedDecoder {
    inner: cuda::CudaDecoder,
}

impl std::fmt::Debug for FusedDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedDecoder")
            .field("capacity", &self.capacity())
            .field("graph", &self.uses_graph())
            .finish()
    }
}

impl FusedDecoder {
    /// An engine for `capacity` positions, or `None` where it does not apply: a device other than
    /// CUDA, a build without the `cuda` feature, `LORAFUSE_KERNELS=reference`, or shapes the
    /// kernels do not take (rows not a multiple of 16 bytes, head_dim not a multiple of 32 or past
    /// 256, a head count not divisible by the KV-head count).
    pub fn new(weights: DecoderWeights, capacity: usize) -> Result<Option<Self>> {
        let disabled = std::env::var_os("LORAFUSE_FUSED_DECODE").is_some_and(|v| v == "0");
        if !crate::dispatch::fused_enabled() || disabled {
            return Ok(None);
        }
        Ok(cuda::CudaDecoder::new(weights, capacity)?.map(|inner| Self { inner }))
    }

    /// Positions the cache holds.
    pub fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    /// True once the step replays as a CUDA graph (after the first step, unless disabled).
    pub fn uses_graph(&self) -> bool {
        self.inner.uses_graph()
    }

    /// Why the step is not replayed as a CUDA graph, if capture was tried and failed.
    pub fn graph_error(&self) -> Option<&str> {
        self.inner.graph_error()
    }

    /// Copies the keys and values of positions `0..t` of `layer` into the cache: `k` and `v` are
    /// `[t, kv_heads, head_dim]` in the weights' dtype, on the same device (e.g. from a prefill).
    pub fn load_prefix(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        self.inner.load_prefix(layer, k, v)
    }

    /// [`FusedDecoder::step`] for greedy decoding: the index of the largest logit (the first on
    /// ties), computed on the device, so that only the token id comes back to the host.
    pub fn step_greedy(&mut self, token: u32, pos: usize) -> Result<u32> {
        self.inner.step_greedy(token, pos)
    }

    /// Runs `token` at position `pos` (its key and value land in the cache at `pos`; the cache
    /// must hold positions `0..pos`) and returns the logits, `vocab` f32 values.
    pub fn step(&mut self, token: u32, pos: usize) -> Result<Vec<f32>> {
        self.inner.step(token, pos)
    }
}
