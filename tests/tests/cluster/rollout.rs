//! A rolling update of a backend Deployment whose pods take their time to
//! go (a `preStop` sleep inside a termination grace period), with
//! long-lived connections open to its old pods and new connections made
//! all along, from outside through a NodePort.

use std::{
    io::{BufReader, Write as _},
    net::{SocketAddrV4, TcpStream},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tests::{eventually, k8s::http_at};

use crate::{
    harness::{AGNHOST, Harness},
    load::read_body,
};

const PRE_STOP: Duration = Duration::from_secs(6);
/// How long a terminating pod surely still serves: its preStop, less a
/// second for when its deletion was seen.
const SERVING: Duration = Duration::from_secs(5);
const LONG_LIVED: usize = 6;
/// How long after a pod's deletion the proxy may still send it a new
/// connection (the EndpointSlice update reaching the agent).
const CONVERGE: Duration = Duration::from_secs(2);

/// What one connection or probe saw: when, and which pod answered (none:
/// the request failed).
type Seen = Arc<Mutex<Answers>>;
type Answers = Vec<(Instant, Option<String>)>;

fn push(seen: &Seen, answer: Option<String>) {
    seen.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((Instant::now(), answer));
}

const ROLL: &str = r"
apiVersion: apps/v1
kind: Deployment
metadata: {name: roll}
spec:
  replicas: 2
  selector: {matchLabels: {app: roll}}
  template:
    metadata: {labels: {app: roll}}
    spec:
      terminationGracePeriodSeconds: 20
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule,
         labelSelector: {matchLabels: {app: roll}}}
      containers:
      - name: web
        image: AGNHOST
        imagePullPolicy: Never
        args: [netexec, --http-port=8080]
        readinessProbe: {httpGet: {path: /healthz, port: 8080}, periodSeconds: 1}
        lifecycle: {preStop: {sleep: {seconds: PRE_STOP}}}
---
apiVersion: v1
kind: Service
metadata: {name: roll}
spec:
  type: NodePort
  selector: {app: roll}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

/// Old pods' long-lived connections keep working until the pod exits
/// (through its `preStop` sleep), and new connections go only to ready
/// pods once the old ones are terminating; not one new connection fails.
pub fn backend_rollout_keeps_old_connections_and_sends_new_ones_to_ready_pods(h: &mut Harness) {
    h.apply(
        &ROLL
            .replace("AGNHOST", AGNHOST)
            .replace("PRE_STOP", &PRE_STOP.as_secs().to_string()),
    );
    h.wait_ready("default", "app=roll");
    let old: Vec<String> = h
        .pods("default", "app=roll")
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let port: u16 = h
        .field("default", "service/roll", "{.spec.ports[0].nodePort}")
        .parse()
        .expect("a node port");
    let addr = SocketAddrV4::new(h.cluster.nodes[0].addr.parse().expect("node1"), port);
    assert!(
        eventually(Duration::from_secs(20), || h
            .cluster
            .external
            .run(|| http_at(addr, "GET", "/hostname", ""))
            .is_some()),
        "the NodePort {addr} answers"
    );
    let traffic = Traffic::start(h, addr);
    thread::sleep(Duration::from_secs(2));
    h.kubectl(&[
        "patch",
        "deployment",
        "roll",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"metadata":{"annotations":{"svc-test/revision":"2"}}}}}"#,
    ]);
    let deleted = watch_deletions(h, &old);
    thread::sleep(Duration::from_secs(1));
    let (long, fresh) = traffic.stop();
    let deleted_at = |pod: &str| {
        deleted.iter().find(|(name, _)| name == pod).map_or_else(
            || panic!("{pod}'s deletion was not seen: {deleted:?}"),
            |(_, at)| *at,
        )
    };
    for (i, seen) in long.iter().enumerate() {
        let Some((_, Some(pod))) = seen.first() else {
            panic!("long-lived connection {i} never got an answer");
        };
        assert!(
            old.contains(pod),
            "connection {i} went to {pod}, not an old pod"
        );
        // It must keep working through the pod's preStop sleep.
        let serving_until = deleted_at(pod) + SERVING;
        for (at, answer) in seen {
            if *at <= serving_until {
                assert_eq!(
                    answer.as_ref(),
                    Some(pod),
                    "long-lived connection {i} to {pod} failed or moved while its pod still ran"
                );
            }
        }
        assert!(
            seen.iter().any(|(at, _)| *at > serving_until),
            "connection {i} was watched past its pod's preStop"
        );
    }
    let failed = fresh.iter().filter(|(_, answer)| answer.is_none()).count();
    assert_eq!(failed, 0, "new connections failed during the rollout");
    for (at, answer) in &fresh {
        let Some(pod) = answer else { continue };
        if old.contains(pod) {
            assert!(
                *at <= deleted_at(pod) + CONVERGE,
                "a new connection went to terminating {pod} {:?} after its deletion",
                at.duration_since(deleted_at(pod))
            );
        }
    }
    eprintln!(
        "rollout: {} new connections, all answered; {LONG_LIVED} long-lived connections to {old:?} served through the preStop",
        fresh.len()
    );
    h.kubectl(&["delete", "deployment/roll", "service/roll", "--wait=false"]);
}

/// Polls until every pod of `old` is gone; returns when each was seen
/// marked for deletion.
fn watch_deletions(h: &Harness, old: &[String]) -> Vec<(String, Instant)> {
    let mut deleted: Vec<(String, Instant)> = Vec::new();
    let all_gone = eventually(Duration::from_mins(3), || {
        let text = h.kubectl(&[
            "get",
            "pods",
            "-l",
            "app=roll",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
        ]);
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            if let (Some(name), Some(_)) = (fields.next(), fields.next())
                && !deleted.iter().any(|(n, _)| n == name)
            {
                deleted.push((name.to_owned(), Instant::now()));
            }
        }
        old.iter().all(|name| {
            !text
                .lines()
                .any(|line| line.split_whitespace().next() == Some(name))
        })
    });
    assert!(all_gone, "the old pods went");
    deleted
}

/// The long-lived connections and the stream of new ones.
struct Traffic {
    stop: Arc<AtomicBool>,
    long: Vec<Seen>,
    fresh: Seen,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(h: &Harness, addr: SocketAddrV4) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut long: Vec<Seen> = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..LONG_LIVED {
            let seen: Seen = Arc::default();
            long.push(Arc::clone(&seen));
            let stop = Arc::clone(&stop);
            threads.push(
                h.cluster
                    .external
                    .spawn(move || keep_alive(addr, &stop, &seen)),
            );
        }
        let fresh: Seen = Arc::default();
        let (stop_fresh, seen) = (Arc::clone(&stop), Arc::clone(&fresh));
        threads.push(h.cluster.external.spawn(move || {
            let started = Instant::now();
            while !stop_fresh.load(Ordering::Relaxed) && started.elapsed() < Duration::from_mins(5)
            {
                let answer = http_at(addr, "GET", "/hostname", "")
                    .filter(|(status, _)| *status == 200)
                    .map(|(_, body)| body.trim().to_owned());
                push(&seen, answer);
                thread::sleep(Duration::from_millis(100));
            }
        }));
        Self {
            stop,
            long,
            fresh,
            threads,
        }
    }

    /// Stops it; returns what each long-lived connection and the new
    /// connections saw.
    fn stop(self) -> (Vec<Answers>, Answers) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
        let take = |seen: &Seen| seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
        (self.long.iter().map(take).collect(), take(&self.fresh))
    }
}

/// One keep-alive connection asking `/hostname` every 200 ms, recording
/// each answer, until told to stop (a failed request ends it).
fn keep_alive(addr: SocketAddrV4, stop: &AtomicBool, seen: &Seen) {
    let Ok(stream) = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3)) else {
        push(seen, None);
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let Ok(mut writer) = stream.try_clone() else {
        push(seen, None);
        return;
    };
    let mut reader = BufReader::new(stream);
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_mins(5) {
        let answer = writer
            .write_all(b"GET /hostname HTTP/1.1\r\nHost: roll\r\n\r\n")
            .ok()
            .and_then(|()| read_body(&mut reader))
            .map(|body| body.trim().to_owned());
        let failed = answer.is_none();
        push(seen, answer);
        if failed {
            return;
        }
        thread::sleep(Duration::from_millis(200));
    }
}
