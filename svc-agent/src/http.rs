//! A minimal HTTP/1.0 server for `/metrics`, `/healthz`, `/readyz` and
//! kube-proxy's `/proxyMode`: enough for Prometheus and kubelet probes,
//! nothing else.

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    time::{Duration, timeout},
};
use tracing::debug;

use crate::proxy_health::ProxyState;

/// The page the HTTP side serves, rendered by the agent's loop.
#[derive(Debug)]
pub struct Page {
    pub text: String,
    pub ready: bool,
    /// When the loop last rendered it (every 2 s while it runs).
    pub refreshed: Instant,
    /// Why the agent cannot do its job any more (an essential task
    /// ended): `/healthz` fails with it, so the agent is restarted.
    pub failed: Option<String>,
    /// What kube-proxy's health server reports ([`crate::proxy_health`]).
    pub proxy: ProxyState,
}

impl Page {
    /// An empty page, not ready, as of now.
    #[must_use]
    pub fn new() -> Self {
        Self {
            text: String::new(),
            ready: false,
            refreshed: Instant::now(),
            failed: None,
            proxy: ProxyState::default(),
        }
    }
}

impl Default for Page {
    fn default() -> Self {
        Self::new()
    }
}

/// Locks `page`; a panicked holder left a whole page or none, so it is
/// still served.
pub fn lock(page: &Mutex<Page>) -> MutexGuard<'_, Page> {
    page.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How long a client may take to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// `/healthz` fails when the main loop has not refreshed the page for this
/// long (it does every 2 s; the longest sync measured, 50,000 services from
/// cold, takes under 7 s).
const STALLED: Duration = Duration::from_secs(30);
/// Longest request head read.
const MAX_REQUEST: usize = 4096;

pub async fn serve(listener: TcpListener, page: Arc<Mutex<Page>>) {
    serve_each(listener, page, "metrics", |stream, page| async move {
        respond(stream, &page).await
    })
    .await;
}

/// Accepts connections forever and answers each on a task of its own
/// with `respond`; failures are logged at debug (`what` names the server).
pub async fn serve_each<F, Fut>(
    listener: TcpListener,
    page: Arc<Mutex<Page>>,
    what: &'static str,
    respond: F,
) where
    F: Fn(TcpStream, Arc<Mutex<Page>>) -> Fut,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let answer = respond(stream, Arc::clone(&page));
                tokio::spawn(async move {
                    if let Err(err) = answer.await {
                        debug!(error = %err, server = what, "request failed");
                    }
                });
            }
            Err(err) => {
                debug!(error = %err, server = what, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads a request head (bounded in size and time) and returns its path.
pub async fn read_path(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    timeout(REQUEST_TIMEOUT, read_head)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let line = String::from_utf8_lossy(&head);
    Ok(line.split_whitespace().nth(1).unwrap_or("").to_owned())
}

/// Writes a whole response and closes the connection. `headers` are extra
/// header lines, each ending in `\r\n`.
pub async fn write_response(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    headers: &str,
    body: &str,
) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.0 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{headers}connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Live while the main loop turns and every essential task runs; a wedged
/// or crippled agent is restarted by its liveness probe.
fn health(page: &Page) -> Result<(), String> {
    if let Some(failed) = &page.failed {
        return Err(failed.clone());
    }
    let idle = page.refreshed.elapsed();
    if idle >= STALLED {
        return Err(format!(
            "the agent's loop has not run for {} s",
            idle.as_secs()
        ));
    }
    Ok(())
}

async fn respond(mut stream: TcpStream, page: &Mutex<Page>) -> std::io::Result<()> {
    let path = read_path(&mut stream).await?;
    let (status, content_type, body) = {
        let page = lock(page);
        match path.as_str() {
            "/metrics" => ("200 OK", "text/plain; version=0.0.4", page.text.clone()),
            "/healthz" => match health(&page) {
                Ok(()) => ("200 OK", "text/plain", "ok\n".to_owned()),
                Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
            },
            // As kube-proxy's metrics port answers (`iptables`, `nftables`).
            "/proxyMode" => ("200 OK", "text/plain", "ebpf".to_owned()),
            "/readyz" if page.ready => ("200 OK", "text/plain", "ready\n".to_owned()),
            "/readyz" => (
                "503 Service Unavailable",
                "text/plain",
                "not synced yet\n".to_owned(),
            ),
            _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        }
    };
    write_response(&mut stream, status, content_type, "", &body).await
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn health_fails_when_the_loop_stalls_or_an_essential_task_ended() {
        let mut page = Page {
            text: String::new(),
            ready: true,
            refreshed: Instant::now(),
            failed: None,
            proxy: ProxyState::default(),
        };
        assert_eq!(health(&page), Ok(()));
        page.failed = Some("the watch of Services ended: it panicked".to_owned());
        assert_eq!(
            health(&page),
            Err("the watch of Services ended: it panicked".to_owned())
        );
        page.failed = None;
        page.refreshed = Instant::now()
            .checked_sub(STALLED)
            .expect("the clock has run for 30 s");
        assert!(health(&page).is_err_and(|why| why.contains("has not run")));
    }
}
