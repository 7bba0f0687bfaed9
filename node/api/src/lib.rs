//! # weft-api
//!
//! The OpenAI-compatible HTTP surface of a node: `/v1/chat/completions`,
//! `/v1/completions` (streamed as server-sent events or whole),
//! `/v1/models`, `/healthz`, `/readyz` and `/metrics`. Intent (a `weft`
//! object in the body or `x-weft-*` headers) orders admission; API keys map
//! to tenants with their own limits; every error is OpenAI's error JSON with
//! the right status.
//!
//! It holds no routing or placement logic and knows no worker or peer: a
//! model's requests go to its [`weft_worker::Runner`], and on a cluster node
//! the [`Remote`] (the data plane) decides first whether a request is served
//! here or elsewhere.
//!
//! ## Layout
//!
//! - [`routes`]: the router and its handlers; asks the [`Remote`] first.
//! - [`request`]: the request bodies and their checks, into a job.
//! - [`respond`]: submitting a job and answering, whole or streamed.
//! - [`tenants`]: API keys to tenants, tenant limits, overload shedding.
//! - [`state`]: what the handlers share ([`AppState`]), with the models
//!   held ([`Served`]).
//! - [`remote`]: the [`Remote`] trait the data plane implements.
//! - [`error`]: OpenAI's error JSON.
//! - [`headers`]: the `x-weft-*` headers.
//! - [`metrics`]: the API's Prometheus metrics.
//! - [`affinity`]: which node likely holds a request's prefix.
//! - [`trace`]: W3C `traceparent`, one request followed across nodes.
//! - [`config`]: its settings ([`ApiConfig`]).
//! - [`server`]: the listener: connection cap, header deadline, graceful
//!   shutdown.
#![forbid(unsafe_code)]

pub mod affinity;
pub mod config;
pub mod error;
mod fields;
pub mod headers;
pub mod metrics;
pub mod remote;
pub mod request;
pub mod respond;
pub mod routes;
pub mod served;
pub mod server;
pub mod state;
mod structured;
pub mod tenants;
pub mod trace;

pub use config::{ApiConfig, ApiKeys, KeyMap, Policy, TenantLimits, TenantsFile};
pub use error::ApiError;
pub use remote::{LocalLoad, LocalNode, Predict, Prediction, Remote, RouteAsk, Routing};
pub use routes::router;
pub use served::Served;
pub use server::serve_api;
pub use state::AppState;
