//! One JSONL line to one tokenised [`Example`], in mlx-lm's three formats.
//!
//! - `{"text": ...}`: loss on every token; BOS as the tokenizer's post-processor adds it, EOS
//!   appended when missing (as mlx-lm).
//! - `{"messages": [{"role", "content"}, ..]}`: the chat template renders the conversation; loss on
//!   the assistant turns only. Each assistant turn spans from the end of the conversation before it
//!   rendered with `add_generation_prompt` to the end of the conversation through it (so the turn's
//!   end-of-turn token is learnt, as TRL's assistant-only loss does). Spans are found in the text
//!   and mapped to tokens through the tokenizer's offsets, so one tokenisation serves all turns.
//! - `{"prompt", "completion"}`: loss on the completion only. With a chat template the pair becomes
//!   a user and an assistant turn (mlx-lm's choice); without one, `prompt` (with the tokenizer's
//!   special tokens) and `completion` are tokenised separately and concatenated, then EOS, so that
//!   the boundary between them is exact.

use super::{Example, IGNORE_INDEX};
use crate::generate::chat::{render_chat, ChatMessage};
use crate::tokenizer::TextTokenizer;
use serde_json::Value;

/// Which of the three formats a line uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    Text,
    Messages,
    PromptCompletion,
}

impl LineFormat {
    /// The format of a parsed line, from its keys.
    pub fn detect(v: &Value) -> std::result::Result<Self, String> {
        let Some(obj) = v.as_object() else {
            return Err("expected a JSON object".into());
        };
        if obj.contains_key("messages") {
            Ok(Self::Messages)
        } else if obj.contains_key("prompt") && obj.contains_key("completion") {
            Ok(Self::PromptCompletion)
        } else if obj.contains_key("text") {
            Ok(Self::Text)
        } else {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            Err(format!(
                "unknown format: expected {{\"text\"}}, {{\"messages\"}} or {{\"prompt\", \"completion\"}}, found keys {keys:?}"
            ))
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Messages => "messages",
            Self::PromptCompletion => "prompt/completion",
        }
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> std::result::Result<&'a str, String> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("`{key}` must be a string"))
}

fn eos_id(tok: &TextTokenizer) -> Option<u32> {
    tok.eos_token
        .as_deref()
        .and_then(|t| tok.token_id(t))
        .or_else(|| tok.eos_ids.first().copied())
}

/// Tokenises one line of the given format. Errors are messages for the caller to attach the file
/// and line number to.
pub fn encode_line(
    v: &Value,
    format: LineFormat,
    tok: &TextTokenizer,
) -> std::result::Result<Example, String> {
    match format {
        LineFormat::Text => {
            let mut ids = tok
                .encode(str_field(v, "text")?, true)
                .map_err(|e| e.to_string())?;
            if let Some(eos) = eos_id(tok) {
                if ids.last() != Some(&eos) {
                    ids.push(eos);
                }
            }
            let labels = ids.iter().map(|&i| i as i64).collect();
            Ok(Example {
                input_ids: ids,
                labels,
            })
        }
        LineFormat::Messages => {
            let messages: Vec<ChatMessage> = serde_json::from_value(v["messages"].clone())
                .map_err(|e| {
                    format!("`messages` must be a list of {{\"role\", \"content\"}} strings: {e}")
                })?;
            if messages.is_empty() {
                return Err("`messages` is empty".into());
            }
            if !messages.iter().any(|m| m.role == "assistant") {
                return Err("`messages` has no assistant turn to learn from".into());
            }
            encode_chat(&messages, tok)
        }
        LineFormat::PromptCompletion => {
            let prompt = str_field(v, "prompt")?;
            let completion = str_field(v, "completion")?;
            if tok.chat_template.is_some() {
                let messages = [
                    ChatMessage::new("user", prompt),
                    ChatMessage::new("assistant", completion),
                ];
                return encode_chat(&messages, tok);
            }
            let p = tok.encode(prompt, true).map_err(|e| e.to_string())?;
            let mut c = tok.encode(completion, false).map_err(|e| e.to_string())?;
            if let Some(eos) = eos_id(tok) {
                c.push(eos);
            }
            let mut labels = vec![IGNORE_INDEX; p.len()];
            labels.extend(c.iter().map(|&i| i as i64));
            let mut input_ids = p;
            input_ids.extend(c);
            Ok(Example { input_ids, labels })
        }
    }
}

/// Renders a conversation and labels the tokens of its assistant turns.
fn encode_chat(
    messages: &[ChatMessage],
    tok: &TextTokenizer,
) -> std::result::Result<Example, String> {
    let template = tok
        .chat_template
        .as_deref()
        .ok_or("the tokenizer has no chat template, so `messages` cannot be rendered")?;
    let render = |msgs: &[ChatMessage], gen: bool| {
        render_chat(
            template,
            msgs,
            gen,
            tok.bos_token.as_deref(),
            tok.eos_token.as_deref(),
        )
        .map_err(|e| e.to_string())
    };
    let full = render(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(&messages[..i], true)?;
        let through = render(&messages[..=i], false)?;
        if !full.starts_with(&before) || !full.starts_with(&through) || before.len() > through.len()
        {
            return Err(format!(
                "the chat template does not render this conversation incrementally (turn {} changes earlier text), so assistant turns cannot be located",
                i + 1
            ));
        }
        spans.push((before.len(), through.len()));
    }
    // The template already writes any BOS it wants (transformers encodes without special tokens).
    let enc = tok
        .inner
        .encode(full.as_str(), false)
        .map_err(|e| e.to_string())?;
    let input_ids = enc.get_ids().to_vec();
    let labels = input_ids
        .iter()
        .zip(enc.get_offsets())
        .map(|(&id, &(start, _))| {
            if spans.iter().any(|&(s, e)| start >= s && start < e) {
                id as i64
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Ok(Example { input_ids, labels })
}
