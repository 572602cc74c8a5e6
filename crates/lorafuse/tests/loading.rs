//! Model file loading: GGUF (config, dequantization, q/k un-permutation, tokenizer) and Hugging
//! Face folders (single and sharded safetensors), export round trips, and bad input.
//!
//! Synthetic files are written in a temp dir; the real SmolLM2 GGUF is used when
//! `models/SmolLM2-135M-Instruct.Q4_1.gguf` exists (scripts/fetch-models.sh), against fixtures
//! made by `tests/fixtures/make_loading_fixtures.py` with the gguf package, transformers and the
//! model's Hugging Face tokenizer.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use lorafuse::config::{LlamaConfig, RopeScaling};
use lorafuse::loading::gguf::{hf_name, unpermute_rows, GgufFile};
use lorafuse::loading::gguf_tokenizer::tokenizer_from_gguf;
use lorafuse::loading::{open_model, read_gguf_tensors, save_hf_folder};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 96;
const LAYERS: usize = 2;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn real_gguf() -> Option<PathBuf> {
    let p = workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        println!(
            "skipping: {} is absent (run scripts/fetch-models.sh)",
            p.display()
        );
        None
    }
}

fn fixture(name: &str) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// Deterministic values in [-0.5, 0.5) that differ per seed and position.
fn pseudo(dims: &[usize], seed: u64) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let x =
                (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)).wrapping_add(seed * 97);
            ((x % 10_007) as f32 / 10_007.0) - 0.5
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// llama.cpp's converter permutation (convert_hf_to_gguf.py `permute`), HF layout -> GGUF.
fn llama_cpp_permute(t: &Tensor, n_head: usize) -> Tensor {
    let dims = t.dims().to_vec();
    let half = dims[0] / n_head / 2;
    t.reshape((n_head, 2, half, dims[1]))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape(dims)
        .unwrap()
}

fn byte_chars() -> Vec<char> {
    let mut n = 0;
    (0..=255u32)
        .map(|b| {
            if (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            }
        })
        .collect()
}

/// A tiny byte-level BPE vocabulary: the 256 byte characters, three merges, three control tokens.
fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    tokens.extend(["Ġt", "he", "Ġthe"].map(String::from));
    tokens.extend(["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
    let mut types = vec![1; tokens.len()];
    let n = types.len();
    types[n - 3..].fill(3);
    let merges = ["Ġ t", "h e", "Ġt he"].map(String::from).to_vec();
    (tokens, types, merges)
}

struct Tiny {
    arch: &'static str,
    tied: bool,
    /// llama.cpp's Llama 3 `rope_freqs.weight`, one factor per rotary frequency.
    rope_freqs: Option<Vec<f32>>,
    /// `rope.scaling.original_context_length`.
    original_context: Option<usize>,
}

fn u32v(x: usize) -> Value {
    Value::U32(x as u32)
}

/// Writes a tiny decoder GGUF (every supported tensor type appears) and returns the tensors it
/// holds as the HF layout expects them after dequantization.
fn write_tiny_gguf(path: &Path, opts: &Tiny) -> HashMap<String, Tensor> {
    let (tokens, types, merges) = tiny_vocab();
    let vocab = tokens.len();
    let a = opts.arch;
    let strs = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.block_count"), u32v(LAYERS)),
        (format!("{a}.context_length"), u32v(256)),
        (format!("{a}.embedding_length"), u32v(HIDDEN)),
        (format!("{a}.feed_forward_length"), u32v(FFN)),
        (format!("{a}.attention.head_count"), u32v(HEADS)),
        (format!("{a}.attention.head_count_kv"), u32v(KV_HEADS)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(100_000.0)),
        (format!("{a}.rope.dimension_count"), u32v(HEAD_DIM)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), strs(&tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strs(&merges)),
        ("tokenizer.ggml.bos_token_id".into(), u32v(vocab - 2)),
        ("tokenizer.ggml.eos_token_id".into(), u32v(vocab - 1)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String("{% for m in messages %}{{ m['content'] }}{% endfor %}".into()),
        ),
    ];
    if let Some(n) = opts.original_context {
        md.push((format!("{a}.rope.scaling.original_context_length"), u32v(n)));
    }
    md.sort_by(|x, y| x.0.cmp(&y.0));
    let mut qtensors = vec![];
    if let Some(f) = &opts.rope_freqs {
        let t = Tensor::new(f.as_slice(), &Device::Cpu).unwrap();
        qtensors.push((
            "rope_freqs.weight".to_string(),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }

    // (gguf name, HF-layout value, storage type)
    let mut specs: Vec<(String, Tensor, GgmlDType)> = vec![
        (
            "token_embd.weight".into(),
            pseudo(&[vocab, HIDDEN], 1),
            GgmlDType::Q8_0,
        ),
        (
            "output_norm.weight".into(),
            pseudo(&[HIDDEN], 2),
            GgmlDType::F32,
        ),
    ];
    if !opts.tied {
        specs.push((
            "output.weight".into(),
            pseudo(&[vocab, HIDDEN], 3),
            GgmlDType::F16,
        ));
    }
    for l in 0..LAYERS {
        let s = 10 + 20 * l as u64;
        let b = |m: &str| format!("blk.{l}.{m}");
        let q_type = if l == 0 {
            GgmlDType::F32
        } else {
            GgmlDType::Q4_0
        };
        specs.extend([
            (b("attn_norm.weight"), pseudo(&[HIDDEN], s), GgmlDType::F32),
            (b("attn_q.weight"), pseudo(&[HIDDEN, HIDDEN], s + 1), q_type),
            (
                b("attn_k.weight"),
                pseudo(&[KV_HEADS * HEAD_DIM, HIDDEN], s + 2),
                GgmlDType::F16,
            ),
            (
                b("attn_v.weight"),
                pseudo(&[KV_HEADS * HEAD_DIM, HIDDEN], s + 3),
                GgmlDType::BF16,
            ),
            (
                b("attn_output.weight"),
                pseudo(&[HIDDEN, HIDDEN], s + 4),
                GgmlDType::Q4_1,
            ),
            (
                b("ffn_norm.weight"),
                pseudo(&[HIDDEN], s + 5),
                GgmlDType::F32,
            ),
            (
                b("ffn_gate.weight"),
                pseudo(&[FFN, HIDDEN], s + 6),
                GgmlDType::Q4_1,
            ),
            (
                b("ffn_up.weight"),
                pseudo(&[FFN, HIDDEN], s + 7),
                GgmlDType::Q8_0,
            ),
            (
                b("ffn_down.weight"),
                pseudo(&[HIDDEN, FFN], s + 8),
                GgmlDType::Q4_0,
            ),
        ]);
        if a == "qwen2" {
            specs.extend([
                (b("attn_q.bias"), pseudo(&[HIDDEN], s + 11), GgmlDType::F32),
                (
                    b("attn_k.bias"),
                    pseudo(&[KV_HEADS * HEAD_DIM], s + 12),
                    GgmlDType::F32,
                ),
                (
                    b("attn_v.bias"),
                    pseudo(&[KV_HEADS * HEAD_DIM], s + 13),
                    GgmlDType::F32,
                ),
            ]);
        }
    }

    let permuted = a == "llama";
    let mut expected = HashMap::new();
    for (name, hf, ty) in specs {
        let stored = match (permuted, name.contains("attn_q."), name.contains("attn_k.")) {
            (true, true, _) => llama_cpp_permute(&hf, HEADS),
            (true, _, true) => llama_cpp_permute(&hf, KV_HEADS),
            _ => hf.clone(),
        };
        let q = QTensor::quantize(&stored, ty).unwrap();
        // Quantization blocks run along rows and the permutation moves whole rows, so the
        // dequantized HF tensor is the dequantized original.
        let want = QTensor::quantize(&hf, ty)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        expected.insert(hf_name(&name).unwrap(), want);
        qtensors.push((name, q));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    expected
}

fn assert_same(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let g: Vec<f32> = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f32> = want
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(g, w, "{name}: values");
}

fn tiny(dir: &Path, arch: &'static str, tied: bool) -> (PathBuf, HashMap<String, Tensor>) {
    let path = dir.join(format!("tiny-{arch}-{tied}.gguf"));
    let expected = write_tiny_gguf(
        &path,
        &Tiny {
            arch,
            tied,
            rope_freqs: None,
            original_context: None,
        },
    );
    (path, expected)
}

#[test]
fn config_reads_rope_theta_from_top_level_or_rope_parameters() {
    let base = r#""model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2"#;
    let origin = Path::new("config.json");
    let top = LlamaConfig::from_json_str(&format!("{{{base}, \"rope_theta\": 500000.0}}"), origin)
        .unwrap();
    let nested = LlamaConfig::from_json_str(
        &format!("{{{base}, \"rope_parameters\": {{\"rope_theta\": 500000.0, \"rope_type\": \"default\"}}}}"),
        origin,
    )
    .unwrap();
    assert_eq!(top.rope_theta, 500_000.0);
    assert_eq!(nested, top);
    let llama3 = LlamaConfig::from_json_str(
        &format!(
            "{{{base}, \"rope_parameters\": {{\"rope_theta\": 500000.0, \"rope_type\": \"llama3\", \"factor\": 32.0,
             \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192}}}}"
        ),
        origin,
    )
    .unwrap();
    assert_eq!(llama3.rope_theta, 500_000.0);
    assert_eq!(
        llama3.rope_scaling,
        RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        }
    );
}

#[test]
fn gguf_metadata_gives_the_tiny_config() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny(dir.path(), "llama", true);
    let cfg = GgufFile::open(&path).unwrap().config().unwrap();
    assert_eq!(cfg.model_type, "llama");
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers
        ),
        (HIDDEN, FFN, LAYERS)
    );
    assert_eq!(
        (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim
        ),
        (HEADS, KV_HEADS, HEAD_DIM)
    );
    assert_eq!(cfg.vocab_size, 262);
    assert_eq!(cfg.rope_theta, 100_000.0);
    assert_eq!(cfg.rms_norm_eps, 1e-5f32 as f64);
    assert_eq!(cfg.max_position_embeddings, 256);
    assert!(cfg.tie_word_embeddings && !cfg.attention_bias);
    assert_eq!(
        (cfg.bos_token_id, cfg.eos_token_ids.clone()),
        (Some(260), vec![261])
    );
    let (path, _) = tiny(dir.path(), "qwen2", false);
    let cfg = GgufFile::open(&path).unwrap().config().unwrap();
    assert!(!cfg.tie_word_embeddings && cfg.attention_bias);
}

#[test]
fn llama3_rope_factors_in_gguf_become_llama3_scaling() {
    // llama.cpp's convert_hf_to_gguf.py: one factor per rotary frequency.
    let (factor, low, high, orig) = (32.0f64, 1.0, 4.0, 4096.0);
    let factors: Vec<f32> = (0..HEAD_DIM / 2)
        .map(|i| {
            let freq = 1.0 / 100_000f64.powf((2 * i) as f64 / HEAD_DIM as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < orig / high {
                1.0
            } else if wavelen > orig / low {
                factor
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect();
    // The tiny config's frequencies hit all three branches.
    assert!(
        factors.contains(&1.0)
            && factors.contains(&32.0)
            && factors.iter().any(|&f| f > 1.0 && f < 32.0)
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama3.gguf");
    let opts = |f: Vec<f32>| Tiny {
        arch: "llama",
        tied: true,
        rope_freqs: Some(f),
        original_context: Some(4096),
    };
    write_tiny_gguf(&path, &opts(factors));
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(
        file.config().unwrap().rope_scaling,
        RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 4096
        }
    );
    // rope_freqs is config, not a weight.
    let cfg = file.config().unwrap();
    assert!(file
        .hf_tensors(&cfg, DType::F32, &Device::Cpu)
        .unwrap()
        .keys()
        .all(|k| !k.contains("rope")));
    // Factors that follow another scheme are refused, naming the tensor.
    write_tiny_gguf(&path, &opts(vec![2.0; HEAD_DIM / 2]));
    let err = GgufFile::open(&path)
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
    assert!(err.contains("rope_freqs.weight"), "{err}");
}

#[test]
fn gguf_tensors_load_dequantized_renamed_and_unpermuted() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, tied) in [("llama", false), ("qwen2", true)] {
        let (path, expected) = tiny(dir.path(), arch, tied);
        let (cfg, tensors, _) = read_gguf_tensors(&path, DType::F32, &Device::Cpu).unwrap();
        let mut names: Vec<_> = tensors.keys().cloned().collect();
        names.sort();
        let mut want_names: Vec<_> = expected.keys().cloned().collect();
        want_names.sort();
        assert_eq!(names, want_names);
        assert_eq!(tensors.contains_key("lm_head.weight"), !tied);
        for (name, want) in &expected {
            assert_same(name, &tensors[name], want);
        }
        // The F32 q_proj of layer 0 round-trips exactly through llama.cpp's permutation.
        let q0 = &tensors["model.layers.0.self_attn.q_proj.weight"];
        assert_same("q0 exact", q0, &pseudo(&[HIDDEN, HIDDEN], 11));
        // The VarBuilder serves the same tensors in the requested dtype.
        let files = open_model(&path, DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(files.config, cfg);
        let k = files
            .vb
            .get(
                (KV_HEADS * HEAD_DIM, HIDDEN),
                "model.layers.1.self_attn.k_proj.weight",
            )
            .unwrap();
        assert_eq!(k.dtype(), DType::BF16);
        assert_same(
            "k1 bf16",
            &k,
            &expected["model.layers.1.self_attn.k_proj.weight"]
                .to_dtype(DType::BF16)
                .unwrap(),
        );
    }
}

#[test]
fn unpermute_inverts_llama_cpp_permutation_for_weights_and_biases() {
    let w = pseudo(&[48, 5], 7);
    assert_same(
        "weight",
        &unpermute_rows(&llama_cpp_permute(&w, 3), 3).unwrap(),
        &w,
    );
    let b = pseudo(&[48], 8);
    let permuted_b = llama_cpp_permute(&b.reshape((48, 1)).unwrap(), 6)
        .reshape(48)
        .unwrap();
    assert_same("bias", &unpermute_rows(&permuted_b, 6).unwrap(), &b);
    // Row r of head h, rotary half j, index d sits at GGUF row h*2*half + 2*d + j.
    let rows = Tensor::arange(0f32, 8., &Device::Cpu)
        .unwrap()
        .reshape((8, 1))
        .unwrap();
    let back: Vec<f32> = unpermute_rows(&rows, 2)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(back, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    assert!(unpermute_rows(&pseudo(&[10, 2], 1), 3).is_err());
}

#[test]
fn q4_0_weights_stay_within_quantization_error_of_the_originals() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny(dir.path(), "llama", true);
    let file = GgufFile::open(&path).unwrap();
    let cfg = file.config().unwrap();
    let got = file.load_hf("blk.1.ffn_down.weight", &cfg).unwrap();
    let orig = pseudo(&[HIDDEN, FFN], 38);
    // Q4_0 keeps 16 levels per block of 32 spanning at most [-0.5, 0.5]: error <= one step.
    let err: f32 = (got - &orig)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(err <= 1.0 / 16.0 + 1e-6, "max error {err}");
    let err_q: f32 = (file.load_hf("blk.1.attn_q.weight", &cfg).unwrap()
        - pseudo(&[HIDDEN, HIDDEN], 31))
    .unwrap()
    .abs()
    .unwrap()
    .max_all()
    .unwrap()
    .to_scalar()
    .unwrap();
    assert!(
        err_q <= 1.0 / 16.0 + 1e-6,
        "un-permuted Q4_0 q_proj max error {err_q}"
    );
}

#[test]
fn gguf_tokenizer_builds_from_metadata_with_specials_and_template() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny(dir.path(), "llama", true);
    let tok = GgufFile::open(&path).unwrap().tokenizer().unwrap();
    assert_eq!(tok.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.eos_ids, vec![261]);
    assert!(tok.chat_template.as_deref().unwrap().contains("messages"));
    let ids = tok.encode("<|im_start|>the then<|im_end|>", true).unwrap();
    // "the" merges to t + "he" (no "the" token), " then" to "Ġthe" + n.
    let t = byte_chars().iter().position(|&c| c == 't').unwrap() as u32;
    let n = byte_chars().iter().position(|&c| c == 'n').unwrap() as u32;
    assert_eq!(ids, vec![260, t, 257, 258, n, 261]);
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<|im_start|>the then<|im_end|>"
    );
    assert_eq!(tok.decode(&ids, true).unwrap(), "the then");
}

#[test]
fn sentencepiece_gguf_tokenizer_matches_transformers() {
    let fx = fixture("sentencepiece_reference.json");
    let strings = |k: &str| {
        Value::Array(
            fx[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| Value::String(s.as_str().unwrap().into()))
                .collect(),
        )
    };
    let mut md = HashMap::new();
    md.insert(
        "tokenizer.ggml.model".to_string(),
        Value::String("llama".into()),
    );
    md.insert("tokenizer.ggml.tokens".to_string(), strings("tokens"));
    md.insert(
        "tokenizer.ggml.scores".to_string(),
        Value::Array(
            fx["scores"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| Value::F32(s.as_f64().unwrap() as f32))
                .collect(),
        ),
    );
    md.insert(
        "tokenizer.ggml.token_type".to_string(),
        Value::Array(
            fx["token_type"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| Value::I32(s.as_i64().unwrap() as i32))
                .collect(),
        ),
    );
    for k in ["bos_token_id", "eos_token_id", "unknown_token_id"] {
        md.insert(
            format!("tokenizer.ggml.{k}"),
            Value::U32(fx[k].as_u64().unwrap() as u32),
        );
    }
    let tok = tokenizer_from_gguf(&md, Path::new("sp.gguf")).unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids, want, "ids of {text:?}");
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
    }
}

#[test]
fn export_then_reopen_gives_identical_tensors_config_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    for (tied, dtype) in [(true, DType::F32), (false, DType::F32), (true, DType::BF16)] {
        let (path, _) = tiny(dir.path(), "llama", tied);
        let (cfg, tensors, tok) = read_gguf_tensors(&path, dtype, &Device::Cpu).unwrap();
        let out = dir.path().join(format!("export-{tied}-{dtype:?}"));
        save_hf_folder(&out, &cfg, &tensors, &tok).unwrap();
        // Exporting again over our own folder replaces it.
        save_hf_folder(&out, &cfg, &tensors, &tok).unwrap();
        let names =
            lorafuse::loading::safetensors::check_safetensors_file(&out.join("model.safetensors"))
                .unwrap();
        assert_eq!(names.contains(&"lm_head.weight".to_string()), !tied);
        let back = open_model(&out, dtype, &Device::Cpu).unwrap();
        assert_eq!(back.config, cfg);
        for (name, t) in &tensors {
            if tied && name == "lm_head.weight" {
                continue;
            }
            assert_same(name, &back.vb.get(t.dims(), name).unwrap(), t);
        }
        for text in ["<|im_start|>the then<|im_end|>", "héllo  wörld\n\n"] {
            assert_eq!(
                back.tokenizer.encode(text, true).unwrap(),
                tok.encode(text, true).unwrap()
            );
        }
        assert_eq!(back.tokenizer.eos_ids, tok.eos_ids);
        assert_eq!(back.tokenizer.bos_token, tok.bos_token);
        assert_eq!(back.tokenizer.chat_template, tok.chat_template);
        let tc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(tc["add_bos_token"], false);
        let hf_cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let want_dtype = if dtype == DType::BF16 {
            "bfloat16"
        } else {
            "float32"
        };
        assert_eq!(hf_cfg["torch_dtype"], want_dtype);
    }
    // A folder holding other files is not replaced.
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), "mine").unwrap();
    let (path, _) = tiny(dir.path(), "llama", true);
    let (cfg, tensors, tok) = read_gguf_tensors(&path, DType::F32, &Device::Cpu).unwrap();
    let err = save_hf_folder(&busy, &cfg, &tensors, &tok)
        .unwrap_err()
        .to_string();
    assert!(err.contains("notes.txt"), "{err}");
    assert!(busy.join("notes.txt").exists());
}

#[test]
fn sharded_safetensors_folder_loads_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny(dir.path(), "llama", true);
    let (cfg, tensors, tok) = read_gguf_tensors(&path, DType::F32, &Device::Cpu).unwrap();
    let out = dir.path().join("sharded");
    save_hf_folder(&out, &cfg, &tensors, &tok).unwrap();
    std::fs::remove_file(out.join("model.safetensors")).unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in tensors.iter().enumerate() {
        let shard = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        weight_map.insert(name.clone(), shard.into());
        if i % 2 == 0 {
            a.insert(name.clone(), t.clone())
        } else {
            b.insert(name.clone(), t.clone())
        };
    }
    candle_core::safetensors::save(&a, out.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, out.join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let back = open_model(&out, DType::F32, &Device::Cpu).unwrap();
    for (name, t) in &tensors {
        assert_same(name, &back.vb.get(t.dims(), name).unwrap(), t);
    }
    // An index naming a shard that is not there: the error names the index and the shard.
    std::fs::remove_file(out.join("model-00002-of-00002.safetensors")).unwrap();
    let err = open_model(&out, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors.index.json")
            && err.contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
}

#[test]
fn bad_inputs_give_errors_naming_the_file_key_or_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    let err = open_model(&missing, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.gguf"), "{err}");

    // Truncated GGUF, cut in the header and in the tensor data.
    let (path, _) = tiny(dir.path(), "llama", true);
    let bytes = std::fs::read(&path).unwrap();
    for cut in [3, 20, bytes.len() / 3, bytes.len() - 10] {
        let t = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&t, &bytes[..cut]).unwrap();
        let err = open_model(&t, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("cut{cut}.gguf")),
            "cut at {cut}: {err}"
        );
    }

    // Truncated safetensors.
    let (cfg, tensors, tok) = read_gguf_tensors(&path, DType::F32, &Device::Cpu).unwrap();
    let out = dir.path().join("folder");
    save_hf_folder(&out, &cfg, &tensors, &tok).unwrap();
    let st = out.join("model.safetensors");
    let full = std::fs::read(&st).unwrap();
    for cut in [4, 100, full.len() - 1] {
        std::fs::write(&st, &full[..cut]).unwrap();
        let err = open_model(&out, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.safetensors"), "cut at {cut}: {err}");
    }
    std::fs::write(&st, &full).unwrap();

    // Unknown architecture in config.json.
    let cfg_path = out.join("config.json");
    let good_cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, good_cfg.replace("\"llama\"", "\"gpt_neox\"")).unwrap();
    let err = open_model(&out, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gpt_neox") && err.contains("config.json"),
        "{err}"
    );
    std::fs::write(&cfg_path, good_cfg).unwrap();

    // Missing tensor and wrong shape, as the model builder meets them.
    let files = open_model(&out, DType::F32, &Device::Cpu).unwrap();
    let err = files
        .vb
        .get((HIDDEN, HIDDEN), "model.layers.7.self_attn.q_proj.weight")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.7.self_attn.q_proj.weight"),
        "{err}"
    );
    let err = files
        .vb
        .get((HIDDEN, 3), "model.layers.0.self_attn.o_proj.weight")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.o_proj.weight") && err.contains("shape"),
        "{err}"
    );
    let gguf_files = open_model(&path, DType::F32, &Device::Cpu).unwrap();
    let err = gguf_files
        .vb
        .get((HIDDEN, 3), "model.norm.weight")
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.norm.weight"), "{err}");
}

/// Writes a GGUF with the given metadata and tensors.
fn write_gguf(path: &Path, md: &[(&str, Value)], tensors: &[(&str, QTensor)]) {
    let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut std::fs::File::create(path).unwrap(), &md, &ts).unwrap();
}

#[test]
fn gguf_with_unsupported_arch_type_or_tokenizer_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("gpt2.gguf");
    write_gguf(
        &p,
        &[("general.architecture", Value::String("gpt2".into()))],
        &[],
    );
    let err = GgufFile::open(&p)
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
    assert!(err.contains("gpt2") && err.contains("gpt2.gguf"), "{err}");

    let p = dir.path().join("k.gguf");
    let q4k = QTensor::quantize(&pseudo(&[2, 256], 1), GgmlDType::Q4K).unwrap();
    write_gguf(
        &p,
        &[("general.architecture", Value::String("llama".into()))],
        &[("blk.0.ffn_up.weight", q4k)],
    );
    let err = GgufFile::open(&p)
        .unwrap()
        .dequantize("blk.0.ffn_up.weight")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blk.0.ffn_up.weight") && err.contains("Q4K"),
        "{err}"
    );

    let md = HashMap::from([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("bert".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(vec![Value::String("a".into())]),
        ),
    ]);
    let err = tokenizer_from_gguf(&md, Path::new("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.ggml.model") && err.contains("bert"),
        "{err}"
    );
}

// ---- the real SmolLM2 GGUF ----

#[test]
fn smollm2_gguf_metadata_gives_its_config() {
    let Some(path) = real_gguf() else { return };
    let cfg = GgufFile::open(&path).unwrap().config().unwrap();
    assert_eq!(cfg.model_type, "llama");
    assert_eq!(cfg.num_hidden_layers, 30);
    assert_eq!(cfg.hidden_size, 576);
    assert_eq!(cfg.intermediate_size, 1536);
    assert_eq!(
        (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim
        ),
        (9, 3, 64)
    );
    assert_eq!(cfg.vocab_size, 49152);
    assert!(cfg.tie_word_embeddings && !cfg.attention_bias);
    assert_eq!(cfg.rope_theta, 100_000.0);
    assert_eq!(cfg.rope_scaling, RopeScaling::Default);
    assert_eq!(cfg.max_position_embeddings, 8192);
    assert_eq!(cfg.rms_norm_eps, 9.999999747378752e-06);
    // The same config as the model's Hugging Face config.json, when it is at hand.
    let hf_cfg = workspace_root().join("../shared/bench/smollm2-135m-config.json");
    match LlamaConfig::from_json_file(&hf_cfg) {
        Ok(hf) => assert_eq!(cfg, hf),
        Err(_) => println!(
            "skipping the config.json comparison: {} is absent",
            hf_cfg.display()
        ),
    }
}

fn check_values(got: &Tensor, want: &serde_json::Value, name: &str) {
    let shape: Vec<usize> = want["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(got.dims(), shape.as_slice(), "{name}: shape");
    for v in want["values"].as_array().unwrap() {
        let (r, c, x) = (
            v[0].as_u64().unwrap() as usize,
            v[1].as_u64().unwrap() as usize,
            v[2].as_f64().unwrap() as f32,
        );
        let g: f32 = got.get(r).unwrap().get(c).unwrap().to_scalar().unwrap();
        assert_eq!(g, x, "{name}[{r}, {c}]");
    }
}

#[test]
fn smollm2_dequantized_q4_1_and_q8_0_match_the_gguf_package() {
    let Some(path) = real_gguf() else { return };
    let fx = fixture("gguf_loading_reference.json");
    let file = GgufFile::open(&path).unwrap();
    for (name, want) in fx["gguf_dequantized"].as_object().unwrap() {
        check_values(&file.dequantize(name).unwrap(), want, name);
    }
}

#[test]
fn smollm2_q_and_k_unpermute_to_transformers_layout() {
    let Some(path) = real_gguf() else { return };
    let fx = fixture("gguf_loading_reference.json");
    let file = GgufFile::open(&path).unwrap();
    let cfg = file.config().unwrap();
    let by_hf: HashMap<String, &str> = file
        .tensor_names()
        .into_iter()
        .filter_map(|n| Some((hf_name(n)?, n)))
        .collect();
    for (name, want) in fx["transformers_loaded"].as_object().unwrap() {
        check_values(&file.load_hf(by_hf[name], &cfg).unwrap(), want, name);
    }
}

#[test]
fn smollm2_gguf_tokenizer_matches_its_hf_tokenizer() {
    let Some(path) = real_gguf() else { return };
    let tok = GgufFile::open(&path).unwrap().tokenizer().unwrap();
    assert_eq!(tok.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.eos_ids, vec![2]);
    assert!(tok
        .chat_template
        .as_deref()
        .unwrap()
        .contains("<|im_start|>"));
    let fx = fixture("smollm2_tokenizer_reference.json");
    assert_eq!(
        tok.inner.get_vocab_size(true) as u64,
        fx["vocab_size"].as_u64().unwrap()
    );
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids, want, "ids of {text:?}");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "decode of {text:?}"
        );
    }
    // With the HF tokenizer itself at hand, compare whole vocabularies and a longer text.
    let hf_path = std::env::var("SMOLLM2_TOKENIZER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            workspace_root().join("../shared/bench/smollm2-tokenizer/tokenizer.json")
        });
    let Ok(hf) = tokenizers::Tokenizer::from_file(&hf_path) else {
        println!(
            "skipping the full-vocabulary comparison: {} is absent",
            hf_path.display()
        );
        return;
    };
    assert_eq!(tok.inner.get_vocab(true), hf.get_vocab(true));
    let long = include_str!("loading.rs");
    let want = hf.encode(long, true).unwrap().get_ids().to_vec();
    assert_eq!(tok.encode(long, true).unwrap(), want);
}
