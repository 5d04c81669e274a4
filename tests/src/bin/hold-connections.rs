//! `hold-connections NETNS ADDR:PORT COUNT`: opens COUNT TCP connections to
//! ADDR:PORT from network namespace NETNS, one after another, prints `ok
//! COUNT` (or the first failure) and holds them until its standard input
//! closes. The NAT test runs several, each within its own open-file limit.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(netns), Some(to), Some(count)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: hold-connections NETNS ADDR:PORT COUNT");
        std::process::exit(2);
    };
    let to: SocketAddr = to.parse().expect("ADDR:PORT");
    let count: usize = count.parse().expect("COUNT");
    let ns = std::fs::File::open(format!("/run/netns/{netns}")).expect("the namespace");
    // SAFETY: a valid namespace fd; this process has one thread.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        match TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
            Ok(stream) => held.push(stream),
            Err(err) => {
                println!("failed at {i}: {err}");
                return;
            }
        }
    }
    println!("ok {count}");
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
}
