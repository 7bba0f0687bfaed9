//! The crate's error type.

/// What went wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// raft-rs refused an input or its storage failed.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The durable log or snapshot could not be read or written.
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
    /// A log entry, snapshot or command did not decode.
    #[error("decoding {what}: {why}")]
    Codec {
        /// What was being decoded.
        what: &'static str,
        /// Why it failed.
        why: String,
    },
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Refused(String),
    /// Only the leader takes proposals.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader this member knows of, if any.
        leader: Option<u64>,
    },
}

/// The crate's result.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
