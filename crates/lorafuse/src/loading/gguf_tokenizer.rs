//! A `tokenizers::Tokenizer` rebuilt from GGUF metadata (`tokenizer.ggml.*`), the way
//! transformers' GGUF loader rebuilds it, so that ids match the model's Hugging Face tokenizer.
//!
//! We assemble the tokenizer as `tokenizer.json` text and let the tokenizers crate parse it: that
//! is the format the HF tokenizers we compare against are written in, so every component
//! (pre-tokenizer, decoder, post-processor) is configured exactly as it is there.

use super::gguf::{value_kind, value_usize};
use crate::tokenizer::TextTokenizer;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// Pre-tokenizer split patterns by `tokenizer.ggml.pre`, for vocabularies whose merges were not
/// learned on GPT-2's split (the same table as transformers' `GGUF_PRE_TOKENIZER_SPLITS`). Others,
/// SmolLM2's `smollm` among them, use GPT-2's byte-level split.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_pattern(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            Some(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the rest are shifted
/// past 255, so every byte sequence is spelled in visible characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
    }
    table
}

struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl<'a> Meta<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.md.get(key)
    }

    fn wrong(&self, key: &str, want: &str, v: &Value) -> Error {
        Error::key(
            self.path,
            key,
            format!("expected {want}, found a {}", value_kind(v)),
        )
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => value_usize(v)
                .map(Some)
                .ok_or_else(|| self.wrong(key, "an integer", v)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "a bool", v)),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong(key, "an array", v)),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.wrong(&format!("{key}[{i}]"), "a string", other)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn numbers(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(x) => Ok(f64::from(*x)),
                Value::F64(x) => Ok(*x),
                Value::I8(x) => Ok(f64::from(*x)),
                Value::I16(x) => Ok(f64::from(*x)),
                Value::I32(x) => Ok(f64::from(*x)),
                Value::I64(x) => Ok(*x as f64),
                other => value_usize(other)
                    .map(|x| x as f64)
                    .ok_or_else(|| self.wrong(&format!("{key}[{i}]"), "a number", other)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// A token string by id, for the special-token keys.
    fn token_at(&self, tokens: &[&'a str], key: &str) -> Result<Option<(u32, &'a str)>> {
        match self.usize(key)? {
            None => Ok(None),
            Some(id) => tokens
                .get(id)
                .map(|t| Some((id as u32, *t)))
                .ok_or_else(|| {
                    Error::key(
                        self.path,
                        key,
                        format!("id {id} is past the vocabulary of {}", tokens.len()),
                    )
                }),
        }
    }
}

fn added_token(id: usize, content: &str, special: bool) -> Json {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": special})
}

/// `TemplateProcessing` that adds BOS and/or EOS, as transformers' `update_post_processor`.
fn post_processor(bos: Option<(u32, &str)>, eos: Option<(u32, &str)>) -> Json {
    let piece = |tok: &str, type_id: u32| json!({"SpecialToken": {"id": tok, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = vec![];
    let mut pair = vec![];
    let mut specials = serde_json::Map::new();
    if let Some((id, tok)) = bos {
        single.push(piece(tok, 0));
        specials.insert(tok.into(), json!({"id": tok, "ids": [id], "tokens": [tok]}));
    }
    single.push(seq("A", 0));
    if let Some((id, tok)) = eos {
        single.push(piece(tok, 0));
        specials.insert(tok.into(), json!({"id": tok, "ids": [id], "tokens": [tok]}));
    }
    pair.extend(single.iter().cloned());
    if let Some((_, tok)) = bos {
        pair.push(piece(tok, 1));
    }
    pair.push(seq("B", 1));
    if let Some((_, tok)) = eos {
        pair.push(piece(tok, 1));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// Merges recovered from a SentencePiece vocabulary's scores (transformers' `generate_merges`
/// with scores): every split of a token into two vocabulary pieces, best score first.
fn merges_from_scores(tokens: &[&str], scores: &[f64]) -> Vec<(String, String)> {
    let mut vocab: HashMap<&str, usize> = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t, i);
    }
    // Python dict order: first occurrence's position, last occurrence's score.
    let mut order: Vec<(&str, f64)> = vec![];
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (t, &s) in tokens.iter().zip(scores) {
        match seen.get(t) {
            Some(&at) => order[at].1 = s,
            None => {
                seen.insert(t, order.len());
                order.push((t, s));
            }
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = vec![];
    for (merge, score) in order {
        let mut local: Vec<(&str, &str, f64)> = merge
            .char_indices()
            .skip(1)
            .map(|(at, _)| merge.split_at(at))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f64)| (m.2, m.0.chars().count(), m.1.chars().count());
    // Stable and descending, as Python's `sorted(..., reverse=True)`.
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_owned(), r.to_owned()))
        .collect()
}

/// Builds the tokenizer, special tokens and chat template that a GGUF file's metadata describes.
/// Supports `tokenizer.ggml.model` `gpt2` (byte-level BPE) and `llama` (SentencePiece BPE).
pub fn tokenizer_from_gguf(md: &HashMap<String, Value>, path: &Path) -> Result<TextTokenizer> {
    let meta = Meta { md, path };
    let model = meta
        .string("tokenizer.ggml.model")?
        .ok_or_else(|| Error::key(path, "tokenizer.ggml.model", "missing"))?;
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::key(path, "tokenizer.ggml.tokens", "missing"))?;
    let types: Vec<i64> = match meta.numbers("tokenizer.ggml.token_type")? {
        Some(t) if t.len() != tokens.len() => {
            return Err(Error::key(
                path,
                "tokenizer.ggml.token_type",
                format!("{} entries for {} tokens", t.len(), tokens.len()),
            ))
        }
        Some(t) => t.into_iter().map(|x| x as i64).collect(),
        None => vec![1; tokens.len()],
    };
    let bos = meta.token_at(&tokens, "tokenizer.ggml.bos_token_id")?;
    let eos = meta.token_at(&tokens, "tokenizer.ggml.eos_token_id")?;
    let unk = meta.token_at(&tokens, "tokenizer.ggml.unknown_token_id")?;
    let byte_level = match model {
        "gpt2" => true,
        "llama" => false,
        other => {
            return Err(Error::key(
                path,
                "tokenizer.ggml.model",
                format!("unsupported tokenizer model `{other}` (supported: gpt2, llama)"),
            ))
        }
    };
    // transformers adds BOS for SentencePiece files that do not say otherwise, as llama.cpp does.
    let add_bos = meta
        .bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(!byte_level);
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);

    let alphabet = bytes_to_unicode();
    let spelled: HashSet<char> = alphabet.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| spelled.contains(&c));
    // Byte-level vocabularies are stored byte-spelled; re-spell any token that is not.
    let vocab_tokens: Vec<String> = tokens
        .iter()
        .map(|t| {
            if !byte_level || in_alphabet(t) {
                (*t).to_owned()
            } else {
                t.bytes().map(|b| alphabet[b as usize]).collect()
            }
        })
        .collect();
    let mut vocab = serde_json::Map::new();
    for (i, t) in vocab_tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    let merges: Vec<(String, String)> = match meta.strings("tokenizer.ggml.merges")? {
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .filter(|(_, r)| !r.contains(' '))
                    .map(|(l, r)| (l.to_owned(), r.to_owned()))
                    .ok_or_else(|| {
                        Error::key(
                            path,
                            format!("tokenizer.ggml.merges[{i}]"),
                            format!("`{m}` is not two tokens"),
                        )
                    })
            })
            .collect::<Result<_>>()?,
        None if byte_level => {
            return Err(Error::key(
                path,
                "tokenizer.ggml.merges",
                "missing (a gpt2 tokenizer needs merges)",
            ))
        }
        None => {
            let scores = meta
                .numbers("tokenizer.ggml.scores")?
                .filter(|s| s.len() == tokens.len())
                .ok_or_else(|| {
                    Error::key(
                        path,
                        "tokenizer.ggml.scores",
                        "missing or not one score per token (needed without merges)",
                    )
                })?;
            merges_from_scores(&tokens, &scores)
        }
    };

    // Control tokens stay whole and are special; user-defined ones stay whole but are text. A
    // byte-level "control" token spelled outside the byte alphabet is a llama.cpp mislabel.
    let mut added = vec![];
    for (i, (t, ty)) in vocab_tokens.iter().zip(&types).enumerate() {
        if *ty == TOKEN_CONTROL && (!byte_level || in_alphabet(tokens[i])) {
            added.push(added_token(i, t, true));
        } else if *ty == TOKEN_USER_DEFINED {
            added.push(added_token(i, t, false));
        }
    }

    let post = post_processor(bos.filter(|_| add_bos), eos.filter(|_| add_eos));
    let body = if byte_level {
        let byte_level_pre = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let pre = meta.string("tokenizer.ggml.pre")?.unwrap_or("default");
        let pre_tokenizer = match split_pattern(pre) {
            Some(pattern) => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                byte_level_pre(false)]}),
            None => byte_level_pre(true),
        };
        json!({
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges},
        })
    } else {
        json!({
            "normalizer": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false},
            "post_processor": post,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk.map(|(_, t)| t),
                      "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                      "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges},
        })
    };
    let mut doc =
        json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added});
    if let (Some(d), Some(b)) = (doc.as_object_mut(), body.as_object()) {
        d.extend(b.clone());
    }
    let text = doc.to_string();
    let inner: tokenizers::Tokenizer = text.parse().map_err(|e| {
        Error::format(
            path,
            format!("cannot build the tokenizer from tokenizer.ggml.*: {e}"),
        )
    })?;

    let mut eos_ids: Vec<u32> = eos.map(|(id, _)| id).into_iter().collect();
    // End-of-turn / end-of-message tokens (Llama 3's <|eot_id|>, <|eom_id|>) also end generation.
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some((id, _)) = meta.token_at(&tokens, key)? {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
    }
    Ok(TextTokenizer {
        inner,
        bos_token: bos.map(|(_, t)| t.to_owned()),
        eos_token: eos.map(|(_, t)| t.to_owned()),
        eos_ids,
        chat_template: meta.string("tokenizer.chat_template")?.map(str::to_owned),
    })
}
