//! Health check node ports: for each LoadBalancer service with
//! `externalTrafficPolicy: Local`, an HTTP server on its
//! `healthCheckNodePort` that answers 200 when this node has a ready
//! endpoint of the service and 503 otherwise, with kube-proxy's JSON body,
//! so cloud load balancers send traffic only to nodes that can serve it
//! without a second hop.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex, PoisonError},
};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{http, model::HealthCheck};

type Checks = Arc<Mutex<BTreeMap<u16, HealthCheck>>>;

/// The servers, one per wanted port, and what they report.
#[derive(Default)]
pub struct HealthChecks {
    checks: Checks,
    servers: BTreeMap<u16, JoinHandle<()>>,
}

impl HealthChecks {
    /// Serves exactly the ports of `wanted`, with its counts. A port that
    /// cannot be bound (in use), or whose server ended (a fault), is
    /// logged and tried again at the next sync.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        wanted.clone_into(&mut self.checks.lock().unwrap_or_else(PoisonError::into_inner));
        self.servers.retain(|port, server| {
            if server.is_finished() {
                warn!(
                    port,
                    "the health check node port's server ended; starting it again"
                );
                return false;
            }
            let keep = wanted.contains_key(port);
            if !keep {
                server.abort();
                info!(port, "health check node port closed");
            }
            keep
        });
        for (&port, check) in wanted {
            if self.servers.contains_key(&port) {
                continue;
            }
            let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
            let listener = std::net::TcpListener::bind(addr).and_then(|listener| {
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)
            });
            match listener {
                Ok(listener) => {
                    info!(port, service = %format!("{}/{}", check.namespace, check.name), "serving a health check node port");
                    let checks = Arc::clone(&self.checks);
                    self.servers
                        .insert(port, tokio::spawn(serve(listener, port, checks)));
                }
                Err(err) => warn!(
                    port,
                    service = %format!("{}/{}", check.namespace, check.name),
                    error = %err,
                    "cannot serve the health check node port; retrying at the next sync"
                ),
            }
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.abort();
        }
    }
}

async fn serve(listener: TcpListener, port: u16, checks: Checks) {
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let checks = Arc::clone(&checks);
                tokio::spawn(async move {
                    let result = async {
                        http::read_path(&mut stream).await?;
                        let check = checks
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get(&port)
                            .cloned();
                        let (status, body, count) = answer(check.as_ref());
                        let headers = format!(
                            "x-content-type-options: nosniff\r\nx-load-balancing-endpoint-weight: {count}\r\n"
                        );
                        http::write_response(
                            &mut stream,
                            status,
                            "application/json",
                            &headers,
                            &body,
                        )
                        .await
                    };
                    if let Err(err) = result.await {
                        debug!(port, error = %err, "health check request failed");
                    }
                });
            }
            Err(err) => {
                debug!(port, error = %err, "accepting a health check connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// kube-proxy's answer: status, JSON body, endpoint count.
fn answer(check: Option<&HealthCheck>) -> (&'static str, String, usize) {
    let Some(check) = check else {
        return ("503 Service Unavailable", "{}\n".to_owned(), 0);
    };
    let body = serde_json::json!({
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let status = if check.local_endpoints > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    (status, format!("{body}\n"), check.local_endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_without_a_ready_local_endpoint_answer_503() {
        let check = |local_endpoints| HealthCheck {
            namespace: "ns".to_owned(),
            name: "lb".to_owned(),
            local_endpoints,
        };
        let (status, body, weight) = answer(Some(&check(2)));
        assert_eq!((status, weight), ("200 OK", 2));
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(body["service"]["name"], "lb");
        assert_eq!(body["localEndpoints"], 2);
        assert_eq!(answer(Some(&check(0))).0, "503 Service Unavailable");
        assert_eq!(answer(None).0, "503 Service Unavailable");
    }
}
