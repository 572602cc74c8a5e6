//! The decoder on a tiny random model: cache, mask, config flags and bad weights; and on the real
//! SmolLM2-135M-Instruct (GGUF and an exported safetensors folder) against transformers' numbers.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lorafuse::config::LlamaConfig;
use lorafuse::models::Llama;
use std::collections::HashMap;
use std::path::Path;

fn tiny_config(tied: bool, qkv_bias: bool) -> LlamaConfig {
    let json = serde_json::json!({
        "model_type": if qkv_bias { "qwen2" } else { "llama" },
        "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "max_position_embeddings": 40, "tie_word_embeddings": tied, "attention_bias": qkv_bias,
    });
    LlamaConfig::from_json_str(&json.to_string(), Path::new("tiny/config.json")).unwrap()
}

fn tiny_tensors(cfg: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut state = seed;
    let mut rand = |shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), rand(&[v, h], 1.0));
    t.insert("model.norm.weight".into(), (rand(&[h], 0.1) + 1.0).unwrap());
    if !cfg.tie_word_embeddings {
        t.insert("lm_head.weight".into(), rand(&[v, h], 0.3));
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        t.insert(
            format!("{p}.input_layernorm.weight"),
            (rand(&[h], 0.1) + 1.0).unwrap(),
        );
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            (rand(&[h], 0.1) + 1.0).unwrap(),
        );
        for (name, out, inp) in [
            ("q_proj", q, h),
            ("k_proj", kv, h),
            ("v_proj", kv, h),
            ("o_proj", h, q),
        ] {
            t.insert(
                format!("{p}.self_attn.{name}.weight"),
                rand(&[out, inp], 0.3),
            );
            if cfg.attention_bias && name != "o_proj" {
                t.insert(format!("{p}.self_attn.{name}.bias"), rand(&[out], 0.3));
            }
        }
        for (name, out, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
            t.insert(format!("{p}.mlp.{name}.weight"), rand(&[out, inp], 0.3));
        }
    }
    t
}

fn tiny_model(tied: bool, qkv_bias: bool) -> Llama {
    let cfg = tiny_config(tied, qkv_bias);
    let vb = VarBuilder::from_tensors(tiny_tensors(&cfg, 7), DType::F32, &Device::Cpu);
    Llama::load(vb, &cfg).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

const IDS: [u32; 9] = [3, 17, 42, 5, 60, 0, 9, 33, 21];

#[test]
fn cached_decode_equals_full_recompute() {
    for (tied, bias) in [(true, false), (false, true)] {
        let model = tiny_model(tied, bias);
        let full = model
            .forward(
                &Tensor::new(&IDS[..], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
            )
            .unwrap();
        let mut cache = model.new_cache(2);
        let prefill = Tensor::new(&IDS[..4], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let first = model.forward(&prefill, Some(&mut cache)).unwrap();
        assert!(max_abs_diff(&first, &full.narrow(1, 0, 4).unwrap()) < 1e-5);
        for (pos, &id) in IDS.iter().enumerate().skip(4) {
            let step = Tensor::new(&[id], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let got = model.forward_last(&step, Some(&mut cache)).unwrap();
            let want = full.narrow(1, pos, 1).unwrap().squeeze(1).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-4, "position {pos}: cached vs full differ by {d}");
        }
        assert_eq!(cache.seq_len(), IDS.len());
    }
}

#[test]
fn causal_mask_hides_future_tokens() {
    let model = tiny_model(true, false);
    let a = Tensor::new(&IDS[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut changed = IDS;
    changed[6] = 1;
    let b = Tensor::new(&changed[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let la = model.forward(&a, None).unwrap();
    let lb = model.forward(&b, None).unwrap();
    assert_eq!(
        max_abs_diff(&la.narrow(1, 0, 6).unwrap(), &lb.narrow(1, 0, 6).unwrap()),
        0.0
    );
    assert!(max_abs_diff(&la.narrow(1, 6, 3).unwrap(), &lb.narrow(1, 6, 3).unwrap()) > 1e-3);
}

#[test]
fn batch_rows_are_independent() {
    let model = tiny_model(false, true);
    let one = Tensor::new(&IDS[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut other = IDS;
    other.reverse();
    let two = Tensor::new(&[IDS, other], &Device::Cpu).unwrap();
    let l1 = model.forward(&one, None).unwrap();
    let l2 = model.forward(&two, None).unwrap().narrow(0, 0, 1).unwrap();
    assert!(max_abs_diff(&l1, &l2) < 1e-5);
}

#[test]
fn prompt_longer_than_context_is_an_error() {
    let model = tiny_model(true, false);
    let ids: Vec<u32> = (0..41).map(|i| i % 61).collect();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let err = model.forward(&x, None).unwrap_err().to_string();
    assert!(err.contains("41 tokens") && err.contains("40"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let cfg = tiny_config(true, false);
    let mut t = tiny_tensors(&cfg, 1);
    t.remove("model.layers.1.mlp.up_proj.weight");
    let err = Llama::load(VarBuilder::from_tensors(t, DType::F32, &Device::Cpu), &cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
}

#[test]
fn wrong_shape_tensor_is_named() {
    let cfg = tiny_config(true, false);
    let mut t = tiny_tensors(&cfg, 1);
    t.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros((8, 8), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = Llama::load(VarBuilder::from_tensors(t, DType::F32, &Device::Cpu), &cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("k_proj"), "{err}");
}

#[test]
fn qkv_bias_is_required_when_configured() {
    let with_bias = tiny_config(false, true);
    let no_bias_tensors = tiny_tensors(&tiny_config(false, false), 3);
    let err = Llama::load(
        VarBuilder::from_tensors(no_bias_tensors, DType::F32, &Device::Cpu),
        &with_bias,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("q_proj.bias"), "{err}");
}

#[test]
fn named_linears_use_checkpoint_paths() {
    let mut model = tiny_model(true, false);
    let names: Vec<String> = model
        .named_linears_mut()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names.len(), 2 * 7 + 1);
    assert_eq!(names[0], "model.layers.0.self_attn.q_proj");
    assert_eq!(names[13], "model.layers.1.mlp.down_proj");
    assert_eq!(names[14], "lm_head");
}

#[test]
fn fused_decode_step_is_cuda_only() {
    // The fused step (lorafuse_ops::fused_decode) applies on CUDA only; everywhere else
    // generation takes the cached Candle forward that the tests above check.
    let model = tiny_model(false, true);
    let cache = model.new_cache(16);
    assert!(model.fused_decoder(&cache, 16).unwrap().is_none());
}
