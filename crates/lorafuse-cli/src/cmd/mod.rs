//! One module per subcommand; shared model options in `common`.

pub mod adapters;
pub mod bench;
pub mod common;
pub mod embed;
pub mod generate;
pub mod merge;
pub mod perplexity;
pub mod train;
