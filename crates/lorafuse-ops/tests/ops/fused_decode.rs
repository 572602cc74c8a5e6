//! The fused decode step against the same decoder composed from the reference ops: a random
//! two-layer GQA decoder (QKV biases, a vocabulary that is not a multiple of the kernels' row
//! blocks), prefill copied in from the reference, then cached steps whose logits must match the
//! reference's full-sequence logits at the same positions.

use crate::common;

use candle_core::{DType, Device, Result, Tensor, D};
use common::rand_tensor;
use lorafuse_ops::attention::reference::causal_attention_reference;
use lorafuse_ops::rms_norm::reference::rms_norm_reference;
use lorafuse_ops::rope::reference::rope_reference;
use lorafuse_ops::swiglu::reference::swiglu_reference;
use lorafuse_ops::{DecoderWeights, FusedDecoder, LayerWeights, RopeLayout};

const HIDDEN: usize = 128;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 32;
const INTER: usize = 160;
const VOCAB: usize = 301;
const LAYERS: usize = 2;
const MAX_POS: usize = 1200;
const EPS: f64 = 1e-5;

fn weights(dtype: DType, dev: &Device) -> Result<DecoderWeights> {
    let mut seed = 500;
    let mut r = |shape: &[usize], scale: f64| {
        seed += 1;
        rand_tensor(shape, scale, seed, dtype, dev)
    };
    let proj = |fan_in: usize| 1.0 / (fan_in as f64).sqrt();
    let mut layers = Vec::new();
    for _ in 0..LAYERS {
        layers.push(LayerWeights {
            input_norm: (r(&[HIDDEN], 0.2)? + 1.0)?,
            q: r(&[HEADS * HEAD_DIM, HIDDEN], proj(HIDDEN))?,
            k: r(&[KV_HEADS * HEAD_DIM, HIDDEN], proj(HIDDEN))?,
            v: r(&[KV_HEADS * HEAD_DIM, HIDDEN], proj(HIDDEN))?,
            q_bias: Some(r(&[HEADS * HEAD_DIM], 0.1)?),
            k_bias: Some(r(&[KV_HEADS * HEAD_DIM], 0.1)?),
            v_bias: Some(r(&[KV_HEADS * HEAD_DIM], 0.1)?),
            o: r(&[HIDDEN, HEADS * HEAD_DIM], proj(HIDDEN))?,
            o_bias: None,
            post_norm: (r(&[HIDDEN], 0.2)? + 1.0)?,
            gate: r(&[INTER, HIDDEN], proj(HIDDEN))?,
            up: r(&[INTER, HIDDEN], proj(HIDDEN))?,
            down: r(&[HIDDEN, INTER], proj(INTER))?,
            gate_bias: None,
            up_bias: None,
            down_bias: Some(r(&[HIDDEN], 0.1)?),
        });
    }
    let inv: Vec<f32> = (0..HEAD_DIM / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / HEAD_DIM as f32))
        .collect();
    let angles: Vec<f32> = (0..MAX_POS)
        .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
        .collect();
    let angles = Tensor::from_vec(angles, (MAX_POS, HEAD_DIM / 2), dev)?;
    Ok(DecoderWeights {
        embed: r(&[VOCAB, HIDDEN], 1.0)?,
        layers,
        norm: (r(&[HIDDEN], 0.2)? + 1.0)?,
        lm_head: r(&[VOCAB, HIDDEN], proj(HIDDEN))?,
        rope_cos: angles.cos()?,
        rope_sin: angles.sin()?,
        rms_norm_eps: EPS,
        heads: HEADS,
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
    })
}

fn linear(x: &Tensor, w: &Tensor, b: &Option<Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Logits `[t, vocab]` of every position, and each layer's keys and values `[t, kv, hd]`, from
/// the reference ops in f32 on the weights as given (rounded to their dtype).
fn reference(w: &DecoderWeights, tokens: &[u32]) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let fo = |t: &Option<Tensor>| t.as_ref().map(f).transpose();
    let t = tokens.len();
    let dev = w.embed.device();
    let ids = Tensor::new(tokens, dev)?;
    let mut x = f(&w.embed)?.index_select(&ids, 0)?;
    let cos = w.rope_cos.narrow(0, 0, t)?;
    let sin = w.rope_sin.narrow(0, 0, t)?;
    let heads = |y: Tensor, n: usize| -> Result<Tensor> {
        y.reshape((1, t, n, HEAD_DIM))?
            .transpose(1, 2)?
            .contiguous()
    };
    let mut cache = Vec::new();
    for l in &w.layers {
        let n = rms_norm_reference(&x, &f(&l.input_norm)?, EPS)?;
        let q = heads(linear(&n, &f(&l.q)?, &fo(&l.q_bias)?)?, HEADS)?;
        let k = heads(linear(&n, &f(&l.k)?, &fo(&l.k_bias)?)?, KV_HEADS)?;
        let v = heads(linear(&n, &f(&l.v)?, &fo(&l.v_bias)?)?, KV_HEADS)?;
        let q = rope_reference(&q, &cos, &sin, RopeLayout::HalfRotation)?;
        let k = rope_reference(&k, &cos, &sin, RopeLayout::HalfRotation)?;
        let a = causal_attention_reference(&q, &k, &v, 1.0 / (HEAD_DIM as f64).sqrt())?;
        let a = a.transpose(1, 2)?.reshape((t, HEADS * HEAD_DIM))?;
        x = (x + linear(&a, &f(&l.o)?, &fo(&l.o_bias)?)?)?;
        let n = rms_norm_reference(&x, &f(&l.post_norm)?, EPS)?;
        let g = linear(&n, &f(&l.gate)?, &fo(&l.gate_bias)?)?;
        let u = linear(&n, &f(&l.up)?, &fo(&l.up_bias)?)?;
        x = (x + linear(&swiglu_reference(&g, &u)?, &f(&l.down)?, &fo(&l.down_bias)?)?)?;
        let per_pos = |y: Tensor| y.squeeze(0)?.transpose(0, 1)?.contiguous();
        cache.push((per_pos(k)?, per_pos(v)?));
    }
    let n = rms_norm_reference(&x, &f(&w.norm)?, EPS)?;
    Ok((n.matmul(&f(&w.lm_head)?.t()?)?, cache))
}

fn fused_decode_matches_reference(dev: &Device) -> Result<()> {
    let tokens: Vec<u32> = (0..23u32).map(|i| (i * 37 + 5) % VOCAB as u32).collect();
    let prefix = 9;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let w = weights(dtype, dev)?;
        let (want, cache) = reference(&w, &tokens)?;
        let Some(mut dec) = FusedDecoder::new(w.clone(), tokens.len())? else {
            assert!(
                !dev.is_cuda(),
                "the fused decoder must apply on CUDA ({dtype:?})"
            );
            return Ok(());
        };
        for (i, (k, v)) in cache.iter().enumerate() {
            let (k, v) = (k.narrow(0, 0, prefix)?, v.narrow(0, 0, prefix)?);
            dec.load_prefix(i, &k.to_dtype(dtype)?, &v.to_dtype(dtype)?)?;
        }
        // f32 follows the reference to rounding; half precision rounds every intermediate.
        let tol = match dtype {
            DType::F32 => 2e-4,
            DType::F16 => 1.5e-2,
            _ => 4e-2,
        };
        let mut worst = 0f32;
        for (pos, &tok) in tokens.iter().enumerate().skip(prefix) {
            let logits = dec.step(tok, pos)?;
            // Re-running a position rewrites the same cache row: the greedy step must pick the
            // first largest of the very same logits.
            let greedy = dec.step_greedy(tok, pos)?;
            let best = logits
                .iter()
                .enumerate()
                .fold(0, |b, (i, &v)| if v > logits[b] { i } else { b });
            assert_eq!(
                greedy as usize, best,
                "{dtype:?} position {pos}: device argmax"
            );
            let got = Tensor::new(logits, &Device::Cpu)?;
            let want_row = want.get(pos)?.to_device(&Device::Cpu)?;
            let scale = want_row.abs()?.max(D::Minus1)?.to_scalar::<f32>()?;
            let diff = (got - &want_row)?
                .abs()?
                .max(D::Minus1)?
                .to_scalar::<f32>()?;
            worst = worst.max(diff / (1.0 + scale));
            assert!(
                diff <= tol * (1.0 + scale),
                "{dtype:?} position {pos}: max |logit diff| {diff} (logit scale {scale}), graph {}",
                dec.uses_graph()
            );
        }
        eprintln!("fused decode {dtype:?}: worst |logit diff| / (1 + scale) = {worst:.3e}");
        assert!(
            dec.uses_graph() || std::env::var_os("LORAFUSE_CUDA_GRAPH").is_some(),
            "the step should replay as a CUDA graph: {:?}",
            dec.graph_error()
        );
        // A position past the cache is an error, not a write out of bounds.
        assert!(dec.step(tokens[0], tokens.len()).is_err());
        assert!(dec.step(VOCAB as u32, prefix).is_err());
    }
    Ok(())
}
/// Past 1,024 cached positions the attention kernel works in several tiles with a running max.
fn fused_decode_long_context_matches_reference(dev: &Device) -> Result<()> {
    let tokens: Vec<u32> = (0..1100u32).map(|i| (i * 53 + 11) % VOCAB as u32).collect();
    let prefix = 1090;
    let w = weights(DType::F32, dev)?;
    let (want, cache) = reference(&w, &tokens)?;
    let Some(mut dec) = FusedDecoder::new(w, tokens.len())? else {
        assert!(!dev.is_cuda(), "the fused decoder must apply on CUDA");
        return Ok(());
    };
    for (i, (k, v)) in cache.iter().enumerate() {
        dec.load_prefix(i, &k.narrow(0, 0, prefix)?, &v.narrow(0, 0, prefix)?)?;
    }
    for (pos, &tok) in tokens.iter().enumerate().skip(prefix) {
        let got = Tensor::new(dec.step(tok, pos)?, &Device::Cpu)?;
        let want_row = want.get(pos)?.to_device(&Device::Cpu)?;
        let scale = want_row.abs()?.max(D::Minus1)?.to_scalar::<f32>()?;
        let diff = (got - &want_row)?
            .abs()?
            .max(D::Minus1)?
            .to_scalar::<f32>()?;
        assert!(
            diff <= 2e-4 * (1.0 + scale),
            "position {pos}: max |logit diff| {diff} (logit scale {scale})"
        );
    }
    Ok(())
}
test_device!(
    fused_decode_long_context_matches_reference,
    fused_decode_long_context_is_cuda_only_cpu,
    fused_decode_long_context_matches_reference_cuda
);

test_device!(
    fused_decode_matches_reference,
    fused_decode_is_cuda_only_cpu,
    fused_decode_matches_reference_cuda
);
