//! placeholder
use anyhow::Result;
use clap::Parser;
#[derive(Parser, Debug, Clone)]
pub struct ScaleArgs {
    #[command(flatten)]
    pub common: super::Common,
}
pub fn run(_a: &ScaleArgs) -> Result<()> {
    Ok(())
}
