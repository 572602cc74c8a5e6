//! One module per subcommand; shared model options in `common`.

pub mod common;
pub mod generate;
pub mod perplexity;
