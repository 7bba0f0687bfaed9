//! A model this node serves through its API.

use std::sync::Arc;

use weft_kernels::Tokenizer;
use weft_worker::Runner;

/// A model this node serves: its id, tokenizer, and what runs its requests.
pub struct Served {
    /// The model's id (what requests name).
    pub model_id: String,
    /// Its tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// What runs its requests (its worker's supervisor).
    pub runner: Arc<dyn Runner>,
}
