//! QUIC between cluster members (quinn, mutual TLS under the cluster CA).
//!
//! Raft messages travel on unidirectional streams, one batch per stream;
//! requests (join, propose, status) on bidirectional streams, one request
//! and one reply each. Every frame is a 4-byte big-endian length and a body;
//! bodies over [`MAX_FRAME`] are refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use serde::{Deserialize, Serialize};
use weft_coordinator::{Command, ControlState, Member};

use crate::credentials::{NodeIdentity, Revoked};

/// Largest frame accepted from an authenticated member (a snapshot of the
/// control state fits).
pub const MAX_FRAME: usize = 64 << 20;
/// Largest frame accepted from a peer without credentials (a join request):
/// nothing more is read from one before it is authenticated.
pub const UNAUTHENTICATED_FRAME: usize = 64 << 10;
/// A connection with no traffic for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alives on open connections.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// How long one attempt of a [`Caller`] waits before trying another member.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long connecting to a member may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request waits for its reply (a linearizable read, a
/// commit) once sent.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a member waits for a peer's request once it opened a stream.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TLS or endpoint setup.
    #[error("setting up QUIC: {0}")]
    Setup(String),
    /// The connection failed or was refused.
    #[error("connecting to {addr}: {why}")]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        why: String,
    },
    /// A stream broke or carried a bad frame.
    #[error("stream: {0}")]
    Stream(String),
    /// A peer's name did not resolve.
    #[error("resolving {addr}: {why}")]
    Resolve {
        /// The `host:port`.
        addr: String,
        /// Why.
        why: String,
    },
}

type Result<T, E = TransportError> = std::result::Result<T, E>;

/// A request on a bidirectional stream. (Externally tagged: the state it
/// carries has integer map keys, which internally tagged enums cannot read.)
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Request {
    /// A node without credentials asks to join with a token and a
    /// certificate request; `member` describes it.
    Join {
        /// The join token.
        token: String,
        /// Certificate request (PEM).
        csr_pem: String,
        /// What the node offers.
        member: Member,
    },
    /// Commit a command (members with credentials only).
    Propose {
        /// The command.
        command: Command,
    },
    /// The control state, read linearizably through the leader's read index.
    Status,
    /// Add a voting coordinator (it must already run with the cluster's
    /// identity, started without bootstrapping). Accepted once proposed;
    /// watch `Status` for it among the voters.
    AddCoordinator {
        /// Where it is.
        peer: Peer,
    },
    /// Remove a voting coordinator (not the leader).
    RemoveCoordinator {
        /// Its raft id.
        id: u64,
    },
    /// Plan a new placement epoch for this demand (by site and model name)
    /// and commit it; the leader keeps re-planning for it as it changes.
    Replan {
        /// Demand per (site, model).
        demand: Vec<(String, String, weft_placement::Demand)>,
    },
}

/// The reply to a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    /// Joined: the node's certificate and the CA.
    Joined {
        /// Certificate (PEM).
        cert_pem: String,
        /// The cluster CA (PEM).
        ca_pem: String,
    },
    /// The command committed at this log index.
    Committed {
        /// Its index.
        index: u64,
        /// Refused by the state machine, with the reason, if it was.
        refused: Option<String>,
    },
    /// The state as of a linearizable read.
    Status(Box<StatusReport>),
    /// This member cannot serve the request; try the leader.
    NotLeader {
        /// The leader's address (`host:port`), if known.
        leader: Option<String>,
        /// The leader's node name (for its certificate), if known.
        #[serde(default)]
        leader_name: Option<String>,
    },
    /// Refused, with the reason.
    Error {
        /// Why.
        message: String,
    },
}

/// What `weft status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// The answering coordinator's id.
    pub id: u64,
    /// The leader's id.
    pub leader: Option<u64>,
    /// The current term.
    pub term: u64,
    /// Commit index.
    pub commit: u64,
    /// Voting coordinators.
    pub voters: Vec<u64>,
    /// The replicated state.
    pub state: ControlState,
    /// Live load of the nodes the answering coordinator hears on the
    /// overlay, by node name (empty without an overlay).
    #[serde(default)]
    pub load: BTreeMap<String, LiveLoad>,
}

/// A node's latest load report, as a coordinator heard it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveLoad {
    /// The report.
    pub report: crate::overlay::LoadReport,
    /// How long ago it arrived (ms).
    pub age_ms: u64,
    /// Round trip from the coordinator (ms), if measured.
    pub rtt_ms: Option<f64>,
}

/// One founding coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Its raft id (not 0).
    pub id: u64,
    /// Its node name (the name in its certificate).
    pub name: String,
    /// Its cluster address (UDP), `host:port`: an IP address, or a DNS
    /// name (a StatefulSet pod's stable name) resolved again at every
    /// connect, so a peer that comes back on a new address is found.
    pub addr: String,
}

/// Resolves `host:port` (an IP address at once, a name through the
/// system's resolver, within [`CONNECT_TIMEOUT`]).
pub async fn resolve(addr: &str) -> Result<SocketAddr> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    let err = |why: String| TransportError::Resolve {
        addr: addr.to_string(),
        why,
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(addr)).await {
        // the endpoints are bound to IPv4, so an IPv4 address first
        Ok(Ok(found)) => {
            let all: Vec<SocketAddr> = found.collect();
            all.iter()
                .find(|a| a.is_ipv4())
                .or(all.first())
                .copied()
                .ok_or_else(|| err("the name has no address".into()))
        }
        Ok(Err(e)) => Err(err(e.to_string())),
        Err(_) => Err(err(format!("no answer within {CONNECT_TIMEOUT:?}"))),
    }
}

/// Whether `addr` is `host:port` with a port and a plausible host.
pub fn check_addr(addr: &str) -> std::result::Result<(), String> {
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} is not HOST:PORT"))?;
    port.parse::<u16>()
        .map_err(|_| format!("{addr:?}: {port:?} is not a port"))?;
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{addr:?}: {host:?} is neither an IP address nor a DNS name"
        ))
    }
}

/// Writes one frame.
pub async fn write_frame(send: &mut quinn::SendStream, body: &[u8]) -> Result<()> {
    if body.len() > MAX_FRAME {
        return Err(TransportError::Stream(format!(
            "frame of {} bytes is over the {MAX_FRAME} limit",
            body.len()
        )));
    }
    send.write_all(&(body.len() as u32).to_be_bytes())
        .await
        .map_err(|e| TransportError::Stream(e.to_string()))?;
    send.write_all(body)
        .await
        .map_err(|e| TransportError::Stream(e.to_string()))
}

/// Reads one frame of at most `limit` bytes; `None` at a clean end of
/// stream. The length is checked before anything is allocated, and the
/// body is read as it arrives: a peer announcing more than it sends costs
/// what it sent.
pub async fn read_frame(recv: &mut quinn::RecvStream, limit: usize) -> Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(TransportError::Stream(e.to_string())),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(TransportError::Stream(format!(
            "frame of {len} bytes is over the {limit} limit"
        )));
    }
    let mut body = Vec::with_capacity(len.min(READ_CHUNK));
    while body.len() < len {
        let want = (len - body.len()).min(READ_CHUNK);
        let start = body.len();
        body.resize(start + want, 0);
        recv.read_exact(&mut body[start..])
            .await
            .map_err(|e| TransportError::Stream(e.to_string()))?;
    }
    Ok(Some(body))
}

/// How much of a frame is read (and allocated) at a time.
const READ_CHUNK: usize = 1 << 20;

/// Streams a peer may have open to an endpoint that takes only
/// certificates at once: every forwarded request is one, and a front sends
/// all of its own to a replica over one connection (QUIC's default of 100
/// made the 101st request wait for one to end, past the forwarder's
/// patience). An endpoint that lets joiners in keeps QUIC's default.
pub const MAX_STREAMS: u32 = 4096;

fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(transport_config())
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits")));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t
}

/// A QUIC endpoint: accepts members (and, with `allow_joiners`, joiners
/// without a certificate) and dials members.
pub fn endpoint(
    identity: &NodeIdentity,
    revoked: &Revoked,
    listen: SocketAddr,
    allow_joiners: bool,
) -> Result<quinn::Endpoint> {
    let setup = |e: &dyn std::fmt::Display| TransportError::Setup(e.to_string());
    let tls = identity
        .server_config(revoked, allow_joiners)
        .map_err(|e| setup(&e))?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| setup(&e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = transport_config();
    if !allow_joiners {
        t.max_concurrent_bidi_streams(MAX_STREAMS.into());
    }
    server.transport_config(Arc::new(t));
    let mut ep = quinn::Endpoint::server(server, listen).map_err(|e| setup(&e))?;
    ep.set_default_client_config(client_config(identity, revoked)?);
    Ok(ep)
}

/// Client settings for dialling members with `identity`.
pub fn client_config(identity: &NodeIdentity, revoked: &Revoked) -> Result<quinn::ClientConfig> {
    let setup = |e: &dyn std::fmt::Display| TransportError::Setup(e.to_string());
    let tls = identity.client_config(revoked).map_err(|e| setup(&e))?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| setup(&e))?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(transport());
    Ok(c)
}

/// Client settings for a joiner, pinning the CA named in its token.
pub fn joiner_config(ca_fingerprint: &str) -> Result<quinn::ClientConfig> {
    let setup = |e: &dyn std::fmt::Display| TransportError::Setup(e.to_string());
    let tls = crate::credentials::joiner_client_config(ca_fingerprint).map_err(|e| setup(&e))?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| setup(&e))?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(transport());
    Ok(c)
}

/// The peer's certificate (DER), if it showed one.
pub fn peer_cert(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    Some(certs.first()?.to_vec())
}

/// Who the peer is (name and role from its certificate), if it showed one.
/// The TLS layer verified it under the cluster CA before this is read.
pub fn peer_identity(conn: &quinn::Connection) -> Option<crate::credentials::PeerIdentity> {
    crate::credentials::cert_identity(&peer_cert(conn)?)
}

/// The node name in the peer's certificate, if it showed one.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    peer_identity(conn).map(|p| p.name)
}

/// Sends one request to `addr` (server name `server`) and waits for the reply.
pub async fn request(
    ep: &quinn::Endpoint,
    config: Option<quinn::ClientConfig>,
    addr: SocketAddr,
    server: &str,
    req: &Request,
) -> Result<Reply> {
    let connecting = match config {
        Some(c) => ep.connect_with(c, addr, &crate::credentials::dns_name(server)),
        None => ep.connect(addr, &crate::credentials::dns_name(server)),
    }
    .map_err(|e| TransportError::Connect {
        addr,
        why: e.to_string(),
    })?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| TransportError::Connect {
            addr,
            why: format!("no answer within {CONNECT_TIMEOUT:?}"),
        })?
        .map_err(|e| TransportError::Connect {
            addr,
            why: e.to_string(),
        })?;
    let reply = request_on(&conn, req).await;
    conn.close(0u32.into(), b"done");
    reply
}

/// Sends one request on an open connection and waits for the reply, for
/// at most [`REQUEST_TIMEOUT`].
pub async fn request_on(conn: &quinn::Connection, req: &Request) -> Result<Reply> {
    tokio::time::timeout(REQUEST_TIMEOUT, exchange_on(conn, req))
        .await
        .map_err(|_| {
            TransportError::Stream(format!(
                "{} sent no reply within {REQUEST_TIMEOUT:?}",
                conn.remote_address()
            ))
        })?
}

async fn exchange_on(conn: &quinn::Connection, req: &Request) -> Result<Reply> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| TransportError::Stream(e.to_string()))?;
    write_frame(
        &mut send,
        &serde_json::to_vec(req).expect("requests serialize"),
    )
    .await?;
    send.finish()
        .map_err(|e| TransportError::Stream(e.to_string()))?;
    let body = read_frame(&mut recv, MAX_FRAME)
        .await?
        .ok_or_else(|| TransportError::Stream("no reply".into()))?;
    serde_json::from_slice(&body).map_err(|e| TransportError::Stream(e.to_string()))
}

/// Sends requests to coordinators as a credentialed member, following
/// redirects to the leader.
pub struct Caller {
    ep: quinn::Endpoint,
    /// Open connections by address, reused across requests.
    conns: std::sync::Mutex<std::collections::HashMap<SocketAddr, quinn::Connection>>,
}

impl Caller {
    /// A caller with `identity`.
    pub fn new(identity: &NodeIdentity) -> Result<Self> {
        let mut ep = quinn::Endpoint::client("0.0.0.0:0".parse().expect("valid address"))
            .map_err(|e| TransportError::Setup(e.to_string()))?;
        ep.set_default_client_config(client_config(identity, &Revoked::default())?);
        Ok(Self {
            ep,
            conns: Default::default(),
        })
    }

    /// One request to one member, on a cached connection when there is one.
    pub async fn call(&self, addr: SocketAddr, server: &str, req: &Request) -> Result<Reply> {
        let cached = self
            .conns
            .lock()
            .expect("connection cache")
            .get(&addr)
            .filter(|c| c.close_reason().is_none())
            .cloned();
        let conn = match cached {
            Some(c) => c,
            None => {
                let connecting = self
                    .ep
                    .connect(addr, &crate::credentials::dns_name(server))
                    .map_err(|e| TransportError::Connect {
                        addr,
                        why: e.to_string(),
                    })?;
                let c = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                    .await
                    .map_err(|_| TransportError::Connect {
                        addr,
                        why: format!("no answer within {CONNECT_TIMEOUT:?}"),
                    })?
                    .map_err(|e| TransportError::Connect {
                        addr,
                        why: e.to_string(),
                    })?;
                self.conns
                    .lock()
                    .expect("connection cache")
                    .insert(addr, c.clone());
                c
            }
        };
        let r = request_on(&conn, req).await;
        if r.is_err() {
            self.conns.lock().expect("connection cache").remove(&addr);
        }
        r
    }

    /// Sends `req` to the coordinators in `peers` until one that can serve
    /// it answers, or `deadline` passes. Retries on "not the leader", on
    /// unreachable members and on proposals lost to a change of leader.
    pub async fn ask(&self, peers: &[Peer], req: &Request, deadline: Duration) -> Result<Reply> {
        if peers.is_empty() {
            return Err(TransportError::Stream("no coordinators to ask".into()));
        }
        let start = std::time::Instant::now();
        let mut target = (peers[0].addr.clone(), peers[0].name.clone());
        let mut next = 1;
        let mut last = String::from("no answer");
        while start.elapsed() < deadline {
            let r = match resolve(&target.0).await {
                Ok(sa) => {
                    let r =
                        tokio::time::timeout(ATTEMPT_TIMEOUT, self.call(sa, &target.1, req)).await;
                    if r.is_err() {
                        self.conns.lock().expect("connection cache").remove(&sa);
                    }
                    r
                }
                Err(e) => Ok(Err(e)),
            };
            match r {
                Ok(Ok(Reply::NotLeader {
                    leader: Some(a),
                    leader_name: Some(n),
                })) if a != target.0 => {
                    target = (a, n);
                    continue;
                }
                Ok(Ok(Reply::Error { message })) if message.contains("retry") => last = message,
                Ok(Ok(Reply::NotLeader { .. })) => last = "no leader yet".into(),
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("{} did not answer in {ATTEMPT_TIMEOUT:?}", target.0),
            }
            let p = &peers[next % peers.len()];
            next += 1;
            target = (p.addr.clone(), p.name.clone());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(TransportError::Stream(format!(
            "no coordinator served the request within {deadline:?}: {last}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ip_address_resolves_to_itself() {
        assert_eq!(
            resolve("10.0.0.1:7100").await.unwrap(),
            "10.0.0.1:7100".parse().unwrap()
        );
    }

    #[tokio::test]
    async fn a_host_name_resolves_through_the_system() {
        let a = resolve("localhost:7100").await.unwrap();
        assert!(a.ip().is_loopback() && a.port() == 7100, "{a}");
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_says_which() {
        let e = resolve("no-such-host.invalid:7100").await.unwrap_err();
        assert!(e.to_string().contains("no-such-host.invalid"), "{e}");
    }

    #[test]
    fn an_address_must_be_host_and_port() {
        assert!(check_addr("coord-0.coord.weft.svc:7100").is_ok());
        assert!(check_addr("[::1]:7100").is_ok());
        assert!(check_addr("coord-0").is_err());
        assert!(check_addr("coord-0:http").is_err());
        assert!(check_addr("bad host:7100").is_err());
    }
}
