//! Cluster credentials: a cluster CA, join tokens, node certificates, and
//! the TLS configurations that admit only holders of a certificate from the
//! CA that is not revoked.
//!
//! - `weft cluster init` makes the CA ([`ClusterCa::init`]); its key stays
//!   with the coordinators.
//! - `weft cluster join-token` makes a token ([`ClusterCa::issue_token`]):
//!   the name and [`Role`] its holder gets, an expiry and a nonce,
//!   authenticated with a key derived from the CA key, plus the CA's
//!   fingerprint so the joiner can pin the CA before it has it.
//! - A joining node sends the token and a certificate request; a coordinator
//!   checks the token and signs ([`ClusterCa::sign_request`]) for the
//!   token's name and role, never the joiner's; the token is then consumed
//!   in the replicated state, so it works once.
//! - Every certificate carries its holder's role (the subject's OU), which
//!   the coordinators authorize commands by (`crate::authz`).
//! - Every connection is mutual TLS 1.3 under the CA; a certificate whose
//!   fingerprint is in the replicated revocation list is refused.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as TlsName, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// ALPN of weft's cluster protocol.
pub const ALPN: &[u8] = b"weft/1";
/// Validity of a node certificate (days).
pub const NODE_CERT_DAYS: i64 = 365;
/// Validity of a join token unless told otherwise (seconds): long enough
/// to install a gateway, short enough that a leaked one soon dies.
pub const DEFAULT_TOKEN_TTL_S: u64 = 3600;
/// Most bytes of a node name.
pub const MAX_NODE_NAME: usize = 63;

/// Why a credential was refused.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// Files could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `init` found a CA already there.
    #[error("{0} already holds a cluster CA; refusing to overwrite it")]
    Exists(PathBuf),
    /// Certificate or key material did not parse or sign.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The token is malformed, forged, or for another cluster.
    #[error("invalid join token: {0}")]
    BadToken(&'static str),
    /// The token has expired.
    #[error("the join token expired {0} s ago")]
    Expired(u64),
    /// A node name outside `[a-z0-9-]{1,63}`.
    #[error("invalid node name {0:?}: use 1-63 lowercase letters, digits and dashes")]
    BadName(String),
    /// A token may not give this role.
    #[error("a join token cannot make an {0} identity: issue it with the CA (weft cluster issue)")]
    RoleNotJoinable(Role),
}

/// What a certificate's holder is to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A serving node (gateway, cloud worker): may report itself, nothing else.
    Node,
    /// A coordinator: holds the CA and runs raft.
    Coordinator,
    /// The operator's identity: may command the control plane, runs no raft.
    Admin,
}

impl Role {
    /// Its name, as the certificate's OU carries it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Coordinator => "coordinator",
            Role::Admin => "admin",
        }
    }

    /// Whether it may change the control state beyond its own record.
    pub fn commands(self) -> bool {
        matches!(self, Role::Coordinator | Role::Admin)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "node" => Ok(Role::Node),
            "coordinator" => Ok(Role::Coordinator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("unknown role {s:?}: node, coordinator or admin")),
        }
    }
}

/// Who a peer is, read from its (verified) certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The node name (the certificate's CN).
    pub name: String,
    /// Its role (the certificate's OU; a certificate without one is a node).
    pub role: Role,
    /// The certificate's fingerprint.
    pub fingerprint: String,
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

/// The identity a certificate (DER) names. Only for certificates the TLS
/// layer has verified under the cluster CA.
pub fn cert_identity(der: &[u8]) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let role = match cert.subject().iter_organizational_unit().next() {
        // a certificate from before roles, or one without an OU, is the
        // least a peer can be
        None => Role::Node,
        Some(ou) => ou.as_str().ok()?.parse().ok()?,
    };
    Some(PeerIdentity {
        name: name.to_string(),
        role,
        fingerprint: fingerprint(der),
    })
}

type Result<T, E = CredentialError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CredentialError + '_ {
    move |source| CredentialError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn cert_err(e: impl std::fmt::Display) -> CredentialError {
    CredentialError::Certificate(e.to_string())
}

/// SHA-256 of a DER certificate, lowercase hex: how certificates are named
/// in the revocation list.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>> {
    let (_, body) = pem
        .split_once("-----BEGIN CERTIFICATE-----")
        .ok_or_else(|| cert_err("no certificate in PEM"))?;
    let (b64, _) = body
        .split_once("-----END CERTIFICATE-----")
        .ok_or_else(|| cert_err("unterminated certificate PEM"))?;
    let b64: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
    base64_decode(&b64).ok_or_else(|| cert_err("bad base64 in certificate PEM"))
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let bytes = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        for i in 0..n {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// Checks a node name: 1-63 of `[a-z0-9-]`, not starting with a dash.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NODE_NAME
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CredentialError::BadName(name.to_string()))
    }
}

/// The node name for a host name that may not be one (a Kubernetes node
/// such as `ip-10-0-0-7.eu-west-1.compute.internal`): lowercased, other
/// characters turned to `-`; a name that had to change ends in a hash of
/// the original, so two hosts never get the same name.
pub fn node_name_for(host: &str) -> String {
    if check_name(host).is_ok() {
        return host.to_string();
    }
    let clean: String = host
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    let h = hex::encode(&Sha256::digest(host.as_bytes())[..4]);
    let stem: String = clean
        .trim_matches('-')
        .chars()
        .take(MAX_NODE_NAME - 9)
        .collect();
    let stem = stem.trim_end_matches('-');
    if stem.is_empty() {
        format!("node-{h}")
    } else {
        format!("{stem}-{h}")
    }
}

/// A member id from a node name (stable, never 0).
pub fn member_id(name: &str) -> u64 {
    let h = Sha256::digest(name.as_bytes());
    u64::from_be_bytes(h[..8].try_into().expect("8 bytes")).max(1)
}

/// The DNS name a node's certificate carries (and peers dial it by).
pub fn dns_name(node: &str) -> String {
    format!("{node}.weft")
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Fingerprint of the cluster CA.
    pub ca: String,
    /// Unix time it expires.
    pub expires: u64,
    /// Random, so every token differs; the replicated state remembers the
    /// nonces redeemed (until they expire), so a token works once.
    pub nonce: String,
    /// The only node name it can be redeemed for.
    pub name: String,
    /// The role the certificate it buys carries.
    pub role: Role,
}

impl TokenClaims {
    /// Reads a token's claims without checking it (a joiner cannot: it pins
    /// the CA with them).
    pub fn peek(token: &str) -> Result<Self> {
        let mut parts = token.split('.');
        let (Some("weft1"), Some(payload), Some(_mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CredentialError::BadToken("not a weft join token"));
        };
        let bytes = hex::decode(payload).map_err(|_| CredentialError::BadToken("bad encoding"))?;
        serde_json::from_slice(&bytes).map_err(|_| CredentialError::BadToken("bad claims"))
    }
}

/// The cluster CA (certificate and key), kept by the coordinators.
pub struct ClusterCa {
    cert_pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
    der: Vec<u8>,
}

impl ClusterCa {
    const CERT: &'static str = "ca.pem";
    const KEY: &'static str = "ca.key";

    /// Creates a CA named `cluster` in `dir` (which must not hold one).
    pub fn init(dir: &Path, cluster: &str) -> Result<Self> {
        let cert_path = dir.join(Self::CERT);
        if cert_path.exists() {
            return Err(CredentialError::Exists(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (cert_pem, key_pem) = Self::generate(cluster)?;
        let key_path = dir.join(Self::KEY);
        write_private(&key_path, key_pem.as_bytes())?;
        std::fs::write(&cert_path, cert_pem).map_err(io(&cert_path))?;
        Self::load(dir)
    }

    /// A new CA named `cluster`, in memory: its certificate and key (PEM),
    /// for [`ClusterCa::from_pem`] (the Kubernetes operator keeps them in a
    /// Secret).
    pub fn generate(cluster: &str) -> Result<(String, String)> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("weft cluster CA {cluster}"));
        dn.push(DnType::OrganizationName, "weft");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time_now();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(cert_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Loads the CA from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let cert_path = dir.join(Self::CERT);
        let key_path = dir.join(Self::KEY);
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        Self::from_pem(cert_pem, &key_pem)
    }

    /// The CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: String, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).map_err(cert_err)?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem).map_err(cert_err)?;
        // re-creating the certificate object from its own parameters and key
        // gives the issuer name and key identifier every issued cert carries
        let cert = params.self_signed(&key).map_err(cert_err)?;
        let der = pem_to_der(&cert_pem)?;
        Ok(Self {
            cert_pem,
            cert,
            key,
            der,
        })
    }

    /// The CA certificate (PEM), which every node trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key (PEM): whoever holds it can issue identities.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The CA's fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.der)
    }

    fn token_key(&self) -> Vec<u8> {
        let mut h = Sha256::new();
        h.update(b"weft join token v1");
        h.update(self.key.serialize_der());
        h.finalize().to_vec()
    }

    fn mac(&self, payload: &[u8]) -> Vec<u8> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.token_key()).expect("any key length");
        m.update(payload);
        m.finalize().into_bytes().to_vec()
    }

    /// A join token for node `name` with `role`, valid for `ttl_s` seconds
    /// from `now_unix`. Admin identities are never joined: they are issued
    /// with the CA.
    pub fn issue_token(&self, now_unix: u64, ttl_s: u64, name: &str, role: Role) -> Result<String> {
        check_name(name)?;
        if role == Role::Admin {
            return Err(CredentialError::RoleNotJoinable(role));
        }
        let mut nonce = [0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let claims = TokenClaims {
            ca: self.fingerprint(),
            expires: now_unix.saturating_add(ttl_s),
            nonce: hex::encode(nonce),
            name: name.to_string(),
            role,
        };
        let payload = serde_json::to_vec(&claims).expect("claims serialize");
        Ok(format!(
            "weft1.{}.{}",
            hex::encode(&payload),
            hex::encode(self.mac(&payload))
        ))
    }

    /// Checks a token: ours, untampered, unexpired.
    pub fn check_token(&self, token: &str, now_unix: u64) -> Result<TokenClaims> {
        let claims = TokenClaims::peek(token)?;
        let mut parts = token.split('.').skip(1);
        let payload = hex::decode(parts.next().unwrap_or_default())
            .map_err(|_| CredentialError::BadToken("bad encoding"))?;
        let mac = hex::decode(parts.next().unwrap_or_default())
            .map_err(|_| CredentialError::BadToken("bad encoding"))?;
        let mut m = Hmac::<Sha256>::new_from_slice(&self.token_key()).expect("any key length");
        m.update(&payload);
        m.verify_slice(&mac)
            .map_err(|_| CredentialError::BadToken("it was not issued by this cluster"))?;
        if claims.ca != self.fingerprint() {
            return Err(CredentialError::BadToken("it names another cluster CA"));
        }
        if claims.expires < now_unix {
            return Err(CredentialError::Expired(now_unix - claims.expires));
        }
        if claims.role == Role::Admin {
            return Err(CredentialError::RoleNotJoinable(claims.role));
        }
        Ok(claims)
    }

    fn node_params(node: &str, role: Role) -> Result<CertificateParams> {
        check_name(node)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(
            dns_name(node).try_into().map_err(cert_err)?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time_now();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(NODE_CERT_DAYS);
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    /// Signs a node's certificate request for `node` with `role`. Only the
    /// request's public key is used; name, role, validity and usages are ours.
    pub fn sign_request(&self, csr_pem: &str, node: &str, role: Role) -> Result<String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(cert_err)?;
        csr.params = Self::node_params(node, role)?;
        Ok(csr
            .signed_by(&self.cert, &self.key)
            .map_err(cert_err)?
            .pem())
    }

    /// A complete identity for `node` with `role`, issued directly (for
    /// coordinators and the operator's admin identity, by whoever holds the
    /// CA).
    pub fn issue_identity(&self, node: &str, role: Role) -> Result<NodeIdentity> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = Self::node_params(node, role)?
            .signed_by(&key, &self.cert, &self.key)
            .map_err(cert_err)?;
        NodeIdentity::from_pem(node, &cert.pem(), &key.serialize_pem(), &self.cert_pem)
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// A new key and a certificate request for `node` (what a joiner sends).
pub fn new_request(node: &str) -> Result<(String, String)> {
    check_name(node)?;
    let key = KeyPair::generate().map_err(cert_err)?;
    let params = CertificateParams::new(vec![dns_name(node)]).map_err(cert_err)?;
    let csr = params.serialize_request(&key).map_err(cert_err)?;
    Ok((key.serialize_pem(), csr.pem().map_err(cert_err)?))
}

/// Fingerprints of revoked certificates, shared with the TLS verifiers and
/// updated as revocations commit.
#[derive(Debug, Clone, Default)]
pub struct Revoked(Arc<RwLock<BTreeSet<String>>>);

impl Revoked {
    /// Replaces the list.
    pub fn set(&self, fingerprints: impl IntoIterator<Item = String>) {
        *self.0.write().expect("revocation lock") = fingerprints.into_iter().collect();
    }

    /// Whether `der` is revoked.
    pub fn contains(&self, der: &[u8]) -> bool {
        self.0
            .read()
            .expect("revocation lock")
            .contains(&fingerprint(der))
    }
}

/// A node's certificate, key and the CA it trusts.
#[derive(Clone)]
pub struct NodeIdentity {
    /// The node's name.
    pub name: String,
    /// Its certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM).
    pub key_pem: String,
    /// The cluster CA (PEM).
    pub ca_pem: String,
    cert_der: Vec<u8>,
    ca_der: Vec<u8>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    const CERT: &'static str = "node.pem";
    const KEY: &'static str = "node.key";
    const CA: &'static str = "ca.pem";
    const NAME: &'static str = "name";

    /// An identity from PEM strings.
    pub fn from_pem(name: &str, cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Self> {
        check_name(name)?;
        KeyPair::from_pem(key_pem).map_err(cert_err)?;
        Ok(Self {
            name: name.to_string(),
            cert_der: pem_to_der(cert_pem)?,
            ca_der: pem_to_der(ca_pem)?,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            ca_pem: ca_pem.to_string(),
        })
    }

    /// Writes the identity into `dir` (the key readable by its owner only).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let key = dir.join(Self::KEY);
        if key.exists() {
            std::fs::remove_file(&key).map_err(io(&key))?;
        }
        write_private(&key, self.key_pem.as_bytes())?;
        for (name, body) in [
            (Self::CERT, &self.cert_pem),
            (Self::CA, &self.ca_pem),
            (Self::NAME, &self.name),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, body).map_err(io(&p))?;
        }
        Ok(())
    }

    /// Reads an identity saved in `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |n: &str| {
            let p = dir.join(n);
            std::fs::read_to_string(&p).map_err(io(&p))
        };
        Self::from_pem(
            read(Self::NAME)?.trim(),
            &read(Self::CERT)?,
            &read(Self::KEY)?,
            &read(Self::CA)?,
        )
    }

    /// Whether `dir` holds an identity.
    pub fn exists(dir: &Path) -> bool {
        dir.join(Self::CERT).exists() && dir.join(Self::KEY).exists()
    }

    /// This node's certificate fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca_der.clone()))
            .expect("the CA certificate parses");
        Arc::new(roots)
    }

    fn chain_and_key(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(cert_err)?;
        let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(cert_err)?;
        Ok((
            vec![
                CertificateDer::from(self.cert_der.clone()),
                CertificateDer::from(self.ca_der.clone()),
            ],
            key,
        ))
    }

    /// Checks that `cert_der` is a node certificate from this cluster's CA,
    /// not revoked, and returns who it names.
    pub fn check_peer_cert(&self, cert_der: &[u8], revoked: &Revoked) -> Result<PeerIdentity> {
        let inner =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots(), provider())
                .build()
                .map_err(cert_err)?;
        let v = RevokingClientVerifier {
            inner,
            revoked: revoked.clone(),
        };
        v.verify_client_cert(
            &CertificateDer::from(cert_der.to_vec()),
            &[],
            UnixTime::now(),
        )
        .map_err(cert_err)?;
        cert_identity(cert_der).ok_or_else(|| cert_err("no node name or an unknown role"))
    }

    /// Signs `msg` with this node's key (ECDSA P-256, ASN.1).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(cert_err)?;
        let rng = ring::rand::SystemRandom::new();
        let kp = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .map_err(cert_err)?;
        Ok(kp.sign(&rng, msg).map_err(cert_err)?.as_ref().to_vec())
    }

    /// This node's certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// TLS for accepting: peers must show a certificate from the CA that is
    /// not revoked, except that `allow_anonymous` lets a joiner in without
    /// one (the caller then accepts only a join request on it).
    pub fn server_config(
        &self,
        revoked: &Revoked,
        allow_anonymous: bool,
    ) -> Result<rustls::ServerConfig> {
        let provider = provider();
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots(),
            provider.clone(),
        );
        let inner = if allow_anonymous {
            inner.allow_unauthenticated()
        } else {
            inner
        }
        .build()
        .map_err(cert_err)?;
        let verifier = Arc::new(RevokingClientVerifier {
            inner,
            revoked: revoked.clone(),
        });
        let (chain, key) = self.chain_and_key()?;
        let mut c = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cert_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(cert_err)?;
        c.alpn_protocols = vec![ALPN.to_vec()];
        // no resumption: a resumed session would skip the certificate check,
        // and with it a revocation committed since
        c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        c.send_tls13_tickets = 0;
        Ok(c)
    }

    /// TLS for dialling a peer: its certificate must come from the CA and not
    /// be revoked; ours goes along.
    pub fn client_config(&self, revoked: &Revoked) -> Result<rustls::ClientConfig> {
        let provider = provider();
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots(),
            provider.clone(),
        )
        .build()
        .map_err(cert_err)?;
        let verifier = Arc::new(RevokingServerVerifier {
            inner,
            revoked: revoked.clone(),
        });
        let (chain, key) = self.chain_and_key()?;
        let mut c = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cert_err)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .map_err(cert_err)?;
        c.alpn_protocols = vec![ALPN.to_vec()];
        c.resumption = rustls::client::Resumption::disabled();
        Ok(c)
    }
}

/// TLS for a joiner, which has no certificate yet: the server must show a
/// chain that ends in a CA with the fingerprint the token pins.
pub fn joiner_client_config(ca_fingerprint: &str) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(PinnedCaVerifier {
        pin: ca_fingerprint.to_string(),
        provider: provider.clone(),
    });
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cert_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    c.alpn_protocols = vec![ALPN.to_vec()];
    Ok(c)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug)]
struct RevokingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Revoked,
}

impl ClientCertVerifier for RevokingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[TlsName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.revoked.contains(end_entity) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct RevokingServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    revoked: Revoked,
}

impl ServerCertVerifier for RevokingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.revoked.contains(end_entity) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct PinnedCaVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.pin)
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A node's identity signs its intent log's checkpoints.
impl weft_audit::Signer for NodeIdentity {
    fn node(&self) -> &str {
        &self.name
    }

    fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, String> {
        NodeIdentity::sign(self, msg).map_err(|e| e.to_string())
    }
}

/// Trusts the certificates this cluster's CA issued and has not revoked:
/// what `weft audit verify` checks each checkpoint's key against.
pub struct ClusterTrust {
    ca_der: Vec<u8>,
    revoked: Revoked,
}

impl ClusterTrust {
    /// Trust in the CA `ca_pem`, less the `revoked` fingerprints.
    pub fn new(ca_pem: &str, revoked: impl IntoIterator<Item = String>) -> Result<Self> {
        let r = Revoked::default();
        r.set(revoked);
        Ok(Self {
            ca_der: pem_to_der(ca_pem)?,
            revoked: r,
        })
    }
}

impl weft_audit::Trust for ClusterTrust {
    fn check(&self, cert_der: &[u8], at_unix_ms: u64) -> std::result::Result<String, String> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca_der.clone()))
            .map_err(|e| format!("the CA certificate: {e}"))?;
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let v = RevokingClientVerifier {
            inner,
            revoked: self.revoked.clone(),
        };
        // valid when it signed (a certificate renewed or expired since
        // still vouches for what it signed then)
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_millis(at_unix_ms));
        v.verify_client_cert(&CertificateDer::from(cert_der.to_vec()), &[], at)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked) => {
                    "the certificate was revoked".to_string()
                }
                rustls::Error::InvalidCertificate(rustls::CertificateError::Expired) => {
                    "the certificate has expired".to_string()
                }
                rustls::Error::InvalidCertificate(why) => {
                    format!("not issued by this cluster's CA (a foreign key): {why:?}")
                }
                other => other.to_string(),
            })?;
        cert_identity(cert_der)
            .map(|p| p.name)
            .ok_or_else(|| "the certificate names no node".into())
    }
}

/// Checks an ECDSA P-256 signature by the key in `cert_der` over `msg`.
pub fn verify_signature(cert_der: &[u8], msg: &[u8], sig: &[u8]) -> Result<()> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(cert_err)?;
    let key = cert.public_key().subject_public_key.data.to_vec();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
        .verify(msg, sig)
        .map_err(|_| cert_err("bad signature"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_900_000_000;

    /// Runs a TLS handshake in memory; the first error either side raises.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
        name: &str,
    ) -> Result<(), String> {
        let mut c = rustls::ClientConnection::new(
            Arc::new(client),
            ServerName::try_from(name.to_string()).unwrap(),
        )
        .map_err(|e| e.to_string())?;
        let mut s = rustls::ServerConnection::new(Arc::new(server)).map_err(|e| e.to_string())?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()
                .map_err(|e| format!("server: {e}"))?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()
                .map_err(|e| format!("client: {e}"))?;
            if !c.is_handshaking() && !s.is_handshaking() {
                // the server's verdict on the client's certificate comes last
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                s.read_tls(&mut &buf[..]).unwrap();
                s.process_new_packets()
                    .map_err(|e| format!("server: {e}"))?;
                return Ok(());
            }
        }
        Err("handshake did not finish".into())
    }

    fn joined(ca: &ClusterCa, name: &str) -> NodeIdentity {
        let (key, csr) = new_request(name).unwrap();
        let cert = ca.sign_request(&csr, name, Role::Node).unwrap();
        NodeIdentity::from_pem(name, &cert, &key, ca.cert_pem()).unwrap()
    }

    #[test]
    fn a_ca_is_created_only_once() {
        let dir = tempfile::tempdir().unwrap();
        ClusterCa::init(dir.path(), "test").unwrap();
        assert!(matches!(
            ClusterCa::init(dir.path(), "test"),
            Err(CredentialError::Exists(_))
        ));
    }

    #[test]
    fn a_ca_loads_back_as_itself() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::init(dir.path(), "test").unwrap();
        let again = ClusterCa::load(dir.path()).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());
    }

    #[test]
    fn the_ca_key_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        ClusterCa::init(dir.path(), "test").unwrap();
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the CA key is readable by others: {mode:o}"
        );
    }

    /// Two CAs in a temporary directory: the cluster's and another.
    fn two_cas() -> (tempfile::TempDir, ClusterCa, ClusterCa) {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::init(&dir.path().join("a"), "a").unwrap();
        let other = ClusterCa::init(&dir.path().join("b"), "b").unwrap();
        (dir, ca, other)
    }

    fn token(ca: &ClusterCa) -> String {
        ca.issue_token(NOW, 3600, "gw-1", Role::Node).unwrap()
    }

    #[test]
    fn a_token_carries_the_name_and_role_it_was_issued_for() {
        let (_d, ca, _) = two_cas();
        let t = ca.issue_token(NOW, 60, "gw-7", Role::Coordinator).unwrap();
        let claims = ca.check_token(&t, NOW).unwrap();
        assert_eq!(
            (claims.name.as_str(), claims.role),
            ("gw-7", Role::Coordinator)
        );
    }

    #[test]
    fn no_token_is_issued_for_an_admin_identity() {
        let (_d, ca, _) = two_cas();
        assert!(matches!(
            ca.issue_token(NOW, 60, "ops", Role::Admin),
            Err(CredentialError::RoleNotJoinable(Role::Admin))
        ));
    }

    #[test]
    fn no_token_is_issued_for_a_bad_name() {
        let (_d, ca, _) = two_cas();
        assert!(ca.issue_token(NOW, 60, "Bad Name", Role::Node).is_err());
    }

    #[test]
    fn a_token_whose_name_or_role_was_changed_is_refused() {
        let (_d, ca, _) = two_cas();
        let t = token(&ca);
        for change in [
            (|c: &mut TokenClaims| c.name = "coord-1".into()) as fn(&mut TokenClaims),
            |c| c.role = Role::Coordinator,
        ] {
            let mut parts: Vec<String> = t.split('.').map(String::from).collect();
            let mut c: TokenClaims =
                serde_json::from_slice(&hex::decode(&parts[1]).unwrap()).unwrap();
            change(&mut c);
            parts[1] = hex::encode(serde_json::to_vec(&c).unwrap());
            assert!(matches!(
                ca.check_token(&parts.join("."), NOW),
                Err(CredentialError::BadToken(_))
            ));
        }
    }

    #[test]
    fn a_certificate_carries_its_role() {
        let (_d, ca, _) = two_cas();
        for role in [Role::Node, Role::Coordinator, Role::Admin] {
            let id = ca.issue_identity("x", role).unwrap();
            let who = cert_identity(id.cert_der()).unwrap();
            assert_eq!((who.name.as_str(), who.role), ("x", role));
        }
    }

    #[test]
    fn a_signed_request_gets_the_role_the_coordinator_gives() {
        let (_d, ca, _) = two_cas();
        let id = joined(&ca, "gw-1");
        assert_eq!(cert_identity(id.cert_der()).unwrap().role, Role::Node);
    }

    #[test]
    fn a_peer_certificate_check_names_the_peer_and_its_role() {
        let (_d, ca, _) = two_cas();
        let a = ca.issue_identity("coord-1", Role::Coordinator).unwrap();
        let b = joined(&ca, "gw-1");
        let who = a
            .check_peer_cert(b.cert_der(), &Revoked::default())
            .unwrap();
        assert_eq!((who.name.as_str(), who.role), ("gw-1", Role::Node));
        assert_eq!(who.fingerprint, b.fingerprint());
    }

    #[test]
    fn a_token_checks_and_carries_its_cas_fingerprint() {
        let (_d, ca, _) = two_cas();
        let t = token(&ca);
        let claims = ca.check_token(&t, NOW + 10).unwrap();
        assert_eq!(claims.ca, ca.fingerprint());
        assert_eq!(TokenClaims::peek(&t).unwrap(), claims);
    }

    #[test]
    fn each_token_is_different() {
        let (_d, ca, _) = two_cas();
        assert_ne!(token(&ca), token(&ca), "tokens carry a nonce");
    }

    #[test]
    fn an_expired_token_is_refused_saying_by_how_much() {
        let (_d, ca, _) = two_cas();
        let t = token(&ca);
        assert!(matches!(
            ca.check_token(&t, NOW + 3601),
            Err(CredentialError::Expired(1))
        ));
    }

    #[test]
    fn another_clusters_token_is_refused() {
        let (_d, ca, other) = two_cas();
        let t = token(&ca);
        assert!(matches!(
            other.check_token(&t, NOW),
            Err(CredentialError::BadToken(_))
        ));
    }

    #[test]
    fn a_token_with_a_changed_claim_is_refused() {
        // a later expiry, with the MAC kept
        let (_d, ca, _) = two_cas();
        let t = token(&ca);
        let mut parts: Vec<String> = t.split('.').map(String::from).collect();
        let mut c: TokenClaims = serde_json::from_slice(&hex::decode(&parts[1]).unwrap()).unwrap();
        c.expires += 1_000_000;
        parts[1] = hex::encode(serde_json::to_vec(&c).unwrap());
        assert!(matches!(
            ca.check_token(&parts.join("."), NOW),
            Err(CredentialError::BadToken(_))
        ));
    }

    #[test]
    fn garbage_is_not_a_token() {
        let (_d, ca, _) = two_cas();
        assert!(ca.check_token("garbage", NOW).is_err());
    }

    /// A cluster of two identities (one issued, one joined), a stranger
    /// from another CA, and the revocation list they share.
    struct Tls {
        _dir: tempfile::TempDir,
        ca: ClusterCa,
        stranger_ca: ClusterCa,
        a: NodeIdentity,
        b: NodeIdentity,
        stranger: NodeIdentity,
        revoked: Revoked,
    }

    impl Tls {
        fn new() -> Self {
            let (_dir, ca, stranger_ca) = two_cas();
            Self {
                a: ca.issue_identity("node-a", Role::Coordinator).unwrap(),
                b: joined(&ca, "node-b"),
                stranger: stranger_ca
                    .issue_identity("node-c", Role::Coordinator)
                    .unwrap(),
                revoked: Revoked::default(),
                _dir,
                ca,
                stranger_ca,
            }
        }
        fn server(&self, id: &NodeIdentity) -> rustls::ServerConfig {
            id.server_config(&self.revoked, false).unwrap()
        }
        fn client(&self, id: &NodeIdentity) -> rustls::ClientConfig {
            id.client_config(&self.revoked).unwrap()
        }
    }

    #[test]
    fn members_of_one_cluster_connect_either_way_round() {
        let t = Tls::new();
        handshake(t.client(&t.b), t.server(&t.a), &dns_name("node-a")).unwrap();
        handshake(t.client(&t.a), t.server(&t.b), &dns_name("node-b")).unwrap();
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused_either_way_round() {
        let t = Tls::new();
        assert!(handshake(t.client(&t.stranger), t.server(&t.a), &dns_name("node-a")).is_err());
        assert!(handshake(t.client(&t.a), t.server(&t.stranger), &dns_name("node-c")).is_err());
    }

    #[test]
    fn a_server_under_the_wrong_name_is_refused() {
        let t = Tls::new();
        assert!(handshake(t.client(&t.b), t.server(&t.a), &dns_name("node-x")).is_err());
    }

    #[test]
    fn a_client_without_a_certificate_is_refused() {
        let t = Tls::new();
        let anon = joiner_client_config(&t.ca.fingerprint()).unwrap();
        assert!(handshake(anon, t.server(&t.a), &dns_name("node-a")).is_err());
    }

    #[test]
    fn a_server_that_lets_joiners_in_takes_a_client_without_a_certificate() {
        let t = Tls::new();
        let anon = joiner_client_config(&t.ca.fingerprint()).unwrap();
        handshake(
            anon,
            t.a.server_config(&t.revoked, true).unwrap(),
            &dns_name("node-a"),
        )
        .unwrap();
    }

    #[test]
    fn a_joiner_pinning_another_ca_refuses_the_server() {
        let t = Tls::new();
        let wrong_pin = joiner_client_config(&t.stranger_ca.fingerprint()).unwrap();
        assert!(handshake(
            wrong_pin,
            t.a.server_config(&t.revoked, true).unwrap(),
            &dns_name("node-a")
        )
        .is_err());
    }

    #[test]
    fn a_revoked_certificate_is_refused_as_a_client_and_as_a_server() {
        let t = Tls::new();
        t.revoked.set([t.b.fingerprint()]);
        let e = handshake(t.client(&t.b), t.server(&t.a), &dns_name("node-a")).unwrap_err();
        assert!(e.contains("Revoked") || e.contains("revoked"), "{e}");
        assert!(handshake(t.client(&t.a), t.server(&t.b), &dns_name("node-b")).is_err());
    }

    #[test]
    fn an_identity_saves_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::init(&dir.path().join("ca"), "a").unwrap();
        let id = joined(&ca, "edge-gw-1");
        id.save(&dir.path().join("id")).unwrap();
        let back = NodeIdentity::load(&dir.path().join("id")).unwrap();
        assert_eq!(back.fingerprint(), id.fingerprint());
        assert_eq!(back.name, "edge-gw-1");
    }

    #[test]
    fn bad_node_names_are_refused() {
        for bad in ["", "UPPER", "-dash", "has space", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
            assert!(new_request(bad).is_err());
        }
    }

    #[test]
    fn a_request_is_signed_for_the_name_the_coordinator_gives_not_the_one_asked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::init(&dir.path().join("ca"), "a").unwrap();
        let (_, csr) = new_request("asks-for-this").unwrap();
        let cert = ca.sign_request(&csr, "gets-this", Role::Node).unwrap();
        let der = pem_to_der(&cert).unwrap();
        let text = String::from_utf8_lossy(&der);
        assert!(text.contains("gets-this.weft") && !text.contains("asks-for-this"));
    }

    #[test]
    fn a_valid_node_name_is_kept_as_it_is() {
        assert_eq!(node_name_for("gw-1"), "gw-1");
    }

    #[test]
    fn a_host_name_becomes_a_valid_node_name_of_its_own() {
        let a = node_name_for("ip-10-0-0-7.eu-west-1.compute.internal");
        let b = node_name_for("ip-10-0-0-7-eu-west-1-compute-internal.");
        assert!(check_name(&a).is_ok() && check_name(&b).is_ok(), "{a} {b}");
        assert_ne!(a, b, "two hosts got one node name");
        let long = node_name_for(&"X.".repeat(100));
        assert!(check_name(&long).is_ok(), "{long}");
        assert!(check_name(&node_name_for("...")).is_ok());
    }

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    fn a_ca() -> ClusterCa {
        let (c, k) = ClusterCa::generate("t").unwrap();
        ClusterCa::from_pem(c, &k).unwrap()
    }

    #[test]
    fn cluster_trust_names_the_holder_of_a_certificate_its_ca_issued() {
        use weft_audit::Trust;
        let ca = a_ca();
        let gw = ca.issue_identity("gw-1", Role::Node).unwrap();
        let t = ClusterTrust::new(ca.cert_pem(), []).unwrap();
        assert_eq!(t.check(gw.cert_der(), now_ms()).unwrap(), "gw-1");
    }

    #[test]
    fn cluster_trust_refuses_a_certificate_of_another_ca() {
        use weft_audit::Trust;
        let (ours, theirs) = (a_ca(), a_ca());
        let gw = theirs.issue_identity("gw-1", Role::Node).unwrap();
        let t = ClusterTrust::new(ours.cert_pem(), []).unwrap();
        assert!(t
            .check(gw.cert_der(), now_ms())
            .unwrap_err()
            .contains("foreign"));
    }

    #[test]
    fn cluster_trust_refuses_a_revoked_certificate() {
        use weft_audit::Trust;
        let ca = a_ca();
        let gw = ca.issue_identity("gw-1", Role::Node).unwrap();
        let t = ClusterTrust::new(ca.cert_pem(), [gw.fingerprint()]).unwrap();
        assert!(t
            .check(gw.cert_der(), now_ms())
            .unwrap_err()
            .contains("revoked"));
    }

    #[test]
    fn cluster_trust_refuses_what_a_certificate_signed_outside_its_validity() {
        use weft_audit::Trust;
        let ca = a_ca();
        let gw = ca.issue_identity("gw-1", Role::Node).unwrap();
        let t = ClusterTrust::new(ca.cert_pem(), []).unwrap();
        let in_ten_years = now_ms() + 10 * 365 * 86_400_000;
        assert!(t.check(gw.cert_der(), in_ten_years).is_err());
    }
}
