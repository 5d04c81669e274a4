//! kube-proxy's node health server (`--healthz-addr`, port 10256 as
//! kube-proxy's): cloud load balancers of `externalTrafficPolicy: Cluster`
//! services probe every node's `/healthz` to decide where to send traffic,
//! and monitoring reads `/livez`. Same contract as kube-proxy
//! (`pkg/proxy/healthcheck/proxy_health.go`): 200 with a JSON body
//! (`lastUpdated`, `currentTime`, `nodeEligible`, `healthy`) while no
//! change has waited longer than [`HEALTH_TIMEOUT`] to reach the datapath,
//! 503 otherwise; `/healthz` also fails while the Node is being deleted or
//! carries the cluster autoscaler's `ToBeDeletedByClusterAutoscaler` taint,
//! so load balancers drain it first.

use std::{
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    time::Duration,
};

use crate::http::{Page, lock, read_path, serve_each, write_response};

/// How long a change may wait for the datapath before the node reports
/// unhealthy: kube-proxy's twice its 30 s default sync period.
pub const HEALTH_TIMEOUT: Duration = Duration::from_mins(1);

/// What the agent's loop tells the health server.
#[derive(Clone, Debug)]
pub struct ProxyState {
    /// When the datapath last took the desired state.
    pub last_updated: Option<SystemTime>,
    /// Since when a change has waited to be applied (none waits: `None`).
    pub pending_since: Option<Instant>,
    /// kube-proxy's node eligibility (see the module's documentation).
    pub node_eligible: bool,
}

impl Default for ProxyState {
    fn default() -> Self {
        Self {
            last_updated: None,
            pending_since: None,
            node_eligible: true,
        }
    }
}

impl ProxyState {
    /// A change arrived (kube-proxy's `QueuedUpdate`).
    pub fn queued(&mut self, now: Instant) {
        self.pending_since.get_or_insert(now);
    }

    /// The datapath took the desired state (kube-proxy's `Updated`).
    pub fn updated(&mut self, now: SystemTime) {
        self.pending_since = None;
        self.last_updated = Some(now);
    }

    fn healthy(&self, now: Instant) -> bool {
        self.pending_since
            .is_none_or(|since| now.saturating_duration_since(since) < HEALTH_TIMEOUT)
    }
}

/// The JSON body, field for field kube-proxy's `ProxyHealth`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
}

fn rfc3339(time: SystemTime) -> String {
    Timestamp::try_from(time).map_or_else(|_| String::new(), |time| time.to_string())
}

/// The status line and body for `path` (`None`: not served).
fn answer(path: &str, state: &ProxyState, now: (Instant, SystemTime)) -> Option<(bool, String)> {
    let healthy = state.healthy(now.0);
    let (ok, node_eligible) = match path {
        "/healthz" => (healthy && state.node_eligible, Some(state.node_eligible)),
        "/livez" => (healthy, None),
        _ => return None,
    };
    // As kube-proxy: a healthy answer says "up to date as of now".
    let last_updated = if ok { Some(now.1) } else { state.last_updated };
    let body = Body {
        // Go's zero time when nothing was ever applied.
        last_updated: last_updated.map_or_else(|| "0001-01-01T00:00:00Z".to_owned(), rfc3339),
        current_time: rfc3339(now.1),
        node_eligible,
        healthy,
    };
    Some((ok, serde_json::to_string(&body).unwrap_or_default()))
}

pub async fn serve(listener: TcpListener, page: Arc<Mutex<Page>>) {
    serve_each(listener, page, "health", |stream, page| async move {
        respond(stream, &page).await
    })
    .await;
}

async fn respond(mut stream: TcpStream, page: &Mutex<Page>) -> std::io::Result<()> {
    let path = read_path(&mut stream).await?;
    let state = lock(page).proxy.clone();
    match answer(&path, &state, (Instant::now(), SystemTime::now())) {
        Some((ok, body)) => {
            let status = if ok {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            write_response(
                &mut stream,
                status,
                "application/json",
                "x-content-type-options: nosniff\r\n",
                &body,
            )
            .await
        }
        None => {
            write_response(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "",
                "not found\n",
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(answer: Option<(bool, String)>) -> (bool, serde_json::Value) {
        let (ok, body) = answer.expect("served");
        (ok, serde_json::from_str(&body).expect("JSON"))
    }

    #[test]
    fn answers_as_kube_proxy_does() {
        let start = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_mins(29_937_500);
        let mut state = ProxyState::default();
        // Nothing pending: healthy, up to date as of now.
        let (ok, body) = json(answer("/healthz", &state, (start, wall)));
        assert!(ok);
        assert_eq!(body["healthy"], true);
        assert_eq!(body["nodeEligible"], true);
        assert_eq!(body["lastUpdated"], body["currentTime"]);
        assert_eq!(body["currentTime"], "2026-12-02T22:20:00Z");

        // A change waits: healthy for a minute, then not.
        state.queued(start);
        state.queued(start + Duration::from_secs(50)); // the oldest counts
        assert!(
            json(answer(
                "/healthz",
                &state,
                (start + Duration::from_secs(59), wall)
            ))
            .0
        );
        let late = (start + HEALTH_TIMEOUT, wall);
        let (ok, body) = json(answer("/livez", &state, late));
        assert!(!ok);
        assert_eq!(body["healthy"], false);
        assert_eq!(body["lastUpdated"], "0001-01-01T00:00:00Z");
        assert!(body.get("nodeEligible").is_none(), "/livez: {body}");
        state.updated(wall);
        assert!(json(answer("/livez", &state, late)).0);

        // A node on its way out fails /healthz only.
        state.node_eligible = false;
        let (ok, body) = json(answer("/healthz", &state, late));
        assert!(!ok);
        assert_eq!(body["healthy"], true);
        assert_eq!(body["nodeEligible"], false);
        assert_eq!(body["lastUpdated"], "2026-12-02T22:20:00Z");
        assert!(json(answer("/livez", &state, late)).0);
        assert!(answer("/metrics", &state, late).is_none());
    }
}
