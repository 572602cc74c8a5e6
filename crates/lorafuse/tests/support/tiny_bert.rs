//! Helpers shared by the embedding test files: cosine and max-abs-diff, the real all-MiniLM-L6-v2
//! folder (when fetched), and a tiny random BERT in a temporary sentence-transformers folder.

// Each test file that includes this module uses a different subset of it.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `models/all-MiniLM-L6-v2`, or `None` (with a note) when it has not been fetched.
pub fn minilm() -> Option<PathBuf> {
    let dir = repo_root().join("models/all-MiniLM-L6-v2");
    if dir.join("model.safetensors").exists() {
        Some(dir)
    } else {
        println!(
            "skipped: {} is absent (run scripts/fetch-models.sh)",
            dir.display()
        );
        None
    }
}

/// Cosine similarity, accumulated in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}

/// Largest element-wise difference between two lists of vectors.
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

// ---- a tiny random BERT in a temporary sentence-transformers folder ----

/// The tiny model's vocabulary after its four special tokens.
pub const WORDS: [&str; 12] = [
    "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "query", ":", "far", "away",
];
/// The tiny model's hidden size.
pub const HIDDEN: usize = 8;

/// A sentence-transformers folder holding a 2-layer BERT with hidden size 8 and deterministic
/// pseudo-random weights (no pooler), its checkpoint names prefixed by `prefix`; `pooling: None`
/// leaves out `1_Pooling/config.json`.
pub fn tiny_folder(
    prefix: &str,
    pooling: Option<serde_json::Value>,
    normalize: bool,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for (i, t) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .iter()
        .chain(WORDS.iter())
        .enumerate()
    {
        vocab.insert(t.to_string(), i as u32);
    }
    let special = |id: u32, s: &str| {
        json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let tok = json!({
        "version": "1.0", "truncation": null,
        "padding": {"strategy": {"Fixed": 12}, "direction": "Right", "pad_to_multiple_of": null,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": [special(0, "[PAD]"), special(1, "[UNK]"), special(2, "[CLS]"), special(3, "[SEP]")],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    let cfg = json!({"model_type": "bert", "architectures": ["BertModel"], "vocab_size": vocab.len(),
        "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
        "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"});
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    // Deterministic pseudo-random weights, so every folder built here holds the same model.
    let mut seed = 0x2545_f491u32;
    let mut t = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let mut w: HashMap<String, Tensor> = HashMap::new();
    let h = HIDDEN;
    w.insert(
        format!("{prefix}embeddings.word_embeddings.weight"),
        t(&[vocab.len(), h]),
    );
    w.insert(
        format!("{prefix}embeddings.position_embeddings.weight"),
        t(&[16, h]),
    );
    w.insert(
        format!("{prefix}embeddings.token_type_embeddings.weight"),
        t(&[2, h]),
    );
    w.insert(
        format!("{prefix}embeddings.LayerNorm.weight"),
        (t(&[h]) + 1.0).unwrap(),
    );
    w.insert(format!("{prefix}embeddings.LayerNorm.bias"), t(&[h]));
    for l in 0..2 {
        let p = format!("{prefix}encoder.layer.{l}");
        for (name, out, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", 16, h),
            ("output.dense", h, 16),
        ] {
            w.insert(format!("{p}.{name}.weight"), t(&[out, inp]));
            w.insert(format!("{p}.{name}.bias"), t(&[out]));
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            w.insert(format!("{p}.{ln}.weight"), (t(&[h]) + 1.0).unwrap());
            w.insert(format!("{p}.{ln}.bias"), t(&[h]));
        }
    }
    candle_core::safetensors::save(&w, d.join("model.safetensors")).unwrap();
    let mut modules = vec![
        json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
    ];
    modules.push(json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}));
    if normalize {
        modules.push(json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
    }
    std::fs::write(d.join("modules.json"), json!(modules).to_string()).unwrap();
    if let Some(p) = pooling {
        std::fs::create_dir_all(d.join("1_Pooling")).unwrap();
        std::fs::write(d.join("1_Pooling/config.json"), p.to_string()).unwrap();
    }
    std::fs::write(
        d.join("sentence_bert_config.json"),
        r#"{"max_seq_length": 8, "do_lower_case": false}"#,
    )
    .unwrap();
    dir
}

/// A `1_Pooling/config.json` selecting mean pooling.
pub fn mean_pooling() -> Option<serde_json::Value> {
    Some(json!({"word_embedding_dimension": HIDDEN, "pooling_mode_mean_tokens": true}))
}
