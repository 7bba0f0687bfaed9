//! Signed checkpoints: a node's statement, under its cluster key, that its
//! log's line `seq` hashes to `head`.
//!
//! A checkpoint is written into the log itself (a line whose record is
//! `{"event":"checkpoint","checkpoint":{…}}`, right after the line it
//! covers) at an interval, when a file is closed, at shutdown and after
//! pruning; the node also commits it to the coordinators' replicated
//! state. Anyone can recompute a hash chain; only the key's holder can sign
//! a new head, so a rewritten line no longer matches the checkpoint after
//! it, and lines cut off the end fall short of the checkpoint the
//! coordinators hold.

use serde::{Deserialize, Serialize};

/// What the message a checkpoint signs starts with (a signature over one
/// of these can never pass for anything else the key signs).
const DOMAIN: &str = "weft-intent-checkpoint/1";

/// Why a checkpoint was written.
pub mod reason {
    /// The periodic one.
    pub const INTERVAL: &str = "interval";
    /// A file was closed and the next begun.
    pub const ROTATION: &str = "rotation";
    /// The node stopped.
    pub const SHUTDOWN: &str = "shutdown";
    /// Files were pruned: it vouches for the line before the first one
    /// kept (its hash is that line's `prev`), the log's signed boundary.
    pub const PRUNED: &str = "pruned";
}

/// A signed statement that line `seq` of `node`'s log hashes to `head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The node whose log it is (the signing certificate's name).
    pub node: String,
    /// The last line it covers.
    pub seq: u64,
    /// The sha256 (hex) of that line's bytes: the chain's head there.
    pub head: String,
    /// When it was signed (ms since the Unix epoch).
    pub at_unix_ms: u64,
    /// Why it was written (see [`reason`]).
    pub reason: String,
    /// The signing certificate (hex DER).
    pub cert: String,
    /// The signature (hex; ECDSA P-256 SHA-256, ASN.1) of
    /// [`Checkpoint::message`].
    pub sig: String,
}

/// What signs checkpoints: a node's cluster identity.
pub trait Signer: Send + Sync {
    /// The node's name.
    fn node(&self) -> &str;
    /// Its certificate (DER).
    fn cert_der(&self) -> &[u8];
    /// Signs `msg` (ECDSA P-256 SHA-256, ASN.1).
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String>;
}

/// Who may sign: checks a certificate against the cluster (its CA, its
/// revocations) and says whose it is.
pub trait Trust {
    /// The node the certificate names, or why it is not to be trusted
    /// (foreign, revoked, or not valid at `at_unix_ms`, when it signed).
    fn check(&self, cert_der: &[u8], at_unix_ms: u64) -> Result<String, String>;
}

impl Checkpoint {
    /// The bytes a checkpoint's signature covers.
    pub fn message(node: &str, seq: u64, head: &str, at_unix_ms: u64, reason: &str) -> Vec<u8> {
        format!("{DOMAIN}\n{node}\n{seq}\n{head}\n{at_unix_ms}\n{reason}").into_bytes()
    }

    /// Signs that line `seq` hashes to `head`.
    pub fn sign(
        signer: &dyn Signer,
        seq: u64,
        head: &str,
        at_unix_ms: u64,
        reason: &str,
    ) -> Result<Self, String> {
        let node = signer.node().to_string();
        let sig = signer.sign(&Self::message(&node, seq, head, at_unix_ms, reason))?;
        Ok(Self {
            node,
            seq,
            head: head.to_string(),
            at_unix_ms,
            reason: reason.to_string(),
            cert: hex::encode(signer.cert_der()),
            sig: hex::encode(sig),
        })
    }

    /// The signing certificate (DER).
    pub fn cert_der(&self) -> Result<Vec<u8>, String> {
        hex::decode(&self.cert).map_err(|e| format!("its certificate is not hex: {e}"))
    }

    /// Checks the signature against the certificate it carries, and, with
    /// `trust`, that the certificate is the cluster's, not revoked, and
    /// names the node the checkpoint says. The reason if not.
    pub fn check(&self, trust: Option<&dyn Trust>) -> Result<(), String> {
        let cert = self.cert_der()?;
        let sig = hex::decode(&self.sig).map_err(|e| format!("its signature is not hex: {e}"))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| format!("its certificate does not parse: {e}"))?;
        let key = parsed.public_key().subject_public_key.data.to_vec();
        let msg = Self::message(
            &self.node,
            self.seq,
            &self.head,
            self.at_unix_ms,
            &self.reason,
        );
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
            .verify(&msg, &sig)
            .map_err(|_| "its signature does not match its certificate".to_string())?;
        if let Some(t) = trust {
            let name = t
                .check(&cert, self.at_unix_ms)
                .map_err(|why| format!("its key is not trusted: {why}"))?;
            if name != self.node {
                return Err(format!(
                    "it says it is {:?}'s but its certificate is {name:?}'s",
                    self.node
                ));
            }
        }
        Ok(())
    }

    /// The record of a checkpoint line.
    pub fn record(&self) -> serde_json::Value {
        serde_json::json!({"event": "checkpoint", "checkpoint": self})
    }

    /// The checkpoint a line's record holds, if it is a checkpoint line.
    pub fn from_record(record: &serde_json::Value) -> Option<Result<Self, String>> {
        if record.get("event").and_then(|e| e.as_str()) != Some("checkpoint") {
            return None;
        }
        Some(
            serde_json::from_value(record.get("checkpoint").cloned().unwrap_or_default())
                .map_err(|e| format!("a checkpoint line that does not parse: {e}")),
        )
    }
}
