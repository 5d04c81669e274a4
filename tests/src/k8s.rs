//! An upstream Kubernetes control plane on loopback for the end-to-end
//! tests: etcd, kube-apiserver (generated certificates and service-account
//! keys, RBAC) and kube-controller-manager running the EndpointSlice and
//! EndpointSlice-mirroring controllers. `cargo xtask e2e` builds the
//! binaries from the pin in `tests/k8s` and names their directory in
//! `SVC_E2E_K8S_BIN`.
//!
//! Everything stops on drop; the logs stay for a failed run (their
//! directory is printed).

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::{eventually, netns::NetNs};

/// Where `cargo xtask e2e` puts the directory of the binaries.
pub const BIN_DIR_ENV: &str = "SVC_E2E_K8S_BIN";
/// The service CIDR the API server allocates ClusterIPs from.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
const STARTUP: Duration = Duration::from_secs(90);

/// A port free on loopback right now.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A plain HTTP/1.0 exchange with a loopback server: (status, body).
#[must_use]
pub fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    http_at(
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
        method,
        path,
        body,
    )
}

/// A plain HTTP/1.0 exchange with the server at `addr` (connect and read
/// bounded by five seconds each): (status, body).
#[must_use]
pub fn http_at(addr: SocketAddrV4, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned());
    Some((status, body))
}

/// The certificates and keys of one control plane.
struct Pki {
    ca: String,
    files: PathBuf,
}

impl Pki {
    fn generate(dir: &Path, bind: Ipv4Addr) -> Self {
        let files = dir.join("pki");
        fs::create_dir_all(&files).expect("pki directory");
        let write = |name: &str, text: &str| {
            fs::write(files.join(name), text).unwrap_or_else(|err| panic!("writing {name}: {err}"));
        };
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name = name("svc-e2e-ca", None);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        write("ca.crt", &ca.pem());

        let leaf = |file: &str, sans: Vec<String>, cn: &str, org: Option<&str>, server: bool| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(sans).expect("certificate params");
            params.distinguished_name = name(cn, org);
            params.extended_key_usages = vec![if server {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
            let cert = params.signed_by(&key, &ca).expect("certificate");
            write(&format!("{file}.crt"), &cert.pem());
            write(&format!("{file}.key"), &key.serialize_pem());
        };
        leaf(
            "apiserver",
            vec![
                "127.0.0.1".into(),
                bind.to_string(),
                "localhost".into(),
                "10.96.0.1".into(),
                "kubernetes.default.svc".into(),
            ],
            "kube-apiserver",
            None,
            true,
        );
        leaf(
            "admin",
            Vec::new(),
            "svc-e2e-admin",
            Some("system:masters"),
            false,
        );
        // The controller manager acts with full rights here; its own
        // bootstrap role is not what these tests are about.
        leaf(
            "controller-manager",
            Vec::new(),
            "system:kube-controller-manager",
            Some("system:masters"),
            false,
        );
        // The full cluster's other clients: kubelets, the scheduler, and
        // the API server towards kubelets (exec, logs), each with full
        // rights; node authorization is not what these tests are about.
        for (file, cn) in [
            ("kubelet", "system:node:svc-cluster"),
            ("scheduler", "system:kube-scheduler"),
            ("apiserver-kubelet-client", "kube-apiserver-kubelet-client"),
        ] {
            leaf(file, Vec::new(), cn, Some("system:masters"), false);
        }
        // kube-proxy (the conformance control run) with its own bootstrap
        // role, `system:node-proxier`, as kubeadm sets it up.
        leaf("kube-proxy", Vec::new(), "system:kube-proxy", None, false);
        let sa = KeyPair::generate().expect("service-account key");
        write("sa.key", &sa.serialize_pem());
        write("sa.pub", &sa.public_key_pem());
        Self {
            ca: ca.pem(),
            files,
        }
    }

    fn path(&self, name: &str) -> String {
        self.files.join(name).display().to_string()
    }
}

fn name(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, cn);
    if let Some(org) = org {
        name.push(DnType::OrganizationName, org);
    }
    name
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A kubeconfig for the API server at `addr` authenticating with `user`
/// (YAML fields).
fn kubeconfig(ca: &str, addr: SocketAddrV4, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: https://{addr}\n    certificate-authority-data: {}\n\
         users:\n- name: e2e\n  user:\n{user}\ncontexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: e2e\ncurrent-context: e2e\n",
        base64(ca.as_bytes())
    )
}

/// One long-running process and its log (`<logs>/<name>.log`).
pub struct Process {
    name: &'static str,
    child: Child,
}

impl Process {
    #[must_use]
    pub fn spawn(name: &'static str, binary: &Path, args: &[String], logs: &Path) -> Self {
        Self::spawn_command(name, Command::new(binary).args(args), logs)
    }

    /// Starts `command` (its environment and arguments set) as `name`.
    pub fn spawn_command(name: &'static str, command: &mut Command, logs: &Path) -> Self {
        let log = fs::File::create(logs.join(format!("{name}.log"))).expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("starting {name}: {err}"));
        Self { name, child }
    }

    /// Its process id.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Stops it: SIGTERM, then SIGKILL after ten seconds.
    pub fn stop(&mut self) {
        // SAFETY: kill(2) on our own child; the result does not matter.
        unsafe {
            libc::kill(
                libc::pid_t::try_from(self.child.id()).expect("pid fits"),
                libc::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited: {status} (see its log)", self.name);
        }
    }
}

/// How a control plane runs.
#[derive(Clone, Copy, Debug)]
pub struct PlaneOptions {
    /// The API server's address: loopback for the e2e tests, a bridge
    /// address that kubelets in node namespaces reach for a whole cluster.
    pub bind: Ipv4Addr,
    /// A whole cluster's control plane: every controller, kube-scheduler,
    /// service-account tokens for pods, the `kubernetes` service's
    /// endpoints kept by the API server, client certificates towards
    /// kubelets.
    pub full: bool,
}

impl Default for PlaneOptions {
    fn default() -> Self {
        Self {
            bind: Ipv4Addr::LOCALHOST,
            full: false,
        }
    }
}

/// etcd, kube-apiserver and kube-controller-manager (and, full,
/// kube-scheduler).
pub struct ControlPlane {
    dir: PathBuf,
    bin: PathBuf,
    pki: Pki,
    options: PlaneOptions,
    pub etcd_port: u16,
    pub api_port: u16,
    etcd: Process,
    apiserver: Option<Process>,
    controller_manager: Process,
    scheduler: Option<Process>,
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl ControlPlane {
    /// Starts the three on loopback and waits until the API server is
    /// ready.
    ///
    /// # Panics
    ///
    /// When the binaries are missing or a component does not come up.
    #[must_use]
    pub fn start() -> Self {
        Self::start_with(PlaneOptions::default())
    }

    /// Starts a control plane as `options` say and waits until the API
    /// server is ready.
    ///
    /// # Panics
    ///
    /// When the binaries are missing or a component does not come up.
    #[must_use]
    pub fn start_with(options: PlaneOptions) -> Self {
        crate::require_root();
        let bin = PathBuf::from(std::env::var_os(BIN_DIR_ENV).unwrap_or_else(|| {
            panic!(
                "{BIN_DIR_ENV} is not set: run the end-to-end tests with `cargo xtask e2e` \
                 or `cargo xtask test`, which build etcd and Kubernetes first"
            )
        }));
        let dir = std::env::temp_dir().join(format!("svc-e2e-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("logs")).expect("e2e directory");
        let pki = Pki::generate(&dir, options.bind);
        let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let api_addr = SocketAddrV4::new(options.bind, api_port);

        let etcd_url = |port: u16| format!("http://127.0.0.1:{port}");
        let etcd = Process::spawn(
            "etcd",
            &bin.join("etcd"),
            &[
                format!("--data-dir={}", dir.join("etcd").display()),
                "--name=e2e".into(),
                format!("--listen-client-urls={}", etcd_url(etcd_port)),
                format!("--advertise-client-urls={}", etcd_url(etcd_port)),
                format!("--listen-peer-urls={}", etcd_url(peer_port)),
                format!("--initial-advertise-peer-urls={}", etcd_url(peer_port)),
                format!("--initial-cluster=e2e={}", etcd_url(peer_port)),
                "--log-level=warn".into(),
            ],
            &dir.join("logs"),
        );
        assert!(
            eventually(STARTUP, || http(etcd_port, "GET", "/health", "")
                .is_some_and(|(status, _)| status == 200)),
            "etcd did not become healthy on port {etcd_port}; logs in {}",
            dir.display()
        );

        let admin = kubeconfig(
            &pki.ca,
            api_addr,
            &format!(
                "    client-certificate: {}\n    client-key: {}",
                pki.path("admin.crt"),
                pki.path("admin.key")
            ),
        );
        fs::write(dir.join("admin.kubeconfig"), &admin).expect("admin kubeconfig");
        let cm = kubeconfig(
            &pki.ca,
            api_addr,
            &format!(
                "    client-certificate: {}\n    client-key: {}",
                pki.path("controller-manager.crt"),
                pki.path("controller-manager.key")
            ),
        );
        fs::write(dir.join("controller-manager.kubeconfig"), cm).expect("kubeconfig");

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let client = runtime.block_on(async {
            let kubeconfig = Kubeconfig::read_from(dir.join("admin.kubeconfig")).expect("parse");
            let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("admin client config");
            Client::try_from(config).expect("admin client")
        });
        let cm_args = controller_manager_args(&dir, &pki, options);
        let controller_manager = Process::spawn(
            "kube-controller-manager",
            &bin.join("kube-controller-manager"),
            &cm_args,
            &dir.join("logs"),
        );
        let mut plane = Self {
            dir,
            bin,
            pki,
            options,
            etcd_port,
            api_port,
            etcd,
            apiserver: None,
            controller_manager,
            scheduler: None,
            runtime,
            client,
        };
        plane.start_apiserver();
        if options.full {
            plane.start_scheduler();
        }
        plane
    }

    fn start_scheduler(&mut self) {
        let kubeconfig = self.kubeconfig_for("scheduler");
        self.scheduler = Some(Process::spawn(
            "kube-scheduler",
            &self.bin.join("kube-scheduler"),
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()),
                "--v=1".into(),
            ],
            &self.dir.join("logs"),
        ));
    }

    /// The API server's address.
    #[must_use]
    pub fn api_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.options.bind, self.api_port)
    }

    /// A file of the control plane's PKI (`ca.crt`, `kubelet.key`, ...).
    #[must_use]
    pub fn pki_path(&self, name: &str) -> PathBuf {
        self.pki.files.join(name)
    }

    /// A kubeconfig (written once) for the client certificate `leaf` of
    /// the PKI (`admin`, `kubelet`, `scheduler`).
    #[must_use]
    pub fn kubeconfig_for(&self, leaf: &str) -> PathBuf {
        let path = self.dir.join(format!("{leaf}.kubeconfig"));
        let text = kubeconfig(
            &self.pki.ca,
            self.api_addr(),
            &format!(
                "    client-certificate: {}\n    client-key: {}",
                self.pki.path(&format!("{leaf}.crt")),
                self.pki.path(&format!("{leaf}.key"))
            ),
        );
        fs::write(&path, text).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        path
    }

    fn start_apiserver(&mut self) {
        let pki = &self.pki;
        let bind = self.options.bind;
        let mut args = vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            format!("--bind-address={bind}"),
            format!("--secure-port={}", self.api_port),
            format!("--tls-cert-file={}", pki.path("apiserver.crt")),
            format!("--tls-private-key-file={}", pki.path("apiserver.key")),
            format!("--client-ca-file={}", pki.path("ca.crt")),
            "--authorization-mode=RBAC".into(),
            // As clusters that run node agents do (deploy/daemonset.yaml).
            "--allow-privileged=true".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--service-node-port-range=30000-32767".into(),
            format!("--service-account-key-file={}", pki.path("sa.pub")),
            format!("--service-account-signing-key-file={}", pki.path("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--v=1".into(),
        ];
        if self.options.full {
            args.extend([
                // The `kubernetes` service leads to this API server.
                format!("--advertise-address={bind}"),
                "--endpoint-reconciler-type=lease".into(),
                format!(
                    "--kubelet-client-certificate={}",
                    pki.path("apiserver-kubelet-client.crt")
                ),
                format!(
                    "--kubelet-client-key={}",
                    pki.path("apiserver-kubelet-client.key")
                ),
                "--kubelet-preferred-address-types=InternalIP".into(),
            ]);
        } else {
            args.extend([
                // Nothing routes to it: the `kubernetes` service's
                // endpoints are not what these tests read.
                "--advertise-address=192.0.2.1".into(),
                "--endpoint-reconciler-type=none".into(),
                // No kubelet mounts tokens: pods need no service account.
                "--disable-admission-plugins=ServiceAccount".into(),
            ]);
        }
        self.apiserver = Some(Process::spawn(
            "kube-apiserver",
            &self.bin.join("kube-apiserver"),
            &args,
            &self.dir.join("logs"),
        ));
        let client = self.client.clone();
        let ready = eventually(STARTUP, || {
            self.runtime.block_on(async {
                let request = http_get("/readyz");
                client
                    .request_text(request)
                    .await
                    .is_ok_and(|text| text.trim() == "ok")
            })
        });
        if let Some(apiserver) = self.apiserver.as_mut() {
            apiserver.assert_running();
        }
        assert!(
            ready,
            "kube-apiserver did not become ready; logs in {}",
            self.dir.display()
        );
    }

    /// Stops kube-apiserver and starts it again on the same port.
    pub fn restart_apiserver(&mut self) {
        if let Some(mut apiserver) = self.apiserver.take() {
            apiserver.stop();
        }
        self.start_apiserver();
    }

    /// Stops kube-apiserver (see [`Self::start_apiserver_again`]).
    pub fn stop_apiserver(&mut self) {
        if let Some(mut apiserver) = self.apiserver.take() {
            apiserver.stop();
        }
    }

    pub fn start_apiserver_again(&mut self) {
        self.start_apiserver();
    }

    /// Compacts etcd's history up to now, so watches resuming from an
    /// older resource version get "410 Gone" and must relist.
    pub fn compact_etcd(&self) {
        let (status, body) =
            http(self.etcd_port, "POST", "/v3/kv/range", r#"{"key":"AA=="}"#).expect("etcd range");
        assert_eq!(status, 200, "etcd range: {body}");
        let value: serde_json::Value = serde_json::from_str(&body).expect("etcd range JSON");
        let revision = value["header"]["revision"]
            .as_str()
            .expect("etcd revision")
            .to_owned();
        let (status, body) = http(
            self.etcd_port,
            "POST",
            "/v3/kv/compaction",
            &format!(r#"{{"revision":"{revision}","physical":true}}"#),
        )
        .expect("etcd compaction");
        assert_eq!(status, 200, "etcd compaction: {body}");
    }

    #[must_use]
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs `future` on the control plane's runtime.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// The directory of certificates, kubeconfigs and logs.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the agent's service account, role and binding from
    /// `deploy/rbac.yaml` (it may only get, list and watch services,
    /// endpointslices and nodes), checks that `deploy/daemonset.yaml` is
    /// accepted (a server-side dry run), and returns a kubeconfig that
    /// authenticates as the service account with a bound token.
    pub fn agent_kubeconfig(&self) -> PathBuf {
        let client = self.client();
        let token = self.block_on(async move {
            let mut account = None;
            for document in deploy_documents("rbac.yaml") {
                let kind = document["kind"].as_str().unwrap_or_default().to_owned();
                let name = document["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let namespace = document["metadata"]["namespace"]
                    .as_str()
                    .map(str::to_owned);
                match kind.as_str() {
                    "ServiceAccount" => {
                        let namespace = namespace.expect("the service account's namespace");
                        let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
                        apply(&api, &name, document).await;
                        account = Some((api, name));
                    }
                    "ClusterRole" => {
                        apply(&Api::<ClusterRole>::all(client.clone()), &name, document).await;
                    }
                    "ClusterRoleBinding" => {
                        apply(
                            &Api::<ClusterRoleBinding>::all(client.clone()),
                            &name,
                            document,
                        )
                        .await;
                    }
                    other => panic!("deploy/rbac.yaml: unexpected kind {other}"),
                }
            }
            for document in deploy_documents("daemonset.yaml") {
                let daemonset: DaemonSet =
                    serde_json::from_value(document).expect("deploy/daemonset.yaml: a DaemonSet");
                let namespace = daemonset.metadata.namespace.clone().expect("a namespace");
                let params = PostParams {
                    dry_run: true,
                    ..PostParams::default()
                };
                Api::<DaemonSet>::namespaced(client.clone(), &namespace)
                    .create(&params, &daemonset)
                    .await
                    .unwrap_or_else(|err| panic!("deploy/daemonset.yaml is rejected: {err}"));
            }
            let (accounts, name) = account.expect("deploy/rbac.yaml has a ServiceAccount");
            let request = TokenRequest {
                spec: Some(TokenRequestSpec {
                    expiration_seconds: Some(3600 * 6),
                    ..TokenRequestSpec::default()
                }),
                ..TokenRequest::default()
            };
            accounts
                .create_token_request(&name, &PostParams::default(), &request)
                .await
                .expect("a token for the agent's service account")
                .status
                .expect("token status")
                .token
                .expect("a token")
        });
        let path = self.dir.join("agent.kubeconfig");
        let text = kubeconfig(
            &self.pki.ca,
            self.api_addr(),
            &format!("    token: {token}"),
        );
        fs::write(&path, text).expect("agent kubeconfig");
        path
    }
}

/// kube-controller-manager's flags: the EndpointSlice controllers, or
/// (full) every controller with what service-account tokens need.
fn controller_manager_args(dir: &Path, pki: &Pki, options: PlaneOptions) -> Vec<String> {
    let mut args = vec![
        format!(
            "--kubeconfig={}",
            dir.join("controller-manager.kubeconfig").display()
        ),
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", free_port()),
        "--concurrent-service-endpoint-syncs=10".into(),
        "--kube-api-qps=200".into(),
        "--kube-api-burst=400".into(),
        "--v=1".into(),
    ];
    if options.full {
        args.extend([
            "--controllers=*".into(),
            format!("--service-account-private-key-file={}", pki.path("sa.key")),
            format!("--root-ca-file={}", pki.path("ca.crt")),
        ]);
    } else {
        args.push(
            "--controllers=endpointslice-controller,endpointslice-mirroring-controller".into(),
        );
    }
    args
}

/// The documents of `deploy/<file>`.
#[must_use]
pub fn deploy_documents(file: &str) -> Vec<serde_json::Value> {
    use k8s_openapi::serde::Deserialize as _;
    let path = crate::workspace_root().join("deploy").join(file);
    let text =
        fs::read_to_string(&path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            serde_json::Value::deserialize(document)
                .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        })
        .filter(|document| !document.is_null())
        .collect()
}

fn http_get(path: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path)
        .body(Vec::new())
        .expect("a GET request")
}

/// Server-side apply of `object` as the e2e field manager.
pub async fn apply<K>(api: &Api<K>, name: &str, object: serde_json::Value) -> K
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply("svc-e2e").force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap_or_else(|err| panic!("applying {name}: {err}"))
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(mut scheduler) = self.scheduler.take() {
            scheduler.stop();
        }
        self.controller_manager.stop();
        if let Some(mut apiserver) = self.apiserver.take() {
            apiserver.stop();
        }
        self.etcd.stop();
        if thread::panicking() {
            eprintln!(
                "e2e: control-plane logs kept in {}",
                self.dir.join("logs").display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Makes the API server's loopback port reachable from inside `ns` on the
/// same address (127.0.0.1:port), so an agent running in a node's namespace
/// reaches it as a real agent reaches its API server: the listener lives in
/// `ns`, the upstream connections in this process's own namespace.
pub struct Forwarder {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Forwarder {
    #[must_use]
    pub fn new(ns: &NetNs, port: u16) -> Self {
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let listener = ns
            .run(|| TcpListener::bind(addr))
            .unwrap_or_else(|err| panic!("{}: listening on {addr}: {err}", ns.name()));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if let Ok(upstream) = TcpStream::connect(addr) {
                            pipe(client, upstream);
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

/// Copies both ways until either side closes.
fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Both);
            let _ = from.shutdown(std::net::Shutdown::Both);
        });
    };
    copy(a, b2);
    copy(b, a2);
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
