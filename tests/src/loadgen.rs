//! The side-by-side benchmark's servers and load generator: short TCP
//! request/response connections (connect, a request line, the server's
//! name back, the client resets), a paced series for latency, a saturating
//! series for connections per second, and one long stream. Every loop is
//! bounded by a count and a deadline; sockets live in the test namespaces.
//!
//! The client ends every connection with a reset once it has the answer
//! (`SO_LINGER` 0), so neither side keeps `TIME_WAIT`. With it, a new
//! connection that reuses a client port towards another ClusterIP and lands
//! on a backend still holding `TIME_WAIT` for the same four-tuple is
//! dropped by the backend's PAWS check (the client's timestamp offset is
//! per destination address it sees, the ClusterIP), and waits a second for
//! its SYN to be sent again: a cost of the generator, not of the proxy, that
//! depended on which proxy ran before.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::netns::NetNs;

/// How long one exchange may take before it counts as failed.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);
/// A handshake this long had a SYN or SYN-ACK retransmitted.
pub const SLOW_CONNECT: Duration = Duration::from_millis(200);
/// Accepting threads per listener.
const ACCEPTORS: usize = 2;

/// What a [`BenchServer`] does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serve {
    /// Read one request line, answer with the server's name, and wait
    /// for the client to end the connection.
    Answer,
    /// Read and discard until the client closes: a throughput sink.
    Sink,
}

/// A listener in a pod's namespace served by a few threads (no thread per
/// connection: the benchmark makes hundreds of thousands of them).
pub struct BenchServer {
    stop: Arc<AtomicBool>,
    listener: TcpListener,
    threads: Vec<JoinHandle<()>>,
}

impl BenchServer {
    /// Listens on `addr` inside `ns`.
    ///
    /// # Panics
    ///
    /// When the address cannot be bound.
    #[must_use]
    pub fn start(ns: &NetNs, addr: SocketAddrV4, name: &str, serve: Serve) -> Self {
        let listener = ns
            .run(|| TcpListener::bind(addr))
            .unwrap_or_else(|err| panic!("{name}: bind {addr}: {err}"));
        let stop = Arc::new(AtomicBool::new(false));
        let answer: Arc<[u8]> = format!("{name}\n").into_bytes().into();
        let threads = (0..ACCEPTORS)
            .map(|_| {
                let listener = listener.try_clone().expect("listener clone");
                let (stop, answer) = (Arc::clone(&stop), Arc::clone(&answer));
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((stream, _)) = listener.accept() else {
                            continue;
                        };
                        let _ = stream.set_read_timeout(Some(EXCHANGE_TIMEOUT));
                        match serve {
                            Serve::Answer => answer_one(stream, &answer),
                            Serve::Sink => sink(stream, &stop),
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            listener,
            threads,
        }
    }
}

fn answer_one(mut stream: TcpStream, answer: &[u8]) {
    let mut request = [0u8; 64];
    if matches!(stream.read(&mut request), Ok(n) if n > 0) && stream.write_all(answer).is_ok() {
        // Until the client's reset (or the read timeout).
        let _ = stream.read(&mut request);
    }
}

fn sink(mut stream: TcpStream, stop: &AtomicBool) {
    let mut buf = vec![0u8; 256 * 1024];
    // Bounded by the client's stream length and by the read timeout.
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // shutdown(2) on a listening socket wakes every blocked accept.
        // SAFETY: our own descriptor.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// One exchange's timings.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// From `connect` called to the connection established.
    pub connect: Duration,
    /// From `connect` called to the first byte of the answer.
    pub first_byte: Duration,
}

/// One request/response connection to `to` from the calling thread's
/// namespace: the timings and the name of the server that answered.
///
/// # Errors
///
/// When the connection fails, times out or gets no answer.
pub fn exchange(to: SocketAddrV4) -> std::io::Result<(Timing, String)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&to.into(), EXCHANGE_TIMEOUT)?;
    let connect = started.elapsed();
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    stream.write_all(b"GET\n")?;
    let mut answer = [0u8; 64];
    let mut len = stream.read(&mut answer)?;
    let first_byte = started.elapsed();
    if len == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    // The name is short: the rest (if split) and the close follow at once.
    while len < answer.len() && answer[len - 1] != b'\n' {
        match stream.read(&mut answer[len..])? {
            0 => break,
            n => len += n,
        }
    }
    let name = String::from_utf8_lossy(&answer[..len]).trim().to_owned();
    reset_on_close(&stream);
    Ok((
        Timing {
            connect,
            first_byte,
        },
        name,
    ))
}

/// Makes closing `stream` send a reset (`SO_LINGER` with a zero timeout):
/// no `TIME_WAIT` on either side.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and option buffer of the given length.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            libc::socklen_t::try_from(size_of::<libc::linger>()).expect("fits"),
        );
    }
}

/// What a saturating run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Saturation {
    pub completed: u64,
    pub failed: u64,
    /// Completed connections whose handshake took [`SLOW_CONNECT`] or
    /// more (a SYN retransmitted: a drop on the way).
    pub slow: u64,
    pub elapsed: Duration,
    /// CPU time the whole machine spent (every CPU, not idle) meanwhile.
    pub cpu_busy: Duration,
}

impl Saturation {
    #[must_use]
    pub fn per_second(&self) -> f64 {
        crate::as_f64(self.completed) / self.elapsed.as_secs_f64()
    }

    /// Machine CPU per completed connection.
    #[must_use]
    pub fn cpu_per_connection(&self) -> Duration {
        self.cpu_busy
            .checked_div(u32::try_from(self.completed.max(1)).unwrap_or(u32::MAX))
            .unwrap_or_default()
    }
}

/// `clients` threads in `ns`, each making connections back to back to
/// `target(i)` (i counts every connection started) for `duration`, at most
/// `limit` in all.
#[must_use]
pub fn saturate(
    ns: &NetNs,
    clients: usize,
    duration: Duration,
    limit: u64,
    target: &Arc<dyn Fn(u64) -> SocketAddrV4 + Send + Sync>,
) -> Saturation {
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let slow = Arc::new(AtomicU64::new(0));
    let cpu_before = busy_cpu();
    let started = Instant::now();
    let deadline = started + duration;
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (next, failed, completed, slow, target) = (
                Arc::clone(&next),
                Arc::clone(&failed),
                Arc::clone(&completed),
                Arc::clone(&slow),
                Arc::clone(target),
            );
            ns.spawn(move || {
                while Instant::now() < deadline {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= limit {
                        break;
                    }
                    match exchange(target(i)) {
                        Ok((timing, _)) => {
                            completed.fetch_add(1, Ordering::Relaxed);
                            if timing.connect >= SLOW_CONNECT {
                                slow.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("load thread");
    }
    let elapsed = started.elapsed();
    Saturation {
        completed: completed.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        slow: slow.load(Ordering::Relaxed),
        elapsed,
        cpu_busy: busy_cpu().saturating_sub(cpu_before),
    }
}

/// `count` connections from one thread in `ns`, started `1/rate` apart
/// (a late one starts at once): their timings, and how many failed.
#[must_use]
pub fn paced(
    ns: &NetNs,
    rate: u32,
    count: u32,
    target: &(dyn Fn(u64) -> SocketAddrV4 + Sync),
) -> (Vec<Timing>, u64) {
    let gap = Duration::from_secs(1) / rate.max(1);
    ns.run(|| {
        let mut timings = Vec::with_capacity(count as usize);
        let mut failed = 0;
        let started = Instant::now();
        for i in 0..count {
            let due = started + gap * i;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            match exchange(target(u64::from(i))) {
                Ok((timing, _)) => timings.push(timing),
                Err(_) => failed += 1,
            }
        }
        (timings, failed)
    })
}

/// Bytes per second one connection from `ns` pushes to the sink at `to`
/// for `duration`.
///
/// # Errors
///
/// When the connection fails.
pub fn stream(ns: &NetNs, to: SocketAddrV4, duration: Duration) -> std::io::Result<f64> {
    ns.run(|| {
        let mut stream = TcpStream::connect_timeout(&to.into(), EXCHANGE_TIMEOUT)?;
        stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
        let chunk = vec![0x5au8; 256 * 1024];
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < duration {
            stream.write_all(&chunk)?;
            sent += chunk.len() as u64;
        }
        let elapsed = started.elapsed();
        let _ = stream.shutdown(Shutdown::Write);
        Ok(crate::as_f64(sent) / elapsed.as_secs_f64())
    })
}

/// The `p`-th percentile (0–100) of `sorted`, nearest rank.
#[must_use]
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Less a hair: 99.9 / 100 * 1000 is 999.000...1 in floating point.
    let rank = (p / 100.0 * crate::as_f64(sorted.len() as u64) - 1e-9).ceil();
    // Clamped into the slice: the cast cannot truncate meaningfully.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "clamped rank"
    )]
    let index = (rank as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// CPU time the machine has spent not idle, from `/proc/stat` (every CPU:
/// user, nice, system, irq, softirq, steal).
#[must_use]
pub fn busy_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Duration::ZERO;
    };
    let ticks: u64 = stat.lines().next().map_or(0, |line| {
        line.split_whitespace()
            .skip(1)
            .enumerate()
            // user nice system idle iowait irq softirq steal
            .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6 | 7))
            .filter_map(|(_, v)| v.parse::<u64>().ok())
            .sum()
    });
    ticks_to_duration(ticks)
}

/// Clock ticks (`USER_HZ`) as a duration.
#[must_use]
pub fn ticks_to_duration(ticks: u64) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    Duration::from_nanos(ticks.saturating_mul(1_000_000_000 / hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let sorted: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        assert_eq!(percentile(&sorted, 50.0), Duration::from_micros(500));
        assert_eq!(percentile(&sorted, 99.0), Duration::from_micros(990));
        assert_eq!(percentile(&sorted, 99.9), Duration::from_micros(999));
        assert_eq!(percentile(&sorted, 100.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
