//! `lorafuse merge`: fold adapters into the base weights and write a Hugging Face folder that
//! transformers loads (config.json, model.safetensors, tokenizer files).

use super::adapters::AdapterArgs;
use super::common::ModelArgs;
use anyhow::Context;
use clap::Args;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// Output folder (written atomically: nothing appears there unless the whole export succeeds).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &MergeArgs) -> anyhow::Result<()> {
    if args.adapters.adapters.is_empty() {
        anyhow::bail!("merge needs at least one --adapter DIR");
    }
    let mut loaded = args.model.load()?;
    args.adapters.apply(&mut loaded.model)?;
    lorafuse::lora::unload_lora(&mut loaded.model, true)?;
    let tensors: HashMap<_, _> = loaded.model.named_tensors().into_iter().collect();
    lorafuse::loading::save_hf_folder(
        &args.out,
        loaded.model.config(),
        &tensors,
        &loaded.tokenizer,
    )
    .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("merged model written to {}", args.out.display());
    Ok(())
}
