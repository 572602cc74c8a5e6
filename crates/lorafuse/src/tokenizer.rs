//! A text tokenizer with the special tokens and chat template that generation needs, from a
//! Hugging Face folder (`tokenizer.json`, `tokenizer_config.json`, `generation_config.json`) or from
//! GGUF metadata (see `loading::gguf`).

use crate::error::read_json;
use crate::{Error, Result};
use std::path::Path;

/// A tokenizer plus the special tokens and chat template that come with a model.
#[derive(Clone)]
pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Every id that ends generation (the EOS token plus `generation_config.json`'s list).
    pub eos_ids: Vec<u32>,
    /// The Jinja chat template, if the model ships one.
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

/// A special token in `tokenizer_config.json`: a plain string or an `AddedToken` object.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` (special tokens, chat
    /// template) and `generation_config.json` (extra EOS ids) from `dir`.
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::format(
                &tok_path,
                "missing (a model folder needs tokenizer.json)",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::format(&tok_path, e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            read_json(&cfg_path)?
        } else {
            serde_json::Value::Null
        };
        let bos_token = token_string(cfg.get("bos_token"));
        let eos_token = token_string(cfg.get("eos_token"));
        let mut chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        let mut tok = TextTokenizer {
            inner,
            bos_token,
            eos_token,
            eos_ids: vec![],
            chat_template,
        };
        if let Some(id) = tok
            .eos_token
            .as_deref()
            .and_then(|t| tok.inner.token_to_id(t))
        {
            tok.eos_ids.push(id);
        }
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let gen: serde_json::Value = read_json(&gen_path)?;
            tok.add_eos_ids_from_json(gen.get("eos_token_id"));
        }
        Ok(tok)
    }

    /// Adds EOS ids from a JSON number or list (config.json / generation_config.json).
    pub fn add_eos_ids_from_json(&mut self, v: Option<&serde_json::Value>) {
        let ids: Vec<u32> = match v {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|x| x as u32).into_iter().collect()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            _ => vec![],
        };
        for id in ids {
            if !self.eos_ids.contains(&id) {
                self.eos_ids.push(id);
            }
        }
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (a BOS
    /// token for Llama 2/3, nothing for SmolLM2), as transformers' `tokenizer(text)` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Turns a growing list of token ids into text pieces as soon as they decode to whole characters,
/// for streaming (a multi-byte character can span several byte-level tokens).
#[derive(Debug, Default)]
pub struct TokenStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl TokenStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the new text, if any is complete.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        if text.ends_with('\u{fffd}') || text.len() <= self.emitted {
            return Ok(None);
        }
        // Byte-level decoders can rewrite earlier text only at char boundaries we already passed.
        let piece = text.get(self.emitted..).map(str::to_owned);
        self.emitted = text.len();
        Ok(piece)
    }

    /// All text decoded so far.
    pub fn text(&self, tok: &TextTokenizer) -> Result<String> {
        tok.decode(&self.ids, true)
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
