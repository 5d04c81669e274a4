//! Continuous load from outside the cluster through a NodePort, counted:
//! long-lived TCP connections (HTTP/1.1 keep-alive to agnhost's `/echo`,
//! a request every 100 ms on each), short TCP requests (a new connection
//! each, 20 a second) and UDP request/response (agnhost's `hostname`, 20 a
//! second, one try each). Every loop ends when told, or after ten minutes.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddrV4, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tests::{k8s::http_at, netns::NetNs};

const LONG_LIVED: usize = 4;
const PERIOD: Duration = Duration::from_millis(50);
const LIMIT: Duration = Duration::from_mins(10);
const TIMEOUT: Duration = Duration::from_secs(3);

/// What the load saw.
#[derive(Debug, Default)]
pub struct Counts {
    pub long_requests: AtomicU64,
    /// Long-lived connections that failed a request (each ends then).
    pub long_broken: AtomicU64,
    pub short_ok: AtomicU64,
    pub short_failed: AtomicU64,
    pub udp_ok: AtomicU64,
    pub udp_failed: AtomicU64,
}

impl Counts {
    /// `(name, value)` of every counter.
    pub fn snapshot(&self) -> [(&'static str, u64); 6] {
        [
            (
                "long-lived requests",
                self.long_requests.load(Ordering::Relaxed),
            ),
            (
                "long-lived connections broken",
                self.long_broken.load(Ordering::Relaxed),
            ),
            ("short requests", self.short_ok.load(Ordering::Relaxed)),
            (
                "short requests failed",
                self.short_failed.load(Ordering::Relaxed),
            ),
            ("UDP answers", self.udp_ok.load(Ordering::Relaxed)),
            (
                "UDP requests unanswered",
                self.udp_failed.load(Ordering::Relaxed),
            ),
        ]
    }
}

/// The running load; [`Load::stop`] ends it and returns the counts.
pub struct Load {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    /// Starts the load from `from` to `tcp` and `udp`.
    pub fn start(from: &NetNs, tcp: SocketAddrV4, udp: SocketAddrV4) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let mut threads = Vec::new();
        for i in 0..LONG_LIVED {
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
            threads.push(from.spawn(move || long_lived(i, tcp, &stop, &counts)));
        }
        {
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
            threads.push(from.spawn(move || {
                every_period(&stop, || {
                    let ok = http_at(tcp, "GET", "/hostname", "")
                        .is_some_and(|(status, _)| status == 200);
                    let counter = if ok {
                        &counts.short_ok
                    } else {
                        &counts.short_failed
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                });
            }));
        }
        {
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
            threads.push(from.spawn(move || {
                let socket = UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
                socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
                every_period(&stop, || {
                    let mut buf = [0u8; 512];
                    let ok = socket.send_to(b"hostname", udp).is_ok()
                        && socket.recv_from(&mut buf).is_ok_and(|(len, _)| len > 0);
                    let counter = if ok {
                        &counts.udp_ok
                    } else {
                        &counts.udp_failed
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                });
            }));
        }
        Self {
            stop,
            counts,
            threads,
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    pub fn stop(self) -> Arc<Counts> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
        self.counts
    }
}

/// Runs `f` every [`PERIOD`] until `stop` or [`LIMIT`].
fn every_period(stop: &AtomicBool, mut f: impl FnMut()) {
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < LIMIT {
        f();
        thread::sleep(PERIOD);
    }
}

/// One keep-alive connection, a request every 100 ms until told to stop;
/// a failed request counts it broken and ends it.
fn long_lived(i: usize, to: SocketAddrV4, stop: &AtomicBool, counts: &Counts) {
    let Ok(stream) = TcpStream::connect_timeout(&to.into(), TIMEOUT) else {
        counts.long_broken.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        counts.long_broken.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut reader = BufReader::new(stream);
    let started = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < LIMIT {
        n += 1;
        let msg = format!("c{i}r{n}");
        let ok = writer
            .write_all(format!("GET /echo?msg={msg} HTTP/1.1\r\nHost: load\r\n\r\n").as_bytes())
            .is_ok()
            && read_body(&mut reader).is_some_and(|body| body == msg);
        if !ok {
            counts.long_broken.fetch_add(1, Ordering::Relaxed);
            return;
        }
        counts.long_requests.fetch_add(1, Ordering::Relaxed);
        thread::sleep(PERIOD * 2);
    }
}

/// One HTTP/1.1 response's body (by its `Content-Length`).
pub fn read_body(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut length = 0usize;
    let mut status = String::new();
    reader.read_line(&mut status).ok()?;
    if !status.starts_with("HTTP/1.1 200") {
        return None;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    String::from_utf8(body).ok()
}
