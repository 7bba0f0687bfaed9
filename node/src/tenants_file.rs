//! `tenants_file`: API keys and tenant limits the node takes up while it
//! runs. The file is read at start and whenever its content changes
//! (polled: a Kubernetes Secret volume changes by swapping a symlink, which
//! no inotify watch on the file sees); its keys and tenants go over the
//! config's own. A file that does not parse is refused with an error in
//! the log, and what was in force stays. A node with a tenants file always
//! requires an API key: until the file (or the config) gives one, every
//! request is refused, never served unauthenticated.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use weft_api::{AppState, Policy, TenantsFile};

/// How often the file is looked at.
pub const POLL: Duration = Duration::from_secs(2);

/// The policy of `base` with the file's keys and tenants over it.
pub fn merged(base: &weft_api::ApiConfig, file: &TenantsFile) -> Policy {
    let mut keys = weft_api::KeyMap::default();
    // the config's keys cannot be read back (only digests are kept), so
    // the file's keys are added to an ApiKeys built from both maps
    keys.0.extend(file.api_keys.0.clone());
    let mut p = base.policy();
    p.require_keys = true;
    p.api_keys = p.api_keys.with(&keys);
    for (t, l) in &file.tenants {
        p.tenants.insert(t.clone(), l.clone());
    }
    p
}

/// Reads the file: `None` when it is absent.
pub fn read(path: &Path) -> Result<Option<(TenantsFile, [u8; 32])>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
            TenantsFile::parse(&text)
                .map(|f| Some((f, digest)))
                .map_err(|e| format!("{}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Loads `path` into `app` now and again whenever it changes, until the
/// runtime ends.
pub fn watch(app: Arc<AppState>, path: PathBuf) {
    let base = app.cfg.clone();
    let keyed = {
        let mut p = base.policy();
        p.require_keys = true;
        p
    };
    app.set_policy(keyed.clone());
    let mut seen: Option<[u8; 32]> = None;
    let mut apply = move |app: &AppState| match read(&path) {
        Ok(Some((f, digest))) if seen != Some(digest) => {
            app.set_policy(merged(&base, &f));
            seen = Some(digest);
            tracing::info!(
                file = %path.display(),
                keys = f.api_keys.0.len(),
                tenants = f.tenants.len(),
                sha256 = %hex::encode(&digest[..8]),
                "tenants file applied"
            );
        }
        Ok(Some(_)) => {}
        Ok(None) => {
            if seen.take().is_some() {
                app.set_policy(keyed.clone());
                tracing::info!(file = %path.display(), "tenants file gone: the config's keys only");
            }
        }
        Err(e) => tracing::error!("tenants file refused, the keys in force stay: {e}"),
    };
    apply(&app);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL).await;
            apply(&app);
        }
    });
}
