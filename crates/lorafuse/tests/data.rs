//! JSONL datasets: each format and its loss mask (exact label arrays on a tiny word-level
//! tokenizer), truncation, padding, packing, the resumable shuffled iterator, and bad input.

use lorafuse::data::{
    self, batch::batches_in_order, BatchConfig, BatchIter, DataOptions, DataPosition, Example,
    IGNORE_INDEX,
};
use lorafuse::tokenizer::TextTokenizer;
use lorafuse::Error;
use std::path::{Path, PathBuf};

const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

const WORDS: &[&str] = &[
    "[UNK]",
    "<|im_start|>",
    "<|im_end|>",
    "system",
    "user",
    "assistant",
    "hi",
    "hello",
    "there",
    "how",
    "are",
    "you",
    "fine",
    "thanks",
    "the",
    "answer",
    "is",
    "42",
    "be",
    "brief",
    "ok",
    "bye",
];

fn id(w: &str) -> i64 {
    WORDS.iter().position(|x| *x == w).unwrap() as i64
}

/// Word-level tokenizer over [`WORDS`]: one id per word, ChatML special tokens, no BOS.
fn tiny_tokenizer(template: Option<&str>) -> TextTokenizer {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    let vocab = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut inner = tokenizers::Tokenizer::new(model);
    inner.with_pre_tokenizer(Some(Whitespace {}));
    inner.add_special_tokens(&[
        tokenizers::AddedToken::from("<|im_start|>", true),
        tokenizers::AddedToken::from("<|im_end|>", true),
    ]);
    TextTokenizer {
        inner,
        bos_token: None,
        eos_token: Some("<|im_end|>".into()),
        eos_ids: vec![2],
        chat_template: template.map(str::to_owned),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load_one(line: &str, tok: &TextTokenizer, max_seq_len: usize) -> data::Dataset {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "d.jsonl", line);
    data::load_jsonl(&p, tok, &DataOptions { max_seq_len }).unwrap()
}

fn ids_of(words: &[&str]) -> Vec<u32> {
    words.iter().map(|w| id(w) as u32).collect()
}

const M: i64 = IGNORE_INDEX;

#[test]
fn text_format_takes_loss_on_every_token_and_appends_eos() {
    let ds = load_one(r#"{"text": "the answer is 42"}"#, &tiny_tokenizer(None), 64);
    assert_eq!(ds.format, data::LineFormat::Text);
    let e = &ds.examples[0];
    assert_eq!(
        e.input_ids,
        ids_of(&["the", "answer", "is", "42", "<|im_end|>"])
    );
    assert_eq!(
        e.labels,
        [
            id("the"),
            id("answer"),
            id("is"),
            id("42"),
            id("<|im_end|>")
        ]
    );
}

#[test]
fn messages_format_takes_loss_on_assistant_turns_only() {
    let line = r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine thanks"}]}"#;
    let e = &load_one(line, &tiny_tokenizer(Some(CHATML)), 64).examples[0];
    let s = "<|im_start|>";
    let z = "<|im_end|>";
    assert_eq!(
        e.input_ids,
        ids_of(&[
            s,
            "system",
            "be",
            "brief",
            z,
            s,
            "user",
            "hi",
            "there",
            z,
            s,
            "assistant",
            "hello",
            z,
            s,
            "user",
            "how",
            "are",
            "you",
            z,
            s,
            "assistant",
            "fine",
            "thanks",
            z
        ])
    );
    let mut want = vec![M; 12];
    want.extend([id("hello"), id(z)]);
    want.extend([M; 8]);
    want.extend([id("fine"), id("thanks"), id(z)]);
    assert_eq!(e.labels, want);
}

#[test]
fn prompt_completion_uses_the_chat_template_when_there_is_one() {
    let line = r#"{"prompt": "how are you", "completion": "fine thanks"}"#;
    let e = &load_one(line, &tiny_tokenizer(Some(CHATML)), 64).examples[0];
    let (s, z) = ("<|im_start|>", "<|im_end|>");
    assert_eq!(
        e.input_ids,
        ids_of(&[
            s,
            "user",
            "how",
            "are",
            "you",
            z,
            s,
            "assistant",
            "fine",
            "thanks",
            z
        ])
    );
    assert_eq!(
        e.labels,
        [M, M, M, M, M, M, M, M, id("fine"), id("thanks"), id(z)]
    );
}

#[test]
fn prompt_completion_without_template_concatenates_and_masks_the_prompt() {
    let line = r#"{"prompt": "how are you", "completion": "fine thanks"}"#;
    let e = &load_one(line, &tiny_tokenizer(None), 64).examples[0];
    assert_eq!(
        e.input_ids,
        ids_of(&["how", "are", "you", "fine", "thanks", "<|im_end|>"])
    );
    assert_eq!(
        e.labels,
        [M, M, M, id("fine"), id("thanks"), id("<|im_end|>")]
    );
}

#[test]
fn long_examples_are_truncated_and_fully_masked_ones_skipped() {
    let tok = tiny_tokenizer(Some(CHATML));
    let text = "{\"text\": \"the answer is 42 ok bye\"}\n{\"text\": \"hi\"}\n";
    let ds = load_one(text, &tok, 4);
    assert_eq!((ds.truncated, ds.skipped), (1, 0));
    assert_eq!(
        ds.examples[0].input_ids,
        ids_of(&["the", "answer", "is", "42"])
    );
    assert_eq!(ds.examples[0].labels.len(), 4);
    // The first conversation's assistant reply starts at token 8: cut at 7 nothing takes loss, so
    // the example is dropped; the second's starts at token 6 and keeps one labelled token.
    let chat = r#"{"messages": [{"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]}
{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
    let ds = load_one(chat, &tok, 7);
    assert_eq!((ds.examples.len(), ds.skipped, ds.truncated), (1, 1, 2));
    assert_eq!(ds.examples[0].labels, [M, M, M, M, M, M, id("hello")]);
}

fn ex(n: usize, tag: u32) -> Example {
    Example {
        input_ids: (0..n as u32).map(|i| tag * 100 + i).collect(),
        labels: (0..n as i64).map(|i| tag as i64 * 100 + i).collect(),
    }
}

#[test]
fn padding_right_pads_ids_with_pad_id_and_labels_with_ignore() {
    let b = data::pad_batch(&[&ex(3, 1), &ex(5, 2)], 9);
    assert_eq!((b.batch, b.seq_len, b.tokens), (2, 5, 8));
    assert_eq!(b.input_ids, [100, 101, 102, 9, 9, 200, 201, 202, 203, 204]);
    assert_eq!(b.labels, [100, 101, 102, M, M, 200, 201, 202, 203, 204]);
    assert_eq!(b.target_tokens(), 2 + 4);
    let (ids, labels) = b.to_tensors(&candle_core::Device::Cpu).unwrap();
    assert_eq!(
        (ids.dims(), ids.dtype(), labels.dtype()),
        (
            &[2, 5][..],
            candle_core::DType::U32,
            candle_core::DType::I64
        )
    );
}

#[test]
fn packing_fills_rows_with_whole_examples_and_masks_their_boundaries() {
    // Three-token examples under max_seq_len 7: two per row, four rows per epoch.
    let examples: Vec<Example> = (1..=8).map(|t| ex(3, t)).collect();
    let cfg = BatchConfig {
        batch_size: 2,
        max_seq_len: 7,
        packing: true,
        pad_id: 0,
        seed: 3,
    };
    let mut it = BatchIter::new(examples, cfg).unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let b = it.next_batch();
        assert_eq!((b.batch, b.seq_len, b.tokens), (2, 6, 12));
        for (ids, labels) in b.input_ids.chunks(6).zip(b.labels.chunks(6)) {
            // Whole examples, labels carried along, except the second example's first token,
            // which would be predicted from the first example.
            for half in ids.chunks(3) {
                assert_eq!([half[1], half[2]], [half[0] + 1, half[0] + 2]);
                seen.push(half[0] / 100);
            }
            let want: Vec<i64> = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i == 3 { M } else { t as i64 })
                .collect();
            assert_eq!(labels, want);
        }
    }
    assert_eq!(it.position(), DataPosition { epoch: 0, index: 8 });
    seen.sort();
    assert_eq!(seen, [1, 2, 3, 4, 5, 6, 7, 8]);
    // A ninth example would leave a last batch of one row; here the next batch opens epoch 1.
    it.next_batch();
    assert_eq!(it.position(), DataPosition { epoch: 1, index: 4 });
}

#[test]
fn packing_keeps_rows_within_max_seq_len() {
    let examples: Vec<Example> = [3, 4, 2, 5, 1, 6]
        .iter()
        .enumerate()
        .map(|(i, &n)| ex(n, i as u32 + 1))
        .collect();
    let cfg = BatchConfig {
        batch_size: 2,
        max_seq_len: 7,
        packing: true,
        pad_id: 0,
        seed: 1,
    };
    let mut it = BatchIter::new(examples, cfg).unwrap();
    let mut total = 0;
    while it.position().epoch == 0 && total < 21 {
        let b = it.next_batch();
        assert!(b.seq_len <= 7);
        total += b.tokens;
        if it.position().index == 6 {
            break;
        }
    }
    assert_eq!(total, 21);
}

#[test]
fn shuffled_iterator_resumes_exactly_from_a_saved_position() {
    let examples: Vec<Example> = (1..=5).map(|t| ex(t as usize, t)).collect();
    let cfg = BatchConfig {
        batch_size: 2,
        max_seq_len: 8,
        packing: false,
        pad_id: 0,
        seed: 42,
    };
    let mut a = BatchIter::new(examples.clone(), cfg).unwrap();
    let first: Vec<_> = (0..3).map(|_| a.next_batch()).collect();
    let pos = a.position();
    assert_eq!(pos, DataPosition { epoch: 0, index: 5 }); // 2 + 2 + 1: nothing dropped
    let rest: Vec<_> = (0..6).map(|_| a.next_batch()).collect();
    let mut b = BatchIter::resume(examples.clone(), cfg, pos).unwrap();
    let resumed: Vec<_> = (0..6).map(|_| b.next_batch()).collect();
    assert_eq!(rest, resumed);
    // Each epoch sees every example once, in a different order.
    let order = |bs: &[data::Batch]| {
        bs.iter()
            .flat_map(|b| b.input_ids.chunks(b.seq_len).map(|r| r[0] / 100))
            .collect::<Vec<_>>()
    };
    let (e0, e1) = (order(&first), order(&rest[..3]));
    let mut s0 = e0.clone();
    s0.sort();
    assert_eq!(s0, [1, 2, 3, 4, 5]);
    assert_ne!(e0, e1);
    // Same seed, same order; another seed, another order.
    let again: Vec<_> = BatchIter::new(examples.clone(), cfg)
        .unwrap()
        .take(3)
        .collect();
    assert_eq!(again, first);
    let other: Vec<_> = BatchIter::new(examples.clone(), BatchConfig { seed: 7, ..cfg })
        .unwrap()
        .take(3)
        .collect();
    assert_ne!(order(&other), e0);
    assert!(BatchIter::resume(examples, cfg, DataPosition { epoch: 0, index: 6 }).is_err());
}

#[test]
fn validation_batches_keep_file_order() {
    let examples: Vec<Example> = (1..=5).map(|t| ex(2, t)).collect();
    let bs = batches_in_order(&examples, 2, 0);
    assert_eq!(bs.len(), 3);
    assert_eq!(bs[2].batch, 1);
    assert_eq!(bs[0].input_ids, [100, 101, 200, 201]);
}

fn line_error(text: &str) -> (usize, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "train.jsonl", text);
    match data::load_jsonl(&p, &tiny_tokenizer(Some(CHATML)), &DataOptions::default()) {
        Err(Error::Line { path, line, msg }) => {
            assert_eq!(path, p);
            (line, msg)
        }
        other => panic!("expected a line error, got {other:?}"),
    }
}

#[test]
fn malformed_line_error_names_file_and_line_number() {
    let (line, msg) = line_error("{\"text\": \"hi\"}\n\n{\"text\": \"hi\"\n");
    assert_eq!(line, 3);
    assert!(msg.contains("invalid JSON"), "{msg}");
    let (line, msg) = line_error("{\"text\": \"hi\"}\n{\"question\": \"hi\"}\n");
    assert_eq!(line, 2);
    assert!(
        msg.contains("unknown format") && msg.contains("question"),
        "{msg}"
    );
    let (line, msg) =
        line_error("{\"text\": \"hi\"}\n{\"prompt\": \"hi\", \"completion\": \"ok\"}\n");
    assert_eq!(line, 2);
    assert!(msg.contains("differs from line 1"), "{msg}");
    let (line, msg) = line_error("{\"text\": 5}\n");
    assert_eq!(line, 1);
    assert!(msg.contains("`text` must be a string"), "{msg}");
    let (line, msg) = line_error("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n");
    assert!(line == 1 && msg.contains("no assistant turn"), "{msg}");
    let (line, msg) = line_error("\n  \n");
    assert!(line == 1 && msg.contains("no examples"), "{msg}");
    let (line, msg) = line_error("[1, 2]\n");
    assert!(line == 1 && msg.contains("JSON object"), "{msg}");
}

#[test]
fn messages_without_chat_template_is_a_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "t.jsonl",
        "{\"messages\": [{\"role\": \"assistant\", \"content\": \"hi\"}]}\n",
    );
    let e = data::load_jsonl(&p, &tiny_tokenizer(None), &DataOptions::default()).unwrap_err();
    assert!(
        matches!(&e, Error::Line { line: 1, msg, .. } if msg.contains("no chat template")),
        "{e}"
    );
}

#[test]
fn data_folder_needs_train_and_reads_optional_valid() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer(Some(CHATML));
    let e = data::load_dir(dir.path(), &tok, &DataOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("train.jsonl"), "{e}");
    write(dir.path(), "train.jsonl", "{\"text\": \"hi there\"}\n");
    write(dir.path(), "test.jsonl", "not json at all\n"); // ignored
    let s = data::load_dir(dir.path(), &tok, &DataOptions::default()).unwrap();
    assert!(s.valid.is_none());
    write(
        dir.path(),
        "valid.jsonl",
        "{\"text\": \"ok\"}\n{\"text\": \"bye\"}\n",
    );
    let s = data::load_dir(dir.path(), &tok, &DataOptions::default()).unwrap();
    assert_eq!(
        (s.train.examples.len(), s.valid.unwrap().examples.len()),
        (1, 2)
    );
    assert_eq!(data::pad_id(&tok), 2);
}

/// SmolLM2's real tokenizer and ChatML template (from the GGUF in models/, when fetched): the
/// assistant tokens decode to exactly the assistant's text and end-of-turn.
#[test]
fn smollm2_chat_mask_covers_exactly_the_assistant_reply() {
    let gguf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        eprintln!(
            "skipping: {} not present (scripts/fetch-models.sh)",
            gguf.display()
        );
        return;
    }
    let tok = lorafuse::loading::gguf::GgufFile::open(&gguf)
        .unwrap()
        .tokenizer()
        .unwrap();
    let line = r#"{"messages": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome, of course."}]}"#;
    let e = &load_one(line, &tok, 512).examples[0];
    let labelled: Vec<u32> = e
        .labels
        .iter()
        .filter(|&&l| l != M)
        .map(|&l| l as u32)
        .collect();
    let text = tok.decode(&labelled, false).unwrap();
    assert_eq!(text, "Paris.<|im_end|>\nRome, of course.<|im_end|>\n");
    // The full sequence is the rendered template, tokenised once.
    let all = tok.decode(&e.input_ids, false).unwrap();
    assert!(
        all.starts_with("<|im_start|>system\n") && all.ends_with("Rome, of course.<|im_end|>\n"),
        "{all}"
    );
}
