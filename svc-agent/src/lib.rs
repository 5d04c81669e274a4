//! The node agent: loads the eBPF datapath, attaches it and programs its
//! maps. `main.rs` is the CLI; the integration tests and xtask's benchmarks
//! drive the same library.

pub mod agent;
pub mod cni;
pub mod datapath;
pub mod health;
pub mod http;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod netfilter;
pub mod proxy_health;
pub mod reconcile;
pub mod source;
pub mod sweeper;
pub mod sync;
pub mod tasks;
