//! A model this node serves through its API.

use std::sync::Arc;

use std::sync::OnceLock;

use weft_kernels::{Grammar, Grammars, KernelError, Tokenizer};
use weft_worker::Runner;

/// A model this node serves: its id, tokenizer, and what runs its requests.
pub struct Served {
    /// The model's id (what requests name).
    pub model_id: String,
    /// Its tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// What runs its requests (its worker's supervisor).
    pub runner: Arc<dyn Runner>,
    /// The grammar compiler of its tokenizer, made at the first
    /// constrained request: requests are checked here before they run.
    pub grammars: OnceLock<Arc<Grammars>>,
}

impl Served {
    /// A model served by `runner`.
    pub fn new(
        model_id: impl Into<String>,
        tokenizer: Arc<Tokenizer>,
        runner: Arc<dyn Runner>,
    ) -> Self {
        Self {
            model_id: model_id.into(),
            tokenizer,
            runner,
            grammars: OnceLock::new(),
        }
    }

    /// Compiles `g` (or finds it in the cache) to check that it can run;
    /// blocking: call it off the async runtime.
    pub fn check_grammar(&self, g: &Grammar) -> Result<(), KernelError> {
        let grammars = match self.grammars.get() {
            Some(g) => g.clone(),
            None => {
                let made = Arc::new(Grammars::new(&self.tokenizer)?);
                self.grammars.get_or_init(|| made).clone()
            }
        };
        grammars.check(g)
    }
}
