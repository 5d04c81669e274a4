//! Backends for the namespace tests: small TCP and UDP servers that answer
//! with their own name, the port they listen on and the client address they
//! saw, then echo. Every loop is bounded by a stop flag polled every few
//! milliseconds; dropping a server stops and joins its threads.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

const POLL: Duration = Duration::from_millis(20);

/// What a backend said about a connection or datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The backend's name.
    pub name: String,
    /// The port the backend listens on.
    pub port: u16,
    /// The client address the backend saw.
    pub peer: SocketAddr,
}

impl Answer {
    /// Parses `"<name> <port> <peer>"`.
    #[must_use]
    pub fn parse(line: &str) -> Self {
        let mut fields = line.split_whitespace();
        let mut next = |what| {
            fields
                .next()
                .unwrap_or_else(|| panic!("answer {line:?} has no {what}"))
        };
        let name = next("name").to_owned();
        let port = next("port")
            .parse()
            .unwrap_or_else(|err| panic!("answer {line:?}: bad port: {err}"));
        let peer = next("peer")
            .parse()
            .unwrap_or_else(|err| panic!("answer {line:?}: bad peer: {err}"));
        Self { name, port, peer }
    }

    /// The client's IPv4 address as the backend saw it.
    #[must_use]
    pub fn peer_ip(&self) -> std::net::Ipv4Addr {
        match self.peer {
            SocketAddr::V4(peer) => *peer.ip(),
            SocketAddr::V6(peer) => panic!("an IPv6 peer {peer}"),
        }
    }

    fn line(name: &str, port: u16, peer: SocketAddr) -> String {
        format!("{name} {port} {peer}\n")
    }
}

/// A running server; stops when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Serves TCP on `listener` (bound in the backend's namespace): each
    /// connection first gets an [`Answer`] line, then its bytes echoed.
    #[must_use]
    pub fn tcp(name: &str, listener: TcpListener) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let port = listener.local_addr().expect("listener address").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let name = name.to_owned();
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut connections = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let flag = Arc::clone(&flag);
                        let line = Answer::line(&name, port, peer);
                        connections.push(thread::spawn(move || serve(stream, &line, &flag)));
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(POLL),
                    Err(_) => break,
                }
            }
            for connection in connections {
                let _ = connection.join();
            }
        });
        Self {
            stop,
            threads: vec![thread],
        }
    }

    /// Serves UDP on `socket`: every datagram is answered with an
    /// [`Answer`] line sent back to its source.
    #[must_use]
    pub fn udp(name: &str, socket: UdpSocket) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let port = socket.local_addr().expect("socket address").port();
        socket.set_read_timeout(Some(POLL)).expect("UDP timeout");
        let name = name.to_owned();
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(Answer::line(&name, port, peer).as_bytes(), peer);
                }
            }
        });
        Self {
            stop,
            threads: vec![thread],
        }
    }
}

fn serve(mut stream: TcpStream, line: &str, stop: &AtomicBool) {
    if stream.write_all(line.as_bytes()).is_err() {
        return;
    }
    let _ = stream.set_read_timeout(Some(POLL));
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Reads a connection's [`Answer`] line.
pub fn read_answer(stream: &TcpStream, timeout: Duration) -> std::io::Result<Answer> {
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Answer::parse(&line))
}
