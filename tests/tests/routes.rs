//! Traffic policy from the configuration file, through a real agent with real gRPC clients and
//! backends: method and header matches, weighted splits, subsets by endpoint labels, header
//! changes, policy changes under load, and what `inspect routes` / `inspect explain` say.
//! Each backend answers with its name, so every call says where it landed.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use balancer_tests::{
    agent::{Agent, agent_bin, metric},
    free_port, greeter,
    harness::client,
    pb::HelloRequest,
    wait_until,
};
use serde_json::Value;

/// An agent with service `payment` over four backends labelled `version: v1` (two) and `v2`
/// (two), and the `routes` section `routes`.
struct Mesh {
    agent: Agent,
    listen: SocketAddr,
    base: String,
    _backends: Vec<greeter::Handle>,
}

impl Mesh {
    async fn start(routes: &str) -> Self {
        let mut backends = Vec::new();
        let mut eps = String::new();
        for (name, version) in [
            ("v1-a", "v1"),
            ("v1-b", "v1"),
            ("v2-a", "v2"),
            ("v2-b", "v2"),
        ] {
            let b = greeter::spawn("127.0.0.1:0", name).await;
            eps += &format!(
                "      - address: {}\n        name: {name}\n        labels: {{version: {version}, app: payment}}\n",
                b.addr
            );
            backends.push(b);
        }
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let base = format!(
            "listeners:\n  - address: {listen}\n    default_service: payment\nadmin:\n  address: {admin}\n\
             services:\n  - name: payment\n    authorities: [payment.default.svc.cluster.local]\n    \
             vips: [\"10.96.0.20:50051\"]\n    policy: round-robin\n    endpoints:\n{eps}"
        );
        let agent = Agent::start(&format!("{base}{routes}"), admin).await;
        Self {
            agent,
            listen,
            base,
            _backends: backends,
        }
    }

    /// Replaces the `routes` section; returns once the agent has it in force.
    async fn set_routes(&self, routes: &str, in_force: impl Fn(&Value) -> bool) {
        self.agent.rewrite_config(&format!("{}{routes}", self.base));
        let admin = &self.agent;
        wait_until("the new routes in force", Duration::from_secs(10), || {
            in_force(&admin.json("/api/routes"))
        })
        .await;
    }
}

/// The subsets every test declares.
const SUBSETS: &str = "routes:\n  - service: payment\n    subsets:\n      - {name: v1, labels: {version: v1}}\n      - {name: v2, labels: {version: v2}}\n";

/// `n` unary calls with `headers`: the count of calls per backend name.
async fn spread(
    listen: SocketAddr,
    n: usize,
    headers: &[(&'static str, &'static str)],
) -> HashMap<String, usize> {
    let mut c = client(listen).await;
    let mut by = HashMap::new();
    for _ in 0..n {
        let mut req = tonic::Request::new(HelloRequest::default());
        for (k, v) in headers {
            req.metadata_mut().insert(*k, v.parse().unwrap());
        }
        let reply = c.say_hello(req).await.expect("call").into_inner();
        *by.entry(reply.backend).or_default() += 1;
    }
    by
}

fn version_of(backend: &str) -> &'static str {
    if backend.starts_with("v1") {
        "v1"
    } else {
        "v2"
    }
}

fn by_version(by: &HashMap<String, usize>) -> HashMap<&'static str, usize> {
    let mut v = HashMap::new();
    for (b, n) in by {
        *v.entry(version_of(b)).or_default() += n;
    }
    v
}

/// Runs `balancer-agent inspect ARGS` against `admin`: (success, stdout, stderr).
fn inspect(admin: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(agent_bin())
        .args(["inspect", "--admin", &admin.to_string()])
        .args(args)
        .output()
        .expect("running inspect");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn inspect_json(admin: SocketAddr, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let (ok, out, err) = inspect(admin, &all);
    assert!(ok, "inspect {args:?} failed: {err}");
    serde_json::from_str(&out).expect("JSON")
}

/// Seed 004's VirtualService, as the file writes it: ProcessPayment with
/// `x-environment: production` to v1 (15 s timeout), the service's methods with
/// `x-environment: testing` to v2, everything else split 80/20. Here with the greeter's
/// methods: SayHello for ProcessPayment.
const SEED_004: &str = "    rules:
      - name: production
        match:
          - path: {exact: /helloworld.Greeter/SayHello}
            headers: {x-environment: {exact: production}}
        backends: [{subset: v1}]
        timeout_ms: 15000
      - name: testing
        match:
          - path: {prefix: /helloworld.Greeter/}
            headers: {x-environment: {exact: testing}}
        backends: [{subset: v2}]
        request_headers: {set: {x-echo-routed: testing}}
      - name: split
        backends: [{subset: v1, weight: 80}, {subset: v2, weight: 20}]
";

#[tokio::test]
async fn method_and_header_matches_land_as_written_and_the_split_is_80_20() {
    let mesh = Mesh::start(&format!("{SUBSETS}{SEED_004}")).await;
    // The header match: every call to v1, or to v2.
    let prod = by_version(&spread(mesh.listen, 200, &[("x-environment", "production")]).await);
    assert_eq!(prod, HashMap::from([("v1", 200)]), "production");
    let testing = by_version(&spread(mesh.listen, 200, &[("x-environment", "testing")]).await);
    assert_eq!(testing, HashMap::from([("v2", 200)]), "testing");
    // Both endpoints of the subset take calls (round-robin within it).
    let within = spread(mesh.listen, 100, &[("x-environment", "testing")]).await;
    assert!(
        within.len() == 2 && within.values().all(|n| *n >= 30),
        "{within:?}"
    );

    // The route's header change reaches the backend (which echoes x-echo-*).
    let mut c = client(mesh.listen).await;
    let mut req = tonic::Request::new(HelloRequest::default());
    req.metadata_mut()
        .insert("x-environment", "testing".parse().unwrap());
    let resp = c.say_hello(req).await.expect("call");
    assert_eq!(
        resp.metadata()
            .get("x-echo-routed")
            .map(|v| v.to_str().unwrap()),
        Some("testing")
    );

    // The method match: a stream call with the production header is no SayHello: split.
    // Nothing else matches: 80/20 within ±5% over 2,000 calls.
    let n = 2_000;
    let split = by_version(&spread(mesh.listen, n, &[]).await);
    let v1 = *split.get("v1").unwrap_or(&0) as f64 / n as f64;
    assert!(
        (0.75..=0.85).contains(&v1),
        "v1 took {v1} of the split: {split:?}"
    );
    assert_eq!(split.values().sum::<usize>(), n);

    let mut stream_calls = HashMap::<String, usize>::new();
    for _ in 0..200 {
        let mut req = tonic::Request::new(HelloRequest {
            count: 1,
            ..HelloRequest::default()
        });
        req.metadata_mut()
            .insert("x-environment", "production".parse().unwrap());
        let mut s = c.say_hello_stream(req).await.expect("stream").into_inner();
        let r = s.message().await.expect("reply").expect("one");
        *stream_calls
            .entry(version_of(&r.backend).into())
            .or_default() += 1;
    }
    assert!(
        stream_calls.get("v2").is_some_and(|n| *n > 10),
        "SayHelloStream is not the production route's method: split {stream_calls:?}"
    );

    // Every call counted with its route and subset.
    let m = mesh.agent.metrics();
    let routed = |route: &str, subset: &str| {
        metric(
            &m,
            "balancer_route_calls_total",
            &[
                &format!("route=\"{route}\""),
                &format!("destination_subset=\"{subset}\""),
                "grpc_status=\"0\"",
            ],
        )
    };
    assert_eq!(routed("production", "v1"), 200.0);
    assert_eq!(routed("testing", "v2"), 301.0);
    assert!(routed("split", "v1") > 1_400.0, "{m}");
    assert!(
        metric(&m, "istio_requests_total", &["destination_version=\"v2\""]) >= 301.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_subset_by_labels_takes_every_call_as_seed_002_routes_greeter_b_to_v1() {
    // Seed 002: one route, no match, destination subset v1.
    let mesh = Mesh::start(&format!(
        "{SUBSETS}    rules:\n      - name: greeter-b\n        backends: [{{subset: v1}}]\n"
    ))
    .await;
    let by = spread(mesh.listen, 300, &[]).await;
    assert_eq!(by_version(&by), HashMap::from([("v1", 300)]), "{by:?}");
    assert_eq!(by.len(), 2, "both v1 endpoints: {by:?}");
}

#[tokio::test]
async fn routes_added_changed_and_removed_under_load_fail_no_call() {
    let mesh = Mesh::start("").await;
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (stop, failed, done) = (stop.clone(), failed.clone(), done.clone());
        let mut c = client(mesh.listen).await;
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Relaxed) {
                // Some calls take a while, so that changes happen while they are in flight.
                let req = HelloRequest {
                    sleep_ms: if done.load(Relaxed) % 5 == 0 { 30 } else { 0 },
                    ..HelloRequest::default()
                };
                match c.say_hello(req).await {
                    Ok(r) => seen.push(r.into_inner().backend),
                    Err(e) => {
                        eprintln!("call failed: {e}");
                        failed.fetch_add(1, Relaxed);
                    }
                }
                done.fetch_add(1, Relaxed);
            }
            seen
        }));
    }
    let rules = |subset: &str| {
        format!(
            "{SUBSETS}    rules:\n      - name: pin\n        backends: [{{subset: {subset}}}]\n"
        )
    };
    let calls_now = || done.load(Relaxed);
    let mut at = calls_now();
    let pinned = |want: &'static str| {
        move |v: &Value| {
            v["services"][0]["routes"][0]["backends"][0]["subset"] == Value::String(want.into())
        }
    };
    for round in 0..3 {
        // Added (or changed back), changed, removed: each with calls before the next.
        mesh.set_routes(&rules("v1"), pinned("v1")).await;
        wait_until("calls on v1", Duration::from_secs(10), || {
            calls_now() > at + 300
        })
        .await;
        at = calls_now();
        mesh.set_routes(&rules("v2"), pinned("v2")).await;
        wait_until("calls on v2", Duration::from_secs(10), || {
            calls_now() > at + 300
        })
        .await;
        at = calls_now();
        mesh.set_routes("", |v| v["services"].as_array().is_some_and(Vec::is_empty))
            .await;
        wait_until("calls without routes", Duration::from_secs(10), || {
            calls_now() > at + 300
        })
        .await;
        at = calls_now();
        eprintln!("round {round}: {at} calls, {} failed", failed.load(Relaxed));
    }
    stop.store(true, Relaxed);
    let mut seen = Vec::new();
    for t in tasks {
        seen.extend(t.await.unwrap());
    }
    assert_eq!(failed.load(Relaxed), 0, "calls failed during route changes");
    assert!(seen.len() > 2_700, "{} calls", seen.len());
    // While pinned, the calls landed where the route said: every backend took calls overall,
    // and the metrics counted the pinned route on each subset.
    let m = mesh.agent.metrics();
    for subset in ["v1", "v2"] {
        let n = metric(
            &m,
            "balancer_route_calls_total",
            &["route=\"pin\"", &format!("destination_subset=\"{subset}\"")],
        );
        assert!(n >= 600.0, "pin to {subset}: {n}\n{m}");
    }
}

#[tokio::test]
async fn inspect_routes_and_explain_say_which_route_takes_a_call_and_why_the_others_do_not() {
    let mesh = Mesh::start(&format!("{SUBSETS}{SEED_004}")).await;
    let admin = mesh.agent.admin;

    let (ok, text, err) = inspect(admin, &["routes"]);
    assert!(ok, "{err}");
    for needle in [
        "SERVICE payment (policy from File)",
        "1. production  [file]",
        "match:   path = \"/helloworld.Greeter/SayHello\", header x-environment = \"production\"",
        "backend: payment subset v1 (version=v1) weight 1 (100%), round-robin:",
        "timeout: 15000 ms",
        "3. split  [file]",
        "backend: payment subset v1 (version=v1) weight 80 (80%)",
        "backend: payment subset v2 (version=v2) weight 20 (20%)",
    ] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }
    let routes = inspect_json(admin, &["routes", "payment"]);
    let split = &routes["services"][0]["routes"][2];
    assert_eq!(
        split["backends"][0]["endpoints"].as_array().unwrap().len(),
        2
    );

    // A matched call: the testing route, and why production did not take it.
    let args = [
        "explain",
        "--to",
        "payment.default.svc.cluster.local:50051",
        "--method",
        "/helloworld.Greeter/SayHello",
        "-H",
        "x-environment: testing",
    ];
    let (ok, text, err) = inspect(admin, &args);
    assert!(ok, "{err}");
    for needle in [
        "service:  payment",
        "decision: route testing (file) takes the call",
        "payment subset v2 (version=v2) weight 1 (100%), round-robin:",
        "production  [file]: header x-environment: \"testing\" is not = \"production\"",
        "split  [file]: comes after route testing, which takes the call",
    ] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }
    let e = inspect_json(admin, &args);
    assert_eq!(e["route"]["name"], "testing");
    let eps = e["backends"][0]["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2);

    // An unmatched call (by VIP): no header, so the split takes it; a call to a method of
    // another service matches neither header route.
    let e = inspect_json(
        admin,
        &[
            "explain",
            "--to",
            "10.96.0.20:50051",
            "--method",
            "/other.Svc/Do",
        ],
    );
    assert_eq!(e["route"]["name"], "split", "{e:#}");
    assert_eq!(e["backends"][0]["percent"], 80.0);
    let why: Vec<&str> = e["others"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|o| o["why"].as_array().unwrap())
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(
        why,
        [
            "path \"/other.Svc/Do\" is not = \"/helloworld.Greeter/SayHello\"",
            "path \"/other.Svc/Do\" is not prefix \"/helloworld.Greeter/\""
        ]
    );

    // Without routes: none takes the call, every endpoint of the service does.
    mesh.set_routes("", |v| v["services"].as_array().is_some_and(Vec::is_empty))
        .await;
    let (ok, text, _) = inspect(
        admin,
        &[
            "explain",
            "--to",
            "payment",
            "--method",
            "/helloworld.Greeter/SayHello",
        ],
    );
    assert!(ok);
    assert!(
        text.contains(
            "decision: no traffic policy names this service: every endpoint of service payment"
        ),
        "{text}"
    );
    // The route's decision names the 4 endpoints, then why each gets its share.
    let (decision, picks) = text.split_once("which endpoint").expect("the picks");
    assert_eq!(decision.matches("127.0.0.1:").count(), 4, "{text}");
    assert_eq!(picks.matches("127.0.0.1:").count(), 4, "{text}");
}

#[tokio::test]
async fn an_unknown_service_is_an_error_and_admin_queries_are_url_decoded() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let b = greeter::spawn("127.0.0.1:0", "g").await;
    let config = format!(
        "listeners:\n  - address: {listen}\nadmin:\n  address: {admin}\nservices:\n  - name: \"g.default:50051\"\n    endpoints:\n      - address: {}\n",
        b.addr
    );
    let agent = Agent::start(&config, admin).await;

    let (ok, out, err) = inspect(admin, &["endpoints", "nosuch"]);
    assert!(!ok, "exit status for an unknown service: {out}");
    assert!(err.contains("no service is named \"nosuch\""), "{err}");
    assert!(!err.contains("cannot reach"), "{err}");

    // The name has a colon: inspect encodes it, the admin API decodes it.
    let eps = inspect_json(admin, &["endpoints", "g.default:50051"]);
    assert_eq!(eps.as_array().unwrap().len(), 1);
    let (status, body) = agent
        .get("/api/endpoints?service=g.default%3A50051")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["address"], b.addr.to_string());

    let (ok, _, err) = inspect(admin, &["explain", "--to", "nosuch", "--method", "/a.B/C"]);
    assert!(!ok);
    assert!(
        err.contains("no service has VIP, authority or name \"nosuch\""),
        "{err}"
    );
}

#[tokio::test]
async fn a_routes_timeout_bounds_the_call_and_the_backend_is_told_the_time_left() {
    let mesh = Mesh::start(&format!(
        "{SUBSETS}    rules:\n      - name: slow\n        match:\n          - headers: {{x-slow: {{}}}}\n        backends: [{{subset: v1}}]\n        timeout_ms: 300\n"
    ))
    .await;
    let mut c = client(mesh.listen).await;
    // A quick call on the route: the backend got a grpc-timeout of at most the route's 300 ms,
    // though the client sent none.
    let mut req = tonic::Request::new(HelloRequest::default());
    req.metadata_mut().insert("x-slow", "1".parse().unwrap());
    let resp = c.say_hello(req).await.expect("call");
    let told = resp
        .metadata()
        .get("x-received-grpc-timeout")
        .expect("the backend was given a grpc-timeout")
        .to_str()
        .unwrap()
        .to_string();
    let (n, unit) = told.split_at(told.len() - 1);
    let ms = match unit {
        "m" => n.parse::<u64>().unwrap(),
        "u" => n.parse::<u64>().unwrap() / 1_000,
        "n" => n.parse::<u64>().unwrap() / 1_000_000,
        _ => panic!("grpc-timeout {told}"),
    };
    assert!(ms > 0 && ms <= 300, "grpc-timeout {told}");
    // A call slower than the route's timeout ends at it: the proxy's DEADLINE_EXCEEDED, or the
    // backend's own answer to the time left it was told (tonic's server ends the handler with
    // CANCELLED "Timeout expired"), whichever comes first: both at the route's 300 ms.
    let mut req = tonic::Request::new(HelloRequest {
        sleep_ms: 3_000,
        ..HelloRequest::default()
    });
    req.metadata_mut().insert("x-slow", "1".parse().unwrap());
    let started = std::time::Instant::now();
    let err = c.say_hello(req).await.expect_err("the route's timeout");
    assert!(
        err.code() == tonic::Code::DeadlineExceeded
            || (err.code() == tonic::Code::Cancelled && err.message() == "Timeout expired"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // A sooner client deadline stays the one in force; calls off the route have none.
    let mut req = tonic::Request::new(HelloRequest::default());
    req.set_timeout(Duration::from_millis(100));
    req.metadata_mut().insert("x-slow", "1".parse().unwrap());
    let resp = c.say_hello(req).await.expect("call");
    let told = resp.metadata().get("x-received-grpc-timeout").unwrap();
    assert!(
        told.to_str().unwrap().ends_with(['m', 'u', 'n']),
        "{told:?}"
    );
    let resp = c
        .say_hello(HelloRequest::default())
        .await
        .expect("call off the route");
    assert!(resp.metadata().get("x-received-grpc-timeout").is_none());
}
