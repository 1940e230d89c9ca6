//! `kiln tokenize MODEL TEXT`: token ids and pieces.

use crate::model::Model;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    pub model: PathBuf,
    pub text: String,
    /// Do not add BOS/EOS even where the model's metadata asks for them.
    #[arg(long)]
    pub no_special: bool,
    /// Print `{"ids": [...], "pieces": [...]}`.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &TokenizeArgs) -> Result<()> {
    let model = Model::open(&args.model)?;
    let ids = model.tokenizer.encode(&args.text, !args.no_special);
    let pieces = ids
        .iter()
        .map(|&id| model.tokenizer.piece(id))
        .collect::<Result<Vec<_>, _>>()?;
    if args.json {
        println!("{}", serde_json::json!({ "ids": ids, "pieces": pieces }));
    } else {
        for (id, piece) in ids.iter().zip(&pieces) {
            println!("{id:>8} {piece:?}");
        }
    }
    Ok(())
}
