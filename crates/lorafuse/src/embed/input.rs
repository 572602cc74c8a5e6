//! Documents to embed, read from a file: `.jsonl` (one `{"text": ...}` object per line) or plain
//! text (one document per line).

use crate::{Error, Result};
use std::path::Path;

/// Reads the documents of `path`. For `.jsonl`/`.json` files every non-blank line must be an
/// object with a string `text` (blank lines are skipped); any other file yields one document per
/// line, blank lines included, so that output row `i` always answers input line `i + 1`.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    let body = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let is_jsonl = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl") | Some("json") | Some("ndjson")
    );
    if !is_jsonl {
        return Ok(body.lines().map(str::to_owned).collect());
    }
    let mut out = Vec::new();
    for (i, line) in body.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| Error::Line {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        match v.get("text") {
            Some(serde_json::Value::String(s)) => out.push(s.clone()),
            Some(_) => return Err(bad("`text` is not a string".into())),
            None => return Err(bad("expected an object with a `text` field".into())),
        }
    }
    Ok(out)
}
