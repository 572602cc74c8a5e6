//! `lorafuse perplexity`: per-record and overall mean NLL of a JSONL file.

use super::adapters::AdapterArgs;
use super::common::ModelArgs;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// JSONL file of {"text": ...} records.
    #[arg(long)]
    pub data: PathBuf,
    /// Print {"records":[{"tokens","mean_nll","ppl"}],"mean_nll","ppl"} instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &PerplexityArgs) -> anyhow::Result<()> {
    let texts = lorafuse::perplexity::read_text_records(&args.data)?;
    let mut loaded = args.model.load()?;
    args.adapters.apply(&mut loaded.model)?;
    let report = lorafuse::perplexity::score_texts(&loaded.model, &loaded.tokenizer, &texts)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "{:>6} {:>8} {:>10} {:>10}",
        "record", "tokens", "mean_nll", "ppl"
    );
    let fmt = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    for (i, r) in report.records.iter().enumerate() {
        println!(
            "{:>6} {:>8} {:>10} {:>10}",
            i + 1,
            r.tokens,
            fmt(r.mean_nll),
            fmt(r.ppl)
        );
    }
    println!(
        "overall mean_nll {} ppl {}",
        fmt(report.mean_nll),
        fmt(report.ppl)
    );
    Ok(())
}
