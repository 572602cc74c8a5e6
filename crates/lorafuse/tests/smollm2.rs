//! SmolLM2-135M-Instruct on CPU in f32, loaded from the GGUF file and from a safetensors folder
//! exported from it, against transformers (fixture computed by
//! scripts/fixtures/smollm2_reference.py): per-record NLL within 2e-3, identical tokenization,
//! chat prompts and greedy tokens.

use candle_core::{DType, Device};
use lorafuse::generate::chat::{render_chat, ChatMessage};
use lorafuse::generate::{generate, GenerateOptions, StopReason};
use lorafuse::models::Llama;
use lorafuse::tokenizer::TextTokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn gguf_path() -> Option<PathBuf> {
    let p = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
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

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn load(path: &Path) -> (Llama, TextTokenizer) {
    let files = lorafuse::loading::open_model(path, DType::F32, &Device::Cpu).unwrap();
    (
        Llama::load(files.vb, &files.config).unwrap(),
        files.tokenizer,
    )
}

fn check_against_transformers(model: &Llama, tok: &TextTokenizer, origin: &str) {
    let fx = fixture();
    let records = fx["ppl"]["records"].as_array().unwrap();
    let texts: Vec<String> = records
        .iter()
        .map(|r| r["text"].as_str().unwrap().to_string())
        .collect();
    for r in records {
        let want: Vec<u32> = r["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.encode(r["text"].as_str().unwrap(), true).unwrap(),
            want,
            "{origin}: tokenization"
        );
    }
    let report = lorafuse::perplexity::score_texts(model, tok, &texts).unwrap();
    for (got, want) in report.records.iter().zip(records) {
        let w = want["mean_nll"].as_f64().unwrap();
        let g = got.mean_nll.unwrap();
        assert_eq!(got.tokens as u64, want["tokens"].as_u64().unwrap());
        assert!(
            (g - w).abs() < 2e-3,
            "{origin}: mean NLL {g} vs transformers {w}"
        );
    }
    let w = fx["ppl"]["mean_nll"].as_f64().unwrap();
    assert!(
        (report.mean_nll.unwrap() - w).abs() < 2e-3,
        "{origin}: overall {:?} vs {w}",
        report.mean_nll
    );

    let template = tok
        .chat_template
        .as_deref()
        .expect("SmolLM2 ships a chat template");
    for case in fx["chat"]["cases"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let prompt = render_chat(
            template,
            &messages,
            true,
            tok.bos_token.as_deref(),
            tok.eos_token.as_deref(),
        )
        .unwrap();
        assert_eq!(
            prompt,
            case["prompt"].as_str().unwrap(),
            "{origin}: rendered chat prompt"
        );
        let ids = tok.encode(&prompt, false).unwrap();
        let want_prompt: Vec<u32> = case["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want_prompt, "{origin}: chat prompt ids");
        let opts = GenerateOptions {
            max_tokens: 48,
            ..Default::default()
        };
        let g = generate(model, tok, &ids, &opts, &mut |_| {}).unwrap();
        let mut want: Vec<u32> = case["new_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        if case["stopped_on_eos"].as_bool().unwrap() {
            want.pop();
            assert_eq!(g.stop_reason, StopReason::Eos, "{origin}");
        } else {
            assert_eq!(g.stop_reason, StopReason::MaxTokens, "{origin}");
        }
        assert_eq!(
            g.tokens, want,
            "{origin}: greedy tokens of case {}",
            case["name"]
        );
        assert_eq!(
            g.text,
            case["text"].as_str().unwrap(),
            "{origin}: text of case {}",
            case["name"]
        );
    }
}

#[test]
fn gguf_and_exported_folder_match_transformers() {
    let Some(gguf) = gguf_path() else { return };
    let (model, tok) = load(&gguf);
    check_against_transformers(&model, &tok, "gguf");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-st");
    let (cfg, tensors, tok2) =
        lorafuse::loading::gguf::read_gguf_tensors(&gguf, DType::F32, &Device::Cpu).unwrap();
    lorafuse::loading::export::save_hf_folder(&out, &cfg, &tensors, &tok2).unwrap();
    drop(model);
    let (model, tok) = load(&out);
    check_against_transformers(&model, &tok, "safetensors folder");
}
