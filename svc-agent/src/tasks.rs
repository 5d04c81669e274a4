//! The agent's long-lived tasks (watches, the metrics server, the eBPF
//! log reader), supervised: each runs until the agent exits, so one that
//! ends — it returned or panicked — is a fault the main loop is told of by
//! name. An essential task's end fails `/healthz`, and the liveness probe
//! restarts the agent (the pinned datapath serves meanwhile): a watch that
//! died would otherwise leave the node's services frozen behind a healthy
//! probe.

use std::{collections::HashMap, future::Future};

use tokio::task::{Id, JoinError, JoinSet};

/// A supervised task's name and weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task {
    pub name: &'static str,
    /// Its end leaves the agent unable to do its job.
    pub essential: bool,
}

/// A task that ended, and how.
#[derive(Debug)]
pub struct Ended {
    pub task: Task,
    pub why: String,
}

/// The supervised tasks.
#[derive(Debug, Default)]
pub struct Tasks {
    set: JoinSet<()>,
    tasks: HashMap<Id, Task>,
}

impl Tasks {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `future` as `task` (on the current runtime).
    pub fn spawn<F>(&mut self, task: Task, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self.set.spawn(future);
        self.tasks.insert(handle.id(), task);
    }

    /// How many run.
    #[must_use]
    pub fn len(&self) -> usize {
        self.set.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// The next task to end; pending forever while none does (for
    /// `select!`).
    pub async fn ended(&mut self) -> Ended {
        loop {
            let Some(result) = self.set.join_next_with_id().await else {
                return std::future::pending().await;
            };
            let (id, why) = match result {
                Ok((id, ())) => (id, "it returned".to_owned()),
                Err(err) => (err.id(), reason(&err)),
            };
            if let Some(task) = self.tasks.remove(&id) {
                return Ended { task, why };
            }
        }
    }
}

/// Why a task failed: its panic message when there is one.
fn reason(err: &JoinError) -> String {
    if err.is_cancelled() {
        return "it was cancelled".to_owned();
    }
    let message = err.to_string();
    format!("it panicked ({message})")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const WATCH: Task = Task {
        name: "watch services",
        essential: true,
    };
    const LOGGER: Task = Task {
        name: "eBPF log reader",
        essential: false,
    };

    #[tokio::test]
    async fn an_ended_task_is_reported_by_name_and_how() {
        let mut tasks = Tasks::new();
        tasks.spawn(WATCH, async { panic!("the stream broke") });
        tasks.spawn(LOGGER, async {});
        tasks.spawn(
            Task {
                name: "forever",
                essential: true,
            },
            std::future::pending(),
        );
        let mut ended = Vec::new();
        for _ in 0..2 {
            let end = tokio::time::timeout(Duration::from_secs(5), tasks.ended())
                .await
                .expect("two tasks end");
            ended.push((end.task.name, end.why));
        }
        ended.sort();
        assert_eq!(ended[0], ("eBPF log reader", "it returned".to_owned()));
        assert_eq!(ended[1].0, "watch services");
        assert!(
            ended[1].1.contains("panicked") && ended[1].1.contains("the stream broke"),
            "{}",
            ended[1].1
        );
        assert_eq!(tasks.len(), 1);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), tasks.ended())
                .await
                .is_err(),
            "a task that runs is not reported"
        );
    }
}
