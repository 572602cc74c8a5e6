//! LoRA adapters on the encoder: a PEFT adapter saved from all-MiniLM-L6-v2's `BertModel` gives
//! the embeddings sentence-transformers computes with PEFT (skipped with a note when models/ lacks
//! the model), adapters round-trip through `save_peft` on a tiny random BERT, and bad adapter
//! folders are refused with the key and the file named.

#[path = "support/tiny_bert.rs"]
mod tiny_bert;

use candle_core::{DType, Device, Tensor};
use lorafuse::embed::Embedder;
use lorafuse::lora::{self, InitLoraWeights, LoraConfig, TargetModules};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tiny_bert::{cosine, max_abs_diff, mean_pooling, minilm, tiny_folder, HIDDEN};

/// The targets users give PEFT for a sentence-transformers encoder.
const TARGETS: [&str; 4] = ["query", "key", "value", "dense"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Case {
    text: String,
    num_tokens: usize,
    base: Vec<f32>,
    adapted: Vec<f32>,
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The module paths PEFT adapted and the cases of `minilm_peft_reference.json`.
fn reference() -> (Vec<String>, Vec<Case>) {
    let text = std::fs::read_to_string(fixtures().join("minilm_peft_reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let modules = v["adapted_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect();
    let cases = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_owned(),
            num_tokens: c["num_tokens"].as_u64().unwrap() as usize,
            base: floats(&c["base"]),
            adapted: floats(&c["adapted"]),
        })
        .collect();
    (modules, cases)
}

#[test]
fn minilm_peft_adapter_matches_sentence_transformers_with_peft_on_cpu_f32() {
    let Some(dir) = minilm() else { return };
    let (modules, cases) = reference();
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let mut emb = Embedder::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let wrapped = emb
        .load_adapter(&fixtures().join("minilm_peft_adapter"), "peft")
        .unwrap();
    // `dense` matches three projections per layer and the pooler, as in PEFT: 6 x 6 + 1.
    assert_eq!(wrapped.len(), 37);
    assert_eq!(wrapped.last().map(String::as_str), Some("pooler.dense"));
    let mut sorted = wrapped.clone();
    sorted.sort();
    assert_eq!(sorted, modules);
    for (c, ids) in cases.iter().zip(emb.tokenize(&texts).unwrap()) {
        assert_eq!(ids.len(), c.num_tokens, "token count of {:?}", c.text);
    }
    assert!(cases.iter().any(|c| c.num_tokens == emb.max_seq_length()));

    let got = emb.encode(&texts).unwrap();
    let (mut worst, mut closest_to_base) = (1.0f64, 0.0f64);
    for (c, g) in cases.iter().zip(&got) {
        let cos = cosine(g, &c.adapted);
        worst = worst.min(cos);
        assert!(cos >= 0.9999, "cosine {cos} to PEFT for {:?}", c.text);
        // The adapter moves every embedding: far more than the numerical noise above.
        let to_base = cosine(g, &c.base);
        closest_to_base = closest_to_base.max(to_base);
        assert!(to_base < 0.99, "cosine {to_base} to base for {:?}", c.text);
    }
    let want: Vec<Vec<f32>> = cases.iter().map(|c| c.adapted.clone()).collect();
    println!(
        "minilm + PEFT adapter, cpu f32: min cosine {worst:.8}, max abs diff {:.3e}, max cosine to base {closest_to_base:.4}",
        max_abs_diff(&got, &want)
    );

    // Disabled, the same embedder gives the base model's vectors; weight 0 does too.
    emb.disable_adapters().unwrap();
    let base = emb.encode(&texts).unwrap();
    for (c, b) in cases.iter().zip(&base) {
        let cos = cosine(b, &c.base);
        assert!(cos >= 0.9999, "cosine {cos} to base for {:?}", c.text);
    }
    emb.set_active_adapters(&[("peft", 0.0)]).unwrap();
    assert!(max_abs_diff(&emb.encode(&texts).unwrap(), &base) <= 1e-6);
    emb.set_active_adapters(&[("peft", 1.0)]).unwrap();
    assert!(max_abs_diff(&emb.encode(&texts).unwrap(), &got) <= 1e-6);
}

/// The same adapter on a bf16-quantized encoder (`lorafuse embed --quantize bf16 --adapter`):
/// the base projections run on their bf16 copies and the adapters add their f32 deltas.
#[test]
fn minilm_peft_adapter_on_a_bf16_encoder_stays_within_1e_4_of_peft() {
    adapter_on_a_quantized_encoder(lorafuse::models::QuantFormat::Bf16);
}

/// The same with `--quantize i16`.
#[test]
fn minilm_peft_adapter_on_an_i16_encoder_stays_within_1e_4_of_peft() {
    adapter_on_a_quantized_encoder(lorafuse::models::QuantFormat::I16);
}

fn adapter_on_a_quantized_encoder(format: lorafuse::models::QuantFormat) {
    let Some(dir) = minilm() else { return };
    let (_, cases) = reference();
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let mut emb = Embedder::load(&dir, &Device::Cpu, DType::F32).unwrap();
    emb.quantize(format).unwrap();
    emb.load_adapter(&fixtures().join("minilm_peft_adapter"), "peft")
        .unwrap();
    let got = emb.encode(&texts).unwrap();
    let mut worst = 1.0f64;
    for (c, g) in cases.iter().zip(&got) {
        let cos = cosine(g, &c.adapted);
        worst = worst.min(cos);
        assert!(cos >= 0.9999, "cosine {cos} to PEFT for {:?}", c.text);
        assert!(
            cosine(g, &c.base) < 0.99,
            "adapter inactive for {:?}",
            c.text
        );
    }
    // The quantized copies really ran under the adapters: the vectors differ from the dense ones.
    let mut dense = Embedder::load(&dir, &Device::Cpu, DType::F32).unwrap();
    dense
        .load_adapter(&fixtures().join("minilm_peft_adapter"), "peft")
        .unwrap();
    let moved = max_abs_diff(&got, &dense.encode(&texts).unwrap());
    println!("minilm + PEFT adapter, cpu {format} weights: min cosine {worst:.8} (max abs diff to dense {moved:.3e})");
    assert!(
        moved > 1e-6,
        "{format} embeddings equal the dense ones ({moved})"
    );
    // Quantizing once adapters wrap the projections is refused, naming one.
    let err = emb.quantize(format).unwrap_err().to_string();
    assert!(
        err.contains("encoder.layer.0") && err.contains("adapters"),
        "{err}"
    );
}

const TEXTS: [&str; 4] = ["the cat sat on the mat", "a dog", "", "dog ran far away"];

fn tiny_embedder(dir: &Path) -> Embedder {
    Embedder::load(dir, &Device::Cpu, DType::F32).unwrap()
}

/// Saves a random-B adapter on `query`, `key`, `value`, `dense` of the tiny model into `out`;
/// returns the adapted embeddings of [`TEXTS`].
fn save_tiny_adapter(model_dir: &Path, out: &Path) -> Vec<Vec<f32>> {
    let mut e = tiny_embedder(model_dir);
    let mut cfg = LoraConfig::new(2, 4.0, TargetModules::names(&TARGETS));
    // PEFT's default B = 0 would make every adapter a no-op.
    cfg.init_lora_weights = InitLoraWeights::Random;
    lora::apply_lora(e.model_mut(), "t", &cfg, DType::F32, 7).unwrap();
    lora::save_peft(e.model(), "t", out).unwrap();
    e.encode(&TEXTS).unwrap()
}

/// Rewrites `adapter_model.safetensors` in `dir` through `edit`.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let file = dir.join("adapter_model.safetensors");
    let mut t = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &file).unwrap();
}

fn load_err(model_dir: &Path, adapter: &Path) -> String {
    tiny_embedder(model_dir)
        .load_adapter(adapter, "bad")
        .unwrap_err()
        .to_string()
}

#[test]
fn encoder_adapter_survives_save_peft_and_load_adapter() {
    let model = tiny_folder("", mean_pooling(), false);
    let out = tempfile::tempdir().unwrap();
    let adapted = save_tiny_adapter(model.path(), out.path());
    let mut e = tiny_embedder(model.path());
    let base = e.encode(&TEXTS).unwrap();
    let wrapped = e.load_adapter(out.path(), "x").unwrap();
    assert_eq!(wrapped.len(), 13, "6 per layer x 2 layers + pooler.dense");
    let loaded = e.encode(&TEXTS).unwrap();
    assert!(max_abs_diff(&loaded, &adapted) <= 1e-6);
    assert!(
        max_abs_diff(&loaded, &base) > 1e-3,
        "the adapter must apply"
    );
    // PEFT's key layout, as PeftModel.save_pretrained writes it for a BertModel.
    let keys =
        candle_core::safetensors::load(out.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let a = &keys["base_model.model.encoder.layer.1.intermediate.dense.lora_A.weight"];
    assert_eq!(a.dims(), &[2, HIDDEN]);
    assert_eq!(keys.len(), 26);
}

#[test]
fn adapter_key_for_a_module_the_encoder_lacks_names_key_and_file() {
    let model = tiny_folder("", mean_pooling(), false);
    let out = tempfile::tempdir().unwrap();
    save_tiny_adapter(model.path(), out.path());
    let key = "base_model.model.encoder.layer.7.attention.self.query.lora_A.weight";
    edit_weights(out.path(), |t| {
        let a = t["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"].clone();
        t.insert(key.to_owned(), a);
    });
    let err = load_err(model.path(), out.path());
    assert!(
        err.contains("adapter_model.safetensors")
            && err.contains(key)
            && err.contains("no linear module `encoder.layer.7.attention.self.query`"),
        "{err}"
    );
}

#[test]
fn adapter_matrix_of_the_wrong_shape_names_key_file_and_shapes() {
    let model = tiny_folder("", mean_pooling(), false);
    let out = tempfile::tempdir().unwrap();
    save_tiny_adapter(model.path(), out.path());
    // An adapter made for a wider model: lora_A's input size is not the encoder's hidden size.
    let key = "base_model.model.encoder.layer.0.attention.self.value.lora_A.weight";
    edit_weights(out.path(), |t| {
        t.insert(
            key.to_owned(),
            Tensor::zeros((2, HIDDEN + 4), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_err(model.path(), out.path());
    assert!(
        err.contains("adapter_model.safetensors")
            && err.contains(key)
            && err.contains(&format!("expected shape [2, {HIDDEN}]"))
            && err.contains(&format!("found [2, {}]", HIDDEN + 4)),
        "{err}"
    );
}

#[test]
fn adapter_whose_targets_match_no_encoder_module_is_refused() {
    let model = tiny_folder("", mean_pooling(), false);
    let out = tempfile::tempdir().unwrap();
    save_tiny_adapter(model.path(), out.path());
    // A decoder's adapter config: nothing in a BERT is called q_proj.
    let cfg_path = out.path().join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["target_modules"] = serde_json::json!(["q_proj", "v_proj"]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = load_err(model.path(), out.path());
    assert!(
        err.contains("adapter_model.safetensors")
            && err.contains("base_model.model.encoder.layer.0.")
            && err.contains("q_proj"),
        "{err}"
    );
    // Without the weights file, the error names the file that is missing.
    std::fs::remove_file(out.path().join("adapter_model.safetensors")).unwrap();
    let err = load_err(model.path(), out.path());
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("missing"),
        "{err}"
    );
    // And a folder that is no PEFT adapter at all names the config it looked for.
    let empty = tempfile::tempdir().unwrap();
    let err = load_err(model.path(), empty.path());
    assert!(
        err.contains("adapter_config.json") && err.contains("missing"),
        "{err}"
    );
}
