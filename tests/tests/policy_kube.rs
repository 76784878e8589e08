//! Traffic policy from the cluster, end to end: the real `balancer-agent` (its real kube-rs
//! client) against the in-process API server (`balancer_tests::apiserver`) serving Istio's
//! `VirtualService`/`DestinationRule` and the Gateway API's `GRPCRoute` as a cluster with their
//! CRDs does (discovery documents, list and watch, 404 when not installed), with real tonic
//! backends that say which pod served each call.
//!
//! The Istio objects are the articles' (`../shared/seeds/002` and `004`) applied as written:
//! `kubectl apply` into the `default` namespace, nothing added. Seed 002 lost its indentation in
//! the article's text; it is restored here, nothing else changed.
//!
//! Pods are backends on distinct loopback addresses (127.0.0.2, ...) and one port, each with a
//! Pod object carrying its labels, and EndpointSlices whose endpoints point at them, as the
//! endpoint slice controller writes them.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::Stdio,
    task::{Context, Poll},
    time::Duration,
};

use balancer_tests::{
    agent::{Agent, TempDir, agent_bin, metric},
    apiserver::{
        ApiServer, Kind,
        objects::{Ep, endpoint_slice, pod, service},
    },
    free_port, greeter,
    pb::{HelloReply, HelloRequest, greeter_server::GreeterServer},
    wait_until,
};
use serde_json::Value;
use tonic::{
    Request, Status,
    codegen::{Service, http},
    server::NamedService,
    transport::Channel,
};

const WAIT: Duration = Duration::from_secs(20);
const NODE: &str = "node-1";

/// Seed 002's VirtualService and DestinationRule (greeter-a calls greeter-b's `v1` subset).
const SEED_002: &str =
    include_str!("../../balancer-agent/src/discovery/testdata/seed-002-greeter-b.yaml");

/// Seed 004's "Practical Example: Complete gRPC Traffic Management", verbatim.
const SEED_004: &str =
    include_str!("../../balancer-agent/src/discovery/testdata/seed-004-payment-service.yaml");

/// Seed 004's routing written as a GAMMA GRPCRoute over Services `payment-v1` and `payment-v2`.
const SPLIT_GRPCROUTE: &str =
    include_str!("../../balancer-agent/src/discovery/testdata/payment-grpcroute.yaml");

/// A greeter that also answers any method of `payment.PaymentService` (as `SayHello`), so
/// calls to the articles' methods reach a real backend that says who served them.
#[derive(Clone)]
struct PaymentService(GreeterServer<greeter::Backend>);

impl NamedService for PaymentService {
    const NAME: &'static str = "payment.PaymentService";
}

impl<B> Service<http::Request<B>> for PaymentService
where
    GreeterServer<greeter::Backend>: Service<http::Request<B>>,
{
    type Response = <GreeterServer<greeter::Backend> as Service<http::Request<B>>>::Response;
    type Error = <GreeterServer<greeter::Backend> as Service<http::Request<B>>>::Error;
    type Future = <GreeterServer<greeter::Backend> as Service<http::Request<B>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<http::Request<B>>::poll_ready(&mut self.0, cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        *req.uri_mut() = http::Uri::from_static("/helloworld.Greeter/SayHello");
        self.0.call(req)
    }
}

/// A pod: its backend and its labels.
struct PodBackend {
    name: String,
    addr: SocketAddr,
    labels: Vec<(&'static str, &'static str)>,
    _task: tokio::task::JoinHandle<()>,
}

/// The test's cluster: the API server with the policy CRDs (or not), and pods.
struct Cluster {
    api: ApiServer,
    next_ip: u8,
    port: u16,
}

impl Cluster {
    async fn new(with_crds: bool) -> Self {
        let api = ApiServer::start().await;
        if with_crds {
            api.install(&[Kind::VirtualService, Kind::DestinationRule, Kind::GrpcRoute]);
        }
        Self {
            api,
            next_ip: 2,
            port: free_port(),
        }
    }

    /// Pods named `name-<i>` with `labels`, backends of a Service `service` (ClusterIP
    /// `cluster_ip`, port `grpc` 50051), listed by one EndpointSlice.
    async fn service(
        &mut self,
        name: &str,
        cluster_ip: &str,
        pods: &[(&str, &[(&'static str, &'static str)])],
    ) -> Vec<PodBackend> {
        let mut out = Vec::new();
        for (pod_name, labels) in pods {
            let ip = format!("127.0.0.{}", self.next_ip);
            self.next_ip += 1;
            let addr: SocketAddr = format!("{ip}:{}", self.port).parse().unwrap();
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .expect("binding a pod's address");
            let stats = std::sync::Arc::new(greeter::Stats::default());
            let greeter = greeter::service(pod_name, stats);
            let payments = PaymentService(greeter.clone());
            let task = tokio::spawn(async move {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let _ = tonic::transport::Server::builder()
                    .add_service(greeter)
                    .add_service(payments)
                    .serve_with_incoming(incoming)
                    .await;
            });
            let uid = format!("00000000-0000-4000-8000-{:012x}", self.next_ip);
            self.api
                .apply(pod("default", pod_name, &uid, NODE, labels, false));
            out.push(PodBackend {
                name: pod_name.to_string(),
                addr,
                labels: labels.to_vec(),
                _task: task,
            });
        }
        let eps: Vec<Ep> = out
            .iter()
            .map(|p| Ep::ready(&p.addr.ip().to_string(), &p.name))
            .collect();
        self.api.apply_all([
            service("default", name, cluster_ip, &[("grpc", 50051, None)]),
            endpoint_slice(
                "default",
                &format!("{name}-abcde"),
                name,
                &[("grpc", self.port)],
                &eps,
            ),
        ]);
        out
    }

    /// `kubectl apply -f` of a YAML stream into the `default` namespace.
    fn kubectl_apply(&self, yaml: &str) {
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("YAML");
            if v.is_null() {
                continue;
            }
            let mut obj: Value = serde_json::to_value(v).expect("JSON");
            if obj["metadata"]["namespace"].is_null() {
                obj["metadata"]["namespace"] = "default".into();
            }
            self.api.apply(obj);
        }
    }
}

struct Env {
    cluster: Cluster,
    agent: Agent,
    listen: SocketAddr,
    log: std::path::PathBuf,
    _dir: TempDir,
}

/// The agent against the cluster, ready (every cache synced), logging JSON at INFO into a file.
async fn start(cluster: Cluster) -> Env {
    let dir = TempDir::new("balancer-policy");
    std::fs::create_dir_all(dir.0.join("cgroup")).unwrap();
    let kubeconfig = cluster.api.kubeconfig(&dir.0);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.0.join("agent.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let config = format!(
        "listeners:\n  - address: {listen}\nadmin:\n  address: {admin}\ndatapath:\n  cgroup_root: {}\n",
        dir.0.join("cgroup").display()
    );
    let agent = Agent::start_with(&config, admin, |c| {
        c.arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--node-name", NODE])
            .env("BALANCER_LOG", "info")
            .env("BALANCER_LOG_FORMAT", "json")
            .stderr(Stdio::from(log_file));
    })
    .await;
    Env {
        cluster,
        agent,
        listen,
        log,
        _dir: dir,
    }
}

impl Env {
    /// A client connection to the proxy naming `authority`, as the application dials it.
    async fn channel(&self, authority: &str) -> Channel {
        Channel::from_shared(format!("http://{}", self.listen))
            .unwrap()
            .origin(format!("http://{authority}").parse().unwrap())
            .connect()
            .await
            .expect("connecting to the proxy")
    }

    /// `/api/routes`.
    fn routes(&self) -> Value {
        self.agent.json("/api/routes")
    }

    /// The route names in force for `service`, in order.
    fn route_names(&self, service: &str) -> Vec<String> {
        self.routes()["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["service"] == service)
            .flat_map(|s| s["routes"].as_array().cloned().unwrap_or_default())
            .map(|r| r["name"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    fn ready_endpoints(&self, service: &str) -> usize {
        self.agent
            .json(&format!("/api/endpoints?service={service}"))
            .as_array()
            .map_or(0, |a| a.iter().filter(|e| e["health"] == "ready").count())
    }

    /// The agent's log lines whose message is `message`.
    fn log_lines(&self, message: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["fields"]["message"] == message)
            .collect()
    }
}

/// One unary call of `path` with `headers`; the pod that served it.
async fn call(
    ch: &Channel,
    path: &'static str,
    headers: &[(&'static str, &str)],
) -> Result<String, Status> {
    let hello = HelloRequest {
        name: "policy".into(),
        ..Default::default()
    };
    let reply = call_with(ch, path, headers, hello).await?;
    Ok(reply.into_inner().backend)
}

/// One unary call of `path` with `headers` and the request `hello` (its knobs: a failure, a
/// sleep); the reply with its metadata.
async fn call_with(
    ch: &Channel,
    path: &'static str,
    headers: &[(&'static str, &str)],
    hello: HelloRequest,
) -> Result<tonic::Response<HelloReply>, Status> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut req = Request::new(hello);
    for (k, v) in headers {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    grpc.unary(
        req,
        http::uri::PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::default(),
    )
    .await
}

/// `n` calls; how many each pod served. Every call must succeed.
async fn tally(
    ch: &Channel,
    n: usize,
    path: &'static str,
    headers: &[(&'static str, &str)],
) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for i in 0..n {
        let pod = call(ch, path, headers)
            .await
            .unwrap_or_else(|e| panic!("call {i} of {path} {headers:?} failed: {e:?}"));
        *out.entry(pod).or_default() += 1;
    }
    out
}

/// The calls of `t` served by pods with label `version=v`.
fn served_by(t: &BTreeMap<String, usize>, pods: &[PodBackend], version: &str) -> usize {
    pods.iter()
        .filter(|p| p.labels.contains(&("version", version)))
        .map(|p| t.get(&p.name).copied().unwrap_or(0))
        .sum()
}

const SAY_HELLO: &str = "/helloworld.Greeter/SayHello";
const PROCESS: &str = "/payment.PaymentService/ProcessPayment";
const REFUND: &str = "/payment.PaymentService/Refund";

async fn greeter_b(cluster: &mut Cluster) -> Vec<PodBackend> {
    cluster
        .service(
            "greeter-b",
            "10.96.0.20",
            &[
                ("greeter-b-v1-a", &[("app", "greeter-b"), ("version", "v1")]),
                ("greeter-b-v1-b", &[("app", "greeter-b"), ("version", "v1")]),
                ("greeter-b-v2-a", &[("app", "greeter-b"), ("version", "v2")]),
            ],
        )
        .await
}

/// The agent over a cluster (with the policy CRDs or without) holding greeter-b's three pods,
/// once it has their endpoints.
async fn greeter_b_env(with_crds: bool) -> (Env, Vec<PodBackend>) {
    let mut cluster = Cluster::new(with_crds).await;
    let pods = greeter_b(&mut cluster).await;
    let env = start(cluster).await;
    wait_until("greeter-b's 3 endpoints", WAIT, || {
        env.ready_endpoints("greeter-b.default:50051") == 3
    })
    .await;
    (env, pods)
}

#[tokio::test]
async fn seed_002_subset_v1_takes_every_call() {
    let (env, pods) = greeter_b_env(true).await;
    // greeter-a dials `greeter-b:50051`, as in the article.
    let ch = env.channel("greeter-b:50051").await;
    let before = tally(&ch, 60, SAY_HELLO, &[]).await;
    assert!(
        served_by(&before, &pods, "v2") > 0,
        "without policy every pod serves: {before:?}"
    );

    env.cluster.kubectl_apply(SEED_002);
    wait_until("the VirtualService's route in force", WAIT, || {
        env.route_names("greeter-b.default:50051") == ["greeter-b/http[0]"]
    })
    .await;
    let after = tally(&ch, 200, SAY_HELLO, &[]).await;
    assert_eq!(served_by(&after, &pods, "v1"), 200, "{after:?}");
    assert_eq!(after.len(), 2, "both v1 pods serve: {after:?}");
    assert!(
        env.routes()["rejected"]
            .as_array()
            .is_none_or(Vec::is_empty)
    );
}

async fn payment_pods(cluster: &mut Cluster) -> Vec<PodBackend> {
    cluster
        .service(
            "payment-service",
            "10.96.0.30",
            &[
                ("payment-v1-a", &[("app", "payment"), ("version", "v1")]),
                ("payment-v1-b", &[("app", "payment"), ("version", "v1")]),
                ("payment-v2-a", &[("app", "payment"), ("version", "v2")]),
                ("payment-v2-b", &[("app", "payment"), ("version", "v2")]),
            ],
        )
        .await
}

/// The 80/20 split over 2,000 calls, within 5 points.
fn assert_split(t: &BTreeMap<String, usize>, v1: usize, v2: usize) {
    assert_eq!(v1 + v2, 2000, "{t:?}");
    let share = v1 as f64 / 2000.0;
    eprintln!(
        "split over 2,000 calls: v1 {v1}, v2 {v2} ({:.1}% / {:.1}%)",
        share * 100.0,
        100.0 - share * 100.0
    );
    assert!(
        (0.75..=0.85).contains(&share),
        "v1 took {:.1}% of 2,000 calls (80% ± 5 wanted): {t:?}",
        share * 100.0
    );
}

#[tokio::test]
async fn seed_004_method_and_header_matches_and_the_80_20_split() {
    let mut cluster = Cluster::new(true).await;
    let pods = payment_pods(&mut cluster).await;
    let env = start(cluster).await;
    wait_until("payment-service's 4 endpoints", WAIT, || {
        env.ready_endpoints("payment-service.default:50051") == 4
    })
    .await;
    env.cluster.kubectl_apply(SEED_004);
    wait_until("the three routes in force", WAIT, || {
        env.route_names("payment-service.default:50051").len() == 3
    })
    .await;
    let routes = env.routes();
    let svc = &routes["services"][0];
    assert_eq!(svc["load_balancer"], "least-request", "{routes}");
    let ch = env.channel("payment-service:50051").await;

    let prod = tally(&ch, 100, PROCESS, &[("x-environment", "production")]).await;
    assert_eq!(served_by(&prod, &pods, "v1"), 100, "{prod:?}");
    let testing = tally(&ch, 100, REFUND, &[("x-environment", "testing")]).await;
    assert_eq!(served_by(&testing, &pods, "v2"), 100, "{testing:?}");
    let testing = tally(&ch, 50, PROCESS, &[("x-environment", "testing")]).await;
    assert_eq!(served_by(&testing, &pods, "v2"), 50, "{testing:?}");

    // Everything else: 80/20, production calls of another method included.
    let rest = tally(&ch, 2000, REFUND, &[("x-environment", "production")]).await;
    assert_split(
        &rest,
        served_by(&rest, &pods, "v1"),
        served_by(&rest, &pods, "v2"),
    );
}

#[tokio::test]
async fn the_same_split_as_a_grpc_route_gives_the_same_result() {
    let mut cluster = Cluster::new(true).await;
    cluster
        .service(
            "payment-service",
            "10.96.0.30",
            &[("payment-a", &[("app", "payment")])],
        )
        .await;
    let v1 = cluster
        .service(
            "payment-v1",
            "10.96.0.31",
            &[
                ("payment-v1-a", &[("app", "payment"), ("version", "v1")]),
                ("payment-v1-b", &[("app", "payment"), ("version", "v1")]),
            ],
        )
        .await;
    let v2 = cluster
        .service(
            "payment-v2",
            "10.96.0.32",
            &[
                ("payment-v2-a", &[("app", "payment"), ("version", "v2")]),
                ("payment-v2-b", &[("app", "payment"), ("version", "v2")]),
            ],
        )
        .await;
    let pods: Vec<PodBackend> = v1.into_iter().chain(v2).collect();
    let env = start(cluster).await;
    env.cluster.kubectl_apply(SPLIT_GRPCROUTE);
    wait_until("the GRPCRoute's rules in force", WAIT, || {
        env.route_names("payment-service.default:50051").len() == 3
    })
    .await;
    let ch = env
        .channel("payment-service.default.svc.cluster.local:50051")
        .await;
    let prod = tally(&ch, 100, PROCESS, &[("x-environment", "production")]).await;
    assert_eq!(served_by(&prod, &pods, "v1"), 100, "{prod:?}");
    let testing = tally(&ch, 100, REFUND, &[("x-environment", "testing")]).await;
    assert_eq!(served_by(&testing, &pods, "v2"), 100, "{testing:?}");
    let rest = tally(&ch, 2000, REFUND, &[("x-environment", "production")]).await;
    assert_split(
        &rest,
        served_by(&rest, &pods, "v1"),
        served_by(&rest, &pods, "v2"),
    );
    assert!(
        !rest.contains_key("payment-a"),
        "the parent's own pod takes none: {rest:?}"
    );
}

#[tokio::test]
async fn an_unknown_subset_is_refused_and_the_last_good_policy_keeps_serving() {
    let (env, pods) = greeter_b_env(true).await;
    env.cluster.kubectl_apply(SEED_002);
    wait_until("seed 002 in force", WAIT, || {
        env.route_names("greeter-b.default:50051") == ["greeter-b/http[0]"]
    })
    .await;
    let ch = env.channel("greeter-b:50051").await;
    assert_eq!(
        served_by(&tally(&ch, 30, SAY_HELLO, &[]).await, &pods, "v1"),
        30
    );

    // The VirtualService now names a subset no DestinationRule defines.
    let broken = SEED_002
        .split("\n---\n")
        .next()
        .unwrap()
        .replace("subset: v1", "subset: v3");
    env.cluster.kubectl_apply(&broken);
    let refused = |env: &Env| -> Option<Value> {
        env.routes()["rejected"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["kind"] == "VirtualService" && r["name"] == "default/greeter-b")
            .cloned()
    };
    wait_until("the VirtualService refused", WAIT, || {
        refused(&env).is_some()
    })
    .await;
    let r = refused(&env).unwrap();
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason
            .contains("subset: \"v3\" is not defined by any DestinationRule of default/greeter-b")
            && reason.contains("last good routes stay in force"),
        "{r}"
    );
    // The last good policy serves: v1 only, every call.
    let after = tally(&ch, 200, SAY_HELLO, &[]).await;
    assert_eq!(served_by(&after, &pods, "v1"), 200, "{after:?}");
    // The refusal in `inspect routes`, as a metric and in the log.
    let out = std::process::Command::new(agent_bin())
        .args(["inspect", "--admin", &env.agent.admin.to_string(), "routes"])
        .output()
        .expect("inspect routes");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("REFUSED") && text.contains("\"v3\" is not defined"),
        "{text}"
    );
    assert!(
        text.contains("greeter-b/http[0]"),
        "the last good route is shown: {text}"
    );
    let m = metric(
        &env.agent.metrics(),
        "balancer_policy_rejected",
        &["kind=\"VirtualService\"", "name=\"default/greeter-b\""],
    );
    assert_eq!(m, 1.0);
    wait_until("the refusal logged", WAIT, || {
        !env.log_lines("traffic policy refused").is_empty()
    })
    .await;

    // Fixed: in force again, nothing refused.
    env.cluster.kubectl_apply(SEED_002);
    wait_until("no refusal", WAIT, || refused(&env).is_none()).await;
}

#[tokio::test]
async fn without_the_crds_the_agent_runs_and_says_what_it_watches() {
    let (env, pods) = greeter_b_env(false).await;
    let ch = env.channel("greeter-b:50051").await;
    let t = tally(&ch, 60, SAY_HELLO, &[]).await;
    assert_eq!(t.values().sum::<usize>(), 60);
    assert!(served_by(&t, &pods, "v2") > 0, "every pod serves: {t:?}");
    let said = env.log_lines("traffic policy kinds");
    assert_eq!(said.len(), 1, "said once: {said:?}");
    assert_eq!(said[0]["fields"]["watching"], "");
    assert_eq!(
        said[0]["fields"]["not_served"],
        "virtualservices.networking.istio.io, destinationrules.networking.istio.io, \
         grpcroutes.gateway.networking.k8s.io"
    );
    assert!(
        env.log_lines("watch failed; retrying, keeping the last known objects")
            .is_empty()
    );
    assert!(
        env.routes()["services"]
            .as_array()
            .is_none_or(Vec::is_empty)
    );

    // Istio installed later: found at the next look (every 30 s), and its objects followed.
    env.cluster
        .api
        .install(&[Kind::VirtualService, Kind::DestinationRule]);
    env.cluster.kubectl_apply(SEED_002);
    wait_until(
        "the new kinds watched and seed 002 in force",
        Duration::from_secs(45),
        || env.route_names("greeter-b.default:50051") == ["greeter-b/http[0]"],
    )
    .await;
    let said = env.log_lines("traffic policy kinds");
    assert_eq!(
        said.last().unwrap()["fields"]["watching"],
        "virtualservices.networking.istio.io v1, destinationrules.networking.istio.io v1"
    );
    assert_eq!(
        served_by(&tally(&ch, 60, SAY_HELLO, &[]).await, &pods, "v1"),
        60
    );

    // Istio removed: its objects go with it, calls go to every pod again, no error loop.
    env.cluster.api.uninstall(Kind::VirtualService);
    env.cluster.api.uninstall(Kind::DestinationRule);
    wait_until("the policy gone", WAIT, || {
        env.routes()["services"]
            .as_array()
            .is_none_or(Vec::is_empty)
    })
    .await;
    let t = tally(&ch, 60, SAY_HELLO, &[]).await;
    assert!(
        served_by(&t, &pods, "v2") > 0,
        "every pod serves again: {t:?}"
    );
    let requests = env.cluster.api.requests();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        env.cluster.api.requests() - requests < 10,
        "no request loop against the removed kinds"
    );
}

/// Routes on the caller: a VirtualService whose first rule matches `sourceNamespace` and
/// `sourceLabels` takes the calls of the pod of this node that makes them (known by its
/// address: the test's client connects from 127.0.0.1, the Pod object's `podIP`), and the calls
/// of any other caller go on to the next rule.
#[tokio::test]
async fn a_source_match_takes_the_calls_of_the_pod_it_names() {
    let mut cluster = Cluster::new(true).await;
    let pods = greeter_b(&mut cluster).await;
    // The caller: a pod of this node in an opted-in namespace, at the client's address.
    let caller = |labels: &[(&str, &str)]| {
        let mut p = pod(
            "frontend",
            "web-1",
            "00000000-0000-4000-8000-0000000000f1",
            NODE,
            labels,
            false,
        );
        p["status"]["podIP"] = "127.0.0.1".into();
        p["status"]["podIPs"] = serde_json::json!([{"ip": "127.0.0.1"}]);
        p
    };
    cluster.api.apply_all([
        balancer_tests::apiserver::objects::namespace(
            "frontend",
            &[("balancer.dev/enabled", "true")],
        ),
        caller(&[("app", "web")]),
    ]);
    cluster.kubectl_apply(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: greeter-b-by-caller
spec:
  hosts: [greeter-b]
  http:
  - name: web
    match:
    - sourceNamespace: frontend
      sourceLabels:
        app: web
    route:
    - destination:
        host: greeter-b
        subset: v2
  - name: others
    route:
    - destination:
        host: greeter-b
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: greeter-b
spec:
  host: greeter-b
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
"#,
    );
    let env = start(cluster).await;
    wait_until("greeter-b's 3 endpoints and both routes", WAIT, || {
        env.ready_endpoints("greeter-b.default:50051") == 3
            && env.route_names("greeter-b.default:50051").len() == 2
    })
    .await;
    wait_until("the caller pod known", WAIT, || {
        env.agent
            .json("/api/opted_in")
            .to_string()
            .contains("web-1")
    })
    .await;
    let web = tally(&env.channel("greeter-b:50051").await, 40, SAY_HELLO, &[]).await;
    assert_eq!(served_by(&web, &pods, "v2"), 40, "web's calls: {web:?}");

    // The same pod relabelled is another caller: once the agent has seen the change, its next
    // connection takes the other rule.
    env.cluster.api.apply(caller(&[("app", "batch")]));
    let deadline = tokio::time::Instant::now() + WAIT;
    let other = loop {
        let t = tally(&env.channel("greeter-b:50051").await, 20, SAY_HELLO, &[]).await;
        if served_by(&t, &pods, "v1") == 20 || tokio::time::Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(served_by(&other, &pods, "v1"), 20, "{other:?}");
    assert_eq!(served_by(&other, &pods, "v2"), 0, "{other:?}");
}

/// A DestinationRule's `consistentHash.httpHeaderName` (seed 004's session affinity): calls
/// with one key land on one pod, and the keys spread over the pods.
#[tokio::test]
async fn a_destination_rules_consistent_hash_keeps_a_key_on_one_pod() {
    let mut cluster = Cluster::new(true).await;
    let pods = greeter_b(&mut cluster).await;
    cluster.kubectl_apply(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: greeter-b
spec:
  host: greeter-b
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpHeaderName: x-user
"#,
    );
    let env = start(cluster).await;
    wait_until("greeter-b's 3 endpoints and its policy", WAIT, || {
        env.ready_endpoints("greeter-b.default:50051") == 3
            && env.routes()["services"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["service"] == "greeter-b.default:50051"))
    })
    .await;
    let ch = env.channel("greeter-b:50051").await;
    let mut owners = std::collections::BTreeSet::new();
    for user in [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ] {
        let t = tally(&ch, 10, SAY_HELLO, &[("x-user", user)]).await;
        assert_eq!(t.len(), 1, "{user}'s 10 calls on one pod: {t:?}");
        owners.extend(t.into_keys());
    }
    assert!(
        owners.len() >= 2,
        "8 keys spread over the 3 pods: {owners:?} of {:?}",
        pods.iter().map(|p| &p.name).collect::<Vec<_>>()
    );
}

/// Seed 004's "Timeouts and Retries" VirtualService (`grpc-timeouts`, verbatim) and its
/// `grpc-lb` DestinationRule with the article's circuit breaking (`outlierDetection`) under the
/// same `trafficPolicy`, as the article lays them out.
const SEED_004_TIMEOUTS: &str = r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: grpc-timeouts
spec:
  hosts:
  - grpc-service
  http:
  - route:
    - destination:
        host: grpc-service
    timeout: 10s  # Overall request timeout
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: "cancelled,deadline-exceeded,internal,resource-exhausted"
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: grpc-lb
spec:
  host: grpc-service
  trafficPolicy:
    loadBalancer:
      simple: LEAST_CONN  # Better than ROUND_ROBIN for gRPC
    connectionPool:
      http:
        http2MaxRequests: 1000  # Max concurrent HTTP/2 requests
        maxRequestsPerConnection: 100  # Force connection cycling
    outlierDetection:
      consecutiveErrors: 5
      interval: 30s
      baseEjectionTime: 30s
      maxEjectionPercent: 100
"#;

/// The agent's samples of `name` with `labels`, summed.
fn sample(env: &Env, name: &str, labels: &[&str]) -> f64 {
    metric(&env.agent.metrics(), name, labels)
}

/// Seed 004's retries, timeouts, connection pool and outlier detection applied unchanged
/// behave as written: `retryOn` names what is retried (INTERNAL three more times, UNAVAILABLE
/// not), `timeout` bounds what the endpoint is told, `perTryTimeout` cuts each attempt,
/// `consecutiveErrors: 5` ejects an endpoint at its fifth failure in a row (the node-wide
/// default would wait for 7), and `inspect routes` shows the DestinationRule's settings.
#[tokio::test]
async fn seed_004_retries_timeouts_and_circuit_breaking_behave_as_written() {
    let mut cluster = Cluster::new(true).await;
    payment_pods(&mut cluster).await;
    cluster
        .service(
            "grpc-service",
            "10.96.0.40",
            &[
                ("grpc-service-a", &[("app", "grpc-service")]),
                ("grpc-service-b", &[("app", "grpc-service")]),
            ],
        )
        .await;
    let env = start(cluster).await;
    env.cluster.kubectl_apply(SEED_004);
    env.cluster.kubectl_apply(SEED_004_TIMEOUTS);
    wait_until("both policies in force", WAIT, || {
        env.route_names("payment-service.default:50051").len() == 3
            && env.route_names("grpc-service.default:50051").len() == 1
            && env.ready_endpoints("grpc-service.default:50051") == 2
    })
    .await;
    let payment = "service=\"payment-service.default:50051\"";
    let grpc = "service=\"grpc-service.default:50051\"";

    // The production route: 3 retries of INTERNAL, none of UNAVAILABLE.
    let ch = env.channel("payment-service:50051").await;
    let prod = [("x-environment", "production")];
    let failing = |code: tonic::Code| HelloRequest {
        fail_code: code as i32,
        ..Default::default()
    };
    let e = call_with(&ch, PROCESS, &prod, failing(tonic::Code::Internal))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Internal);
    let retries = |svc: &str, condition: &str| {
        let condition = format!("condition=\"{condition}\"");
        sample(&env, "balancer_call_retries_total", &[svc, &condition])
    };
    assert_eq!(retries(payment, "internal"), 3.0);
    let e = call_with(&ch, PROCESS, &prod, failing(tonic::Code::Unavailable))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert_eq!(retries(payment, "unavailable"), 0.0, "not in retryOn");
    // `timeout: 15s`: the endpoint is told at most that.
    let ok = call_with(&ch, PROCESS, &prod, HelloRequest::default())
        .await
        .unwrap();
    let told = ok.metadata().get("x-received-grpc-timeout").unwrap();
    let told = told.to_str().unwrap();
    assert!(told.ends_with('m') || told.ends_with('u'), "{told}");
    let ms: f64 = told[..told.len() - 1].parse().unwrap();
    let ms = if told.ends_with('u') { ms / 1000.0 } else { ms };
    assert!(ms <= 15_000.0 && ms > 14_000.0, "told {told}");

    // grpc-service: `perTryTimeout: 2s` cuts each attempt of a 3 s call; the client's 5 s
    // deadline (sooner than the route's 10 s) ends the third attempt.
    let ch = env.channel("grpc-service:50051").await;
    let started = std::time::Instant::now();
    let mut slow = Request::new(HelloRequest {
        sleep_ms: 3000,
        ..Default::default()
    });
    slow.set_timeout(Duration::from_secs(5));
    let mut client = balancer_tests::pb::greeter_client::GreeterClient::new(ch.clone());
    let e = client.say_hello(slow).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(
            e.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{e:?}"
    );
    assert!(
        took >= Duration::from_millis(4900) && took < Duration::from_secs(7),
        "{took:?}"
    );
    assert_eq!(retries(grpc, "per_try_timeout"), 2.0);

    // `consecutiveErrors: 5`: each failing call makes 4 attempts over the two pods (2 each);
    // after 2 calls each pod failed 4 times in a row, after 3 calls 6: ejected at the 5th.
    let eps = |env: &Env| -> Vec<String> {
        env.agent
            .json("/api/endpoints?service=grpc-service.default:50051")
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["health"].as_str().unwrap().to_string())
            .collect()
    };
    for i in 0..3 {
        let e = client
            .say_hello(failing(tonic::Code::Internal))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
        if i == 1 {
            assert_eq!(eps(&env), ["ready", "ready"], "4 failures each: not yet");
        }
    }
    assert_eq!(eps(&env), ["ejected", "ejected"]);
    // Ejected for `baseEjectionTime: 30s`: still out a while later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(eps(&env), ["ejected", "ejected"]);

    // What inspect shows of the DestinationRules.
    let routes = env.routes();
    let svc = routes["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "grpc-service.default:50051")
        .unwrap();
    let r = &svc["resilience"];
    assert_eq!(r["connection_pool"]["max_requests"], 1000, "{routes}");
    assert_eq!(r["connection_pool"]["max_requests_per_connection"], 100);
    assert_eq!(r["outlier_detection"]["consecutive_errors"], 5);
    assert_eq!(r["outlier_detection"]["base_ejection"], "30000ms");
    let route = &svc["routes"][0];
    assert_eq!(route["timeout_ms"], 10_000);
    assert_eq!(route["retries"]["attempts"], 3);
    assert_eq!(route["retries"]["per_try_timeout"], "2000ms");
}
