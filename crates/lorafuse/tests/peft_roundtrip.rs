//! PEFT round trips on the real SmolLM2-135M-Instruct (f32, CPU), against fixtures computed by
//! scripts/fixtures/smollm2_peft_roundtrip.py, per-record mean NLL within 2e-3:
//! (a) an adapter made by PEFT gives PEFT's NLL here; (b) an adapter trained by `lorafuse train`
//! gives our NLL in PEFT; (c) `lorafuse merge` (library merge + export) writes a folder that gives
//! transformers' NLL on the folder it loads, here and equal to the unmerged adapter's.

use candle_core::{DType, Device};
use lorafuse::lora;
use lorafuse::models::Llama;
use lorafuse::tokenizer::TextTokenizer;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f64 = 2e-3;
/// Each fixture adapter moves some record's NLL by more than this from the base model's, so a
/// loader that silently dropped the adapter could not pass.
const MIN_ADAPTER_EFFECT: f64 = 0.05;

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn gguf_path() -> Option<PathBuf> {
    let p = manifest().join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipped: {} is absent (run scripts/fetch-models.sh)",
            p.display()
        );
        None
    }
}

fn fixture_dir() -> PathBuf {
    manifest().join("tests/fixtures/smollm2_peft")
}

fn expected() -> Value {
    let p = fixture_dir().join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn texts() -> Vec<String> {
    lorafuse::perplexity::read_text_records(&manifest().join("tests/data/ppl.jsonl")).unwrap()
}

fn load(path: &Path) -> (Llama, TextTokenizer) {
    let files = lorafuse::loading::open_model(path, DType::F32, &Device::Cpu).unwrap();
    (
        Llama::load(files.vb, &files.config).unwrap(),
        files.tokenizer,
    )
}

/// `(tokens, mean_nll)` per record, as `lorafuse perplexity` reports them.
fn score(model: &Llama, tok: &TextTokenizer) -> Vec<(u64, f64)> {
    lorafuse::perplexity::score_texts(model, tok, &texts())
        .unwrap()
        .records
        .iter()
        .map(|r| (r.tokens as u64, r.mean_nll.unwrap()))
        .collect()
}

fn want(v: &Value) -> Vec<(u64, f64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["tokens"].as_u64().unwrap(),
                r["mean_nll"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Asserts equal token counts and per-record NLL within `TOL`; returns the largest |difference|.
fn assert_close(got: &[(u64, f64)], want: &[(u64, f64)], what: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: record count");
    let mut worst = 0.0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.0, w.0, "{what}: tokens of record {i}");
        let d = (g.1 - w.1).abs();
        assert!(
            d < TOL,
            "{what}: record {i} mean NLL {} vs {} (|diff| {d:.2e})",
            g.1,
            w.1
        );
        worst = worst.max(d);
    }
    eprintln!("{what}: max per-record |dNLL| {worst:.2e}");
    worst
}

fn max_diff(a: &[(u64, f64)], b: &[(u64, f64)]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.1 - y.1).abs())
        .fold(0.0, f64::max)
}

/// Loads the adapter folder the way `lorafuse perplexity --adapter DIR` does: PEFT format, f32
/// matrices, activated with weight 1.
fn load_adapter(model: &mut Llama, dir: &str, name: &str) {
    lora::peft_io::load_peft(model, &fixture_dir().join(dir), name, DType::F32).unwrap();
}

#[test]
fn peft_and_trained_adapters_match_peft_on_smollm2() {
    let Some(gguf) = gguf_path() else { return };
    let fx = expected();
    let (mut model, tok) = load(&gguf);
    let base = score(&model, &tok);
    assert_close(&base, &want(&fx["base"]), "base vs transformers");

    load_adapter(&mut model, "peft_adapter", "a");
    load_adapter(&mut model, "ours_adapter", "b");
    // The PEFT-made config selects q_proj at rank 4, the rest at rank 2, on layers 1, 14 and 28
    // only: check the wrapping followed layers_to_transform and rank_pattern.
    let wrapped: HashMap<String, usize> = lora::lora_layers(&model)
        .into_iter()
        .filter_map(|(p, l)| l.adapter("a").map(|a| (p, a.a.dims()[0])))
        .collect();
    assert_eq!(wrapped.len(), 3 * 7);
    assert_eq!(wrapped["model.layers.14.self_attn.q_proj"], 4);
    assert_eq!(wrapped["model.layers.28.mlp.down_proj"], 2);

    for (name, key) in [("a", "peft_adapter"), ("b", "ours_adapter")] {
        lora::set_active_adapter(&mut model, name).unwrap();
        let got = score(&model, &tok);
        assert_close(&got, &want(&fx[key]["peft"]), &format!("{key} vs PEFT"));
        let moved = max_diff(&got, &base);
        assert!(
            moved > MIN_ADAPTER_EFFECT,
            "{key}: the adapter moves the NLL by only {moved}"
        );
    }
}

#[test]
fn merged_folders_match_transformers_on_smollm2() {
    let Some(gguf) = gguf_path() else { return };
    let fx = expected();
    let tmp = tempfile::tempdir().unwrap();
    for key in ["peft_adapter", "ours_adapter"] {
        // What `lorafuse merge --adapter DIR --out OUT` does.
        let (mut model, tok) = load(&gguf);
        load_adapter(&mut model, key, "adapter0");
        let unmerged = score(&model, &tok);
        lora::unload_lora(&mut model, true).unwrap();
        assert!(lora::lora_layers(&model).is_empty());
        let tensors: HashMap<_, _> = model.named_tensors().into_iter().collect();
        let out = tmp.path().join(key);
        lorafuse::loading::save_hf_folder(&out, model.config(), &tensors, &tok).unwrap();
        drop((model, tensors));

        let (merged, tok) = load(&out);
        let got = score(&merged, &tok);
        let what = format!("{key} merged folder");
        assert_close(
            &got,
            &want(&fx[key]["merged_transformers"]),
            &format!("{what} vs transformers"),
        );
        assert_close(&got, &unmerged, &format!("{what} vs unmerged adapter"));
        assert!(max_diff(&got, &want(&fx["base"])) > MIN_ADAPTER_EFFECT);
        std::fs::remove_dir_all(&out).unwrap();
    }
}
