//! placeholder
use anyhow::Result;
use clap::Parser;
#[derive(Parser, Debug, Clone)]
pub struct EdgeArgs {
    #[command(flatten)]
    pub common: super::Common,
}
pub fn run(_a: &EdgeArgs) -> Result<()> {
    Ok(())
}
