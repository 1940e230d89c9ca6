//! One module per `kiln` subcommand.

pub mod chat;
pub mod inspect;
pub mod perplexity;
pub mod run;
pub mod sampling;
pub mod tokenize;
