//! What the node and a sandbox's init say to each other: the worker
//! protocol's frames (`u32` length, then JSON) on the sandbox's control
//! channel. Bytes (stdin, output, files) travel base64-encoded.
//!
//! A sandbox starts, confines itself as far as it can without knowing its
//! claim, and says [`FromInit::Ready`]; it waits there (a warm pool's
//! sandboxes wait here). [`ToInit::Claim`] gives it its scratch size and
//! environment: it seals itself and says [`FromInit::Claimed`]. Then
//! every request carries an id its answers repeat.

use serde::{Deserialize, Serialize};
use weft_worker::sandbox::Confinement;

/// Bytes as base64 in JSON.
pub mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes bytes as a base64 string.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    /// Reads a base64 string as bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

/// Per-command resource limits the init sets before it runs a command
/// (the cgroup holds the sandbox-wide ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecLimits {
    /// Open files.
    pub nofile: u64,
    /// CPU seconds (then SIGXCPU, then SIGKILL).
    pub cpu_s: u64,
}

/// Node → init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToInit {
    /// The sandbox is claimed: mount its scratch space of `disk_bytes`,
    /// seal, and keep `env` for every command.
    Claim {
        /// The scratch space's size.
        disk_bytes: u64,
        /// Environment every command gets (a command's own wins).
        env: Vec<(String, String)>,
    },
    /// Run a command.
    Exec {
        /// Its id.
        id: u64,
        /// Program and arguments (the program found on `PATH`).
        cmd: Vec<String>,
        /// Its working directory, under the scratch space.
        cwd: String,
        /// Environment on top of the sandbox's.
        env: Vec<(String, String)>,
        /// What it reads on standard input (then end of file).
        #[serde(with = "b64")]
        stdin: Vec<u8>,
        /// Wall-clock limit (ms), then its process group is killed.
        timeout_ms: u64,
        /// Its limits.
        limits: ExecLimits,
    },
    /// Kill a running command's process group.
    Kill {
        /// The command's id.
        id: u64,
    },
    /// Read a file of the scratch space.
    ReadFile {
        /// Request id.
        id: u64,
        /// Its path, relative to the scratch space.
        path: String,
        /// Most bytes to read.
        max_bytes: u64,
    },
    /// Write (create or replace) a file of the scratch space, making its
    /// directories.
    WriteFile {
        /// Request id.
        id: u64,
        /// Its path, relative to the scratch space.
        path: String,
        /// Its content.
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// Remove a file (or an empty directory) of the scratch space.
    DeleteFile {
        /// Request id.
        id: u64,
        /// Its path, relative to the scratch space.
        path: String,
    },
    /// List a directory of the scratch space.
    ListFiles {
        /// Request id.
        id: u64,
        /// Its path, relative to the scratch space (empty: its root).
        path: String,
    },
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Why a request failed, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailKind {
    /// No such file or directory.
    NotFound,
    /// A directory where a file was asked for.
    IsDir,
    /// A path that leaves the scratch space, or a bad argument.
    Invalid,
    /// Over the disk limit, or a file larger than asked for.
    TooLarge,
    /// The program could not be started.
    NotStarted,
    /// Anything else.
    Io,
}

/// Init → node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromInit {
    /// Started and confined as far as it goes before a claim; waiting.
    Ready,
    /// Claimed and sealed: what it holds.
    Claimed {
        /// Its confinement as it sees it.
        confinement: Confinement,
    },
    /// A command started.
    Started {
        /// The command's id.
        id: u64,
        /// Its pid inside the sandbox.
        pid: u32,
    },
    /// Output of a command.
    Output {
        /// The command's id.
        id: u64,
        /// Which stream.
        stream: Stream,
        /// The bytes.
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// A command ended.
    Exited {
        /// The command's id.
        id: u64,
        /// Its exit code, if it exited.
        code: Option<i32>,
        /// The signal that ended it, if one did.
        signal: Option<i32>,
        /// Whether it ran past its timeout (and was killed for it).
        timed_out: bool,
        /// From start to end (ms).
        duration_ms: u64,
    },
    /// A file's content.
    File {
        /// Request id.
        id: u64,
        /// The bytes.
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// A directory's entries.
    Listing {
        /// Request id.
        id: u64,
        /// Its entries, by name.
        entries: Vec<Entry>,
    },
    /// A file request done.
    Done {
        /// Request id.
        id: u64,
    },
    /// A request failed.
    Failed {
        /// Request id.
        id: u64,
        /// What kind of failure.
        kind: FailKind,
        /// Why.
        message: String,
    },
}

impl FromInit {
    /// The request this answers, if any.
    pub fn id(&self) -> Option<u64> {
        match self {
            FromInit::Ready | FromInit::Claimed { .. } => None,
            FromInit::Started { id, .. }
            | FromInit::Output { id, .. }
            | FromInit::Exited { id, .. }
            | FromInit::File { id, .. }
            | FromInit::Listing { id, .. }
            | FromInit::Done { id }
            | FromInit::Failed { id, .. } => Some(*id),
        }
    }
}

/// Checks a path a client gave for the scratch space: relative (a leading
/// `/work/` or `/` is taken off), no `..`, no NUL, not too long. The init
/// resolves it beneath the scratch space with the kernel's
/// `RESOLVE_BENEATH` too, so a symlink cannot lead out either.
pub fn scratch_path(path: &str) -> Result<String, String> {
    let p = path
        .strip_prefix("/work/")
        .or_else(|| path.strip_prefix("/work").filter(|r| r.is_empty()))
        .unwrap_or(path);
    let p = p.trim_start_matches('/');
    if p.len() > 4096 || p.contains('\0') {
        return Err("a path of at most 4096 bytes without NUL".into());
    }
    let mut parts = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(format!("{path:?} leaves the sandbox's scratch space")),
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_under_the_scratch_space_is_taken_relative() {
        assert_eq!(scratch_path("/work/a/b.txt").unwrap(), "a/b.txt");
        assert_eq!(scratch_path("a//./b").unwrap(), "a/b");
        assert_eq!(scratch_path("/work").unwrap(), "");
    }

    #[test]
    fn a_path_with_dot_dot_is_refused() {
        for p in ["../etc/passwd", "a/../../x", "/work/../root", ".."] {
            assert!(scratch_path(p).is_err(), "{p}");
        }
    }

    #[test]
    fn a_path_with_nul_is_refused() {
        assert!(scratch_path("a\0b").is_err());
    }

    #[test]
    fn bytes_travel_as_base64() {
        let m = ToInit::WriteFile {
            id: 1,
            path: "x".into(),
            data: vec![0, 255, 10],
        };
        let j = serde_json::to_string(&m).unwrap();
        assert!(j.contains("AP8K"), "{j}");
        assert_eq!(serde_json::from_str::<ToInit>(&j).unwrap(), m);
    }
}
