//! Operating the agent: configuration checks and reloads under load, and the admin API, with a
//! real `balancer-agent` process.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use balancer_tests::{
    agent::{TempDir, agent_bin, metric},
    greeter,
    harness::{client, config, hello, local_addr, setup_with},
    pb::{HelloRequest, greeter_client::GreeterClient},
    wait_until,
};
use tonic::{Code, transport::Channel};

const BOUND: Duration = Duration::from_secs(10);

/// A call on `c` that the backend holds for 30 s: in flight until the task is aborted.
fn hold_a_call(c: &GreeterClient<Channel>) -> tokio::task::JoinHandle<()> {
    let mut slow = c.clone();
    tokio::spawn(async move {
        let _ = slow
            .say_hello(HelloRequest {
                sleep_ms: 30_000,
                ..hello("held")
            })
            .await;
    })
}

#[test]
fn check_lists_every_problem_with_its_place_and_fails() {
    let dir = TempDir::new("balancer-check");
    let bad = dir.0.join("bad.yaml");
    std::fs::write(
        &bad,
        r#"
listeners:
  - address: 127.0.0.1:notaport
    default_service: nowhere
services:
  - name: greeter
    policy: fastest
    endpoints:
      - address: 10.0.0.1
      - address: 127.0.0.1:50051
admin:
  address: 10.1.2.3:15000
"#,
    )
    .unwrap();
    let out = std::process::Command::new(agent_bin())
        .args(["run", "--check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for needle in [
        "5 problems",
        "listeners[0].address: \"127.0.0.1:notaport\"",
        "listeners[0].default_service: no service is named \"nowhere\"",
        "services[0].policy: \"fastest\"",
        "services[0].endpoints[0].address: \"10.0.0.1\"",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    assert!(stderr.contains("admin.address"), "{stderr}");

    let good = dir.0.join("good.yaml");
    std::fs::write(
        &good,
        config(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            "p2c-ewma",
            &["127.0.0.1:3".parse().unwrap()],
            "",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(agent_bin())
        .args(["run", "--check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn reloads_take_effect_under_load_and_bad_files_are_refused() {
    let s = setup_with("round-robin", 2, "").await;
    let new = [
        greeter::spawn("127.0.0.1:0", "new-1").await,
        greeter::spawn("127.0.0.1:0", "new-2").await,
    ];
    let admin = s.agent.admin;
    let c = client(s.listen).await;

    // Calls flow all along; none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (mut c, stop, ok) = (c.clone(), stop.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                c.say_hello(HelloRequest {
                    sleep_ms: 2,
                    ..hello(&format!("t{t}"))
                })
                .await?;
                ok.fetch_add(1, Relaxed);
            }
            Ok::<(), tonic::Status>(())
        }));
    }
    wait_until("calls flowing", BOUND, || ok.load(Relaxed) > 50).await;

    // A new endpoint set.
    let addrs: Vec<SocketAddr> = new.iter().map(|b| b.addr).collect();
    s.agent
        .rewrite_config(&config(s.listen, admin, "round-robin", &addrs, ""));
    wait_until("calls on the new endpoints", BOUND, || {
        new.iter().all(|b| b.stats.calls.load(Relaxed) > 10)
    })
    .await;
    let old_calls: Vec<u64> = s
        .backends
        .iter()
        .map(|b| b.stats.calls.load(Relaxed))
        .collect();
    let on_new: u64 = new.iter().map(|b| b.stats.calls.load(Relaxed)).sum();
    wait_until("100 more calls", BOUND, || {
        new.iter().map(|b| b.stats.calls.load(Relaxed)).sum::<u64>() > on_new + 100
    })
    .await;
    let old_after: Vec<u64> = s
        .backends
        .iter()
        .map(|b| b.stats.calls.load(Relaxed))
        .collect();
    assert_eq!(old_calls, old_after, "removed endpoints still get calls");
    let m = s.agent.metrics();
    assert_eq!(
        metric(&m, "balancer_config_reloads_total", &["result=\"ok\""]),
        1.0
    );

    // A bad file: refused, counted, the previous configuration stays and calls go on.
    s.agent
        .rewrite_config("listeners: [\n  this is not yaml: : :\n");
    wait_until("the bad file to be refused", BOUND, || {
        metric(
            &s.agent.metrics(),
            "balancer_config_reloads_total",
            &["result=\"rejected\""],
        ) == 1.0
    })
    .await;
    let before = ok.load(Relaxed);
    wait_until("calls still flowing", BOUND, || {
        ok.load(Relaxed) > before + 100
    })
    .await;
    let dump = s.agent.json("/config_dump");
    let eps: Vec<&str> = dump["services"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap())
        .collect();
    assert_eq!(
        eps,
        addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "{dump}"
    );

    stop.store(true, Relaxed);
    for t in tasks {
        t.await.unwrap().expect("no call fails across reloads");
    }
    println!("{} calls across two reloads, none failed", ok.load(Relaxed));
}

#[tokio::test]
async fn admin_reports_readiness_metrics_and_the_config_in_force() {
    let s = setup_with("p2c-ewma", 2, "limits:\n  max_active_calls: 777\n").await;
    let (status, body) = s.agent.get("/ready").unwrap();
    assert_eq!((status, body.trim()), (200, "ready"));

    let mut c = client(s.listen).await;
    for _ in 0..5 {
        c.say_hello(HelloRequest {
            sleep_ms: 3,
            ..hello("m")
        })
        .await
        .unwrap();
    }
    let e = c
        .say_hello(HelloRequest {
            fail_code: Code::PermissionDenied as i32,
            ..hello("f")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // A call in flight shows in the active-call gauges.
    let held = hold_a_call(&c);
    wait_until("one active call", BOUND, || {
        let m = s.agent.metrics();
        metric(&m, "balancer_active_calls", &[]) == 1.0
            && metric(&m, "balancer_endpoint_in_flight", &["service=\"greeter\""]) == 1.0
    })
    .await;

    let m = s.agent.metrics();
    let method = "method=\"/helloworld.Greeter/SayHello\"";
    let service = "service=\"greeter\"";
    assert_eq!(
        metric(
            &m,
            "balancer_calls_total",
            &[service, method, "grpc_status=\"0\""]
        ),
        5.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "balancer_calls_total",
            &[service, method, "grpc_status=\"7\""]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "balancer_call_duration_seconds_count",
            &[service, method]
        ),
        6.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "balancer_call_duration_seconds_bucket",
            &[service, method, "le=\"+Inf\""]
        ) == 6.0,
        "{m}"
    );
    for b in &s.backends {
        let ep = format!("endpoint=\"{}\"", b.addr);
        assert!(
            m.lines()
                .any(|l| l.starts_with("balancer_endpoint_ewma_seconds") && l.contains(&ep)),
            "no EWMA for {ep}:\n{m}"
        );
        assert!(
            m.lines()
                .any(|l| l.starts_with("balancer_endpoint_in_flight") && l.contains(&ep)),
            "no in-flight figure for {ep}:\n{m}"
        );
    }
    assert!(
        metric(&m, "balancer_endpoint_ewma_seconds", &[service]) > 0.0,
        "{m}"
    );

    let dump = s.agent.json("/config_dump");
    assert_eq!(dump["limits"]["max_active_calls"], 777, "{dump}");
    assert_eq!(dump["services"][0]["name"], "greeter");
    assert_eq!(dump["services"][0]["policy"], "p2c-ewma");
    let eps: Vec<String> = dump["services"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = s.backends.iter().map(|b| b.addr.to_string()).collect();
    assert_eq!(eps, want);
    held.abort();
}

#[tokio::test]
async fn a_reload_puts_the_live_sections_in_force_and_leaves_the_others_waiting_for_a_restart() {
    let s = setup_with("round-robin", 2, "").await;
    let admin = s.agent.admin;
    let mut c = client(s.listen).await;
    let restart_required = |section: &str| {
        metric(
            &s.agent.metrics(),
            "balancer_config_restart_required",
            &[&format!("section=\"{section}\"")],
        )
    };
    let reloads = |result: &str| {
        metric(
            &s.agent.metrics(),
            "balancer_config_reloads_total",
            &[&format!("result=\"{result}\"")],
        )
    };
    // A file that changes a live section of each kind (services: one endpoint left; limits:
    // one call at a time; pool) beside the admin address, which is bound once at start.
    let first = s.backends[0].addr;
    let rewrite = |admin_address| {
        s.agent.rewrite_config(&config(
            s.listen,
            admin_address,
            "round-robin",
            &[first],
            "limits:\n  max_active_calls: 1\npool:\n  max_connections_per_endpoint: 3\n",
        ))
    };
    assert_eq!(restart_required("admin"), 0.0);

    let moved_admin = local_addr();
    rewrite(moved_admin);
    wait_until(
        "the reload, counted as waiting for a restart",
        BOUND,
        || reloads("restart_required") == 1.0,
    )
    .await;
    assert_eq!(restart_required("admin"), 1.0);
    assert_eq!(restart_required("listeners"), 0.0);
    assert_eq!(
        s.agent.json("/api/status")["restart_required"],
        serde_json::json!(["admin"])
    );

    // The dump is what runs: the admin server still where it was, the live sections new.
    let dump = s.agent.json("/config_dump");
    assert_eq!(dump["admin"]["address"], admin.to_string(), "{dump}");
    assert_eq!(dump["limits"]["max_active_calls"], 1, "{dump}");
    assert_eq!(dump["pool"]["max_connections_per_endpoint"], 3, "{dump}");
    assert_eq!(
        dump["services"][0]["endpoints"],
        serde_json::json!([{"address": first.to_string(), "zone": null, "node": null, "name": null}])
    );
    assert!(
        balancer_tests::agent::http_get(moved_admin, "/ready").is_err(),
        "the new admin address is not bound before a restart"
    );

    // And the live sections act: every call goes to the endpoint left, and a second call in
    // flight is over the new limit.
    for i in 0..4 {
        let r = c.say_hello(hello(&format!("n{i}"))).await.unwrap();
        assert_eq!(r.into_inner().backend, "backend-1");
    }
    let held = hold_a_call(&c);
    wait_until("one active call", BOUND, || {
        metric(&s.agent.metrics(), "balancer_active_calls", &[]) == 1.0
    })
    .await;
    let e = c.say_hello(hello("over")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("limits.max_active_calls"), "{e:?}");
    held.abort();

    // The file goes back to the admin address in force: nothing waits any more.
    rewrite(admin);
    wait_until("a reload with everything in force", BOUND, || {
        reloads("ok") == 1.0
    })
    .await;
    assert_eq!(restart_required("admin"), 0.0);
    assert_eq!(
        s.agent.json("/api/status")["restart_required"],
        serde_json::json!([])
    );
}
