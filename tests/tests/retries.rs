//! Retries, timeouts, circuit breakers and injected faults of a route (issue 16), through a
//! real `balancer-agent` process in front of real tonic backends, configured by the file's
//! `routes` section.

use std::{
    net::SocketAddr,
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use balancer_tests::{
    agent::{Agent, metric},
    greeter::{self, Handle, Options},
    harness::{agent, client, hello, hellos},
    pb::{HelloReply, HelloRequest, greeter_client::GreeterClient},
    wait_until,
};
use futures_util::StreamExt;
use tonic::{Code, Request, transport::Channel};

const BOUND: Duration = Duration::from_secs(20);

/// Backends with `options`, one per entry.
async fn backends(options: &[Options]) -> Vec<Handle> {
    let mut v = Vec::new();
    for (i, o) in options.iter().enumerate() {
        v.push(greeter::spawn_with("127.0.0.1:0", &format!("backend-{}", i + 1), o.clone()).await);
    }
    v
}

/// An agent (round robin) over `backends` with a `routes` entry for service `greeter`.
async fn agent_with_routes(backends: &[Handle], routes: &str) -> (Agent, SocketAddr) {
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    agent(
        "round-robin",
        &addrs,
        &format!("routes:\n  - service: greeter\n{routes}"),
    )
    .await
}

/// A route that retries UNAVAILABLE three times.
const RETRY_3: &str = r#"    rules:
      - name: retried
        backends: [{}]
        retries: {attempts: 3, retry_on: unavailable}
"#;

/// Asserts that the agent's samples of `name` with `labels` add up to `want`.
fn assert_metric(agent: &Agent, name: &str, labels: &[&str], want: f64) {
    let m = agent.metrics();
    assert_eq!(metric(&m, name, labels), want, "{name} {labels:?}\n{m}");
}

/// UNAVAILABLE for `percent` of unary calls.
fn failing(percent: u32) -> Options {
    Options {
        fail_code: Code::Unavailable as i32,
        fail_percent: percent,
        ..Options::default()
    }
}

/// `n` unary calls, `concurrency` at a time: the codes they ended with (OK for success).
async fn run(c: &GreeterClient<Channel>, n: usize, concurrency: usize) -> Vec<Code> {
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let mut c = c.clone();
        let calls = n / concurrency + usize::from(t < n % concurrency);
        tasks.push(tokio::spawn(async move {
            let mut codes = Vec::with_capacity(calls);
            for i in 0..calls {
                let r = tokio::time::timeout(BOUND, c.say_hello(hello(&format!("{t}-{i}"))))
                    .await
                    .expect("no call hangs");
                codes.push(r.map_or_else(|s| s.code(), |_| Code::Ok));
            }
            codes
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// `n` calls the backend holds `sleep_ms` each, under way.
fn hold(
    c: &GreeterClient<Channel>,
    n: usize,
    sleep_ms: u32,
) -> Vec<tokio::task::JoinHandle<Result<tonic::Response<HelloReply>, tonic::Status>>> {
    (0..n)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let held = HelloRequest {
                    sleep_ms,
                    ..hello(&format!("held-{i}"))
                };
                c.say_hello(held).await
            })
        })
        .collect()
}

fn count(codes: &[Code], code: Code) -> usize {
    codes.iter().filter(|c| **c == code).count()
}

#[tokio::test]
async fn three_retries_on_unavailable_mask_endpoints_that_fail_a_fifth_of_calls() {
    let b = backends(&[failing(20), failing(20), failing(20)]).await;
    let routes =
        format!("    retry_budget: {{percent: 50, min_retries_per_second: 10}}\n{RETRY_3}");
    let (agent, listen) = agent_with_routes(&b, &routes).await;
    let c = client(listen).await;
    let codes = run(&c, 2000, 16).await;
    let ok = count(&codes, Code::Ok);
    let failed_by_backends: u64 = b.iter().map(|b| b.stats.failed.load(Relaxed)).sum();
    eprintln!("{ok}/2000 succeeded; the backends failed {failed_by_backends} attempts");
    assert!(
        ok >= 1990,
        "{ok} of 2000 succeeded: {:?}\n{}",
        codes.iter().filter(|c| **c != Code::Ok).collect::<Vec<_>>(),
        agent.metrics()
    );
    // The backends did fail about a fifth of what they got, and every failure they answered
    // was retried but for the calls that failed four times.
    assert!(failed_by_backends > 300, "{failed_by_backends}");
    let m = agent.metrics();
    let retries = metric(
        &m,
        "balancer_call_retries_total",
        &[r#"route="retried""#, r#"condition="unavailable""#],
    );
    let not_retried = metric(&m, "balancer_calls_not_retried_total", &[]);
    assert_eq!(
        retries as u64 + not_retried as u64,
        failed_by_backends,
        "every failure was retried or counted as not retried\n{m}"
    );
    assert_eq!(not_retried as usize, 2000 - ok);
    // Retries go to another endpoint and say they are retries.
    let retried_arrivals: usize = b
        .iter()
        .map(|b| {
            b.stats
                .arrivals
                .lock()
                .unwrap()
                .iter()
                .filter(|a| a.1 > 0)
                .count()
        })
        .sum();
    assert_eq!(retried_arrivals as f64, retries);
}

#[tokio::test]
async fn a_retry_budget_below_the_failure_rate_bounds_the_extra_attempts() {
    let b = backends(&[failing(20), failing(20)]).await;
    // 5% of calls + 1/s over 10 s: at most 0.05 × 2000 + 10 = 110 retries.
    let budget = "    retry_budget: {percent: 5, min_retries_per_second: 1, ttl_ms: 10000}";
    let (agent, listen) = agent_with_routes(&b, &format!("{budget}\n{RETRY_3}")).await;
    let c = client(listen).await;
    let started = Instant::now();
    let codes = run(&c, 2000, 16).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the run fits in one window"
    );
    let m = agent.metrics();
    let retries = metric(&m, "balancer_call_retries_total", &[]) as usize;
    let budget = metric(
        &m,
        "balancer_calls_not_retried_total",
        &[r#"reason="budget_exhausted""#],
    ) as usize;
    let failed = 2000 - count(&codes, Code::Ok);
    eprintln!("{retries} retries, {budget} calls over the budget, {failed} calls failed");
    assert!(retries <= 110, "{retries} retries beyond the budget");
    assert!(retries >= 100, "the budget is used: {retries}");
    // The calls the budget could not cover failed as they were: UNAVAILABLE from a backend.
    assert!(budget > 150, "{budget}");
    assert_eq!(count(&codes, Code::Unavailable), failed);
    let not_retried = metric(&m, "balancer_calls_not_retried_total", &[]) as usize;
    assert_eq!(not_retried, failed);
}

#[tokio::test]
async fn a_backends_pushback_is_waited_for_and_a_negative_one_stops_retries() {
    let pushing = Options {
        pushback_ms: Some("300".into()),
        ..failing(0)
    };
    let b = backends(&[pushing, Options::default()]).await;
    let routes = r#"    rules:
      - name: retried
        backends: [{}]
        retries: {attempts: 2, retry_on: unavailable}
"#;
    let (agent, listen) = agent_with_routes(&b, routes).await;
    let mut c = client(listen).await;
    for i in 0..6 {
        let r = c.say_hello(hello(&format!("p{i}"))).await.expect("retried");
        assert_eq!(r.into_inner().backend, "backend-2");
    }
    // Every retry on backend-2 came at least 300 ms after backend-1 refused the call.
    let refused = b[0].stats.arrivals.lock().unwrap().clone();
    let retried: Vec<_> = b[1]
        .stats
        .arrivals
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.1 == 1)
        .map(|a| a.0)
        .collect();
    assert_eq!(retried.len(), refused.len(), "{refused:?} {retried:?}");
    assert!(!retried.is_empty());
    for at in &retried {
        let before = refused
            .iter()
            .map(|r| r.0)
            .filter(|r| r < at)
            .max()
            .unwrap();
        let waited = *at - before;
        assert!(
            waited >= Duration::from_millis(300),
            "retried after {waited:?}"
        );
    }
    drop((agent, c, b));

    // A negative pushback: the server says not to retry.
    let refusing = Options {
        pushback_ms: Some("-1".into()),
        ..failing(0)
    };
    let b = backends(&[refusing]).await;
    let (agent, listen) = agent_with_routes(&b, routes).await;
    let mut c = client(listen).await;
    let e = c.say_hello(hello("no")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(b[0].stats.calls.load(Relaxed), 1, "not retried");
    let pushback = [r#"reason="pushback""#];
    assert_metric(&agent, "balancer_calls_not_retried_total", &pushback, 1.0);
}

#[tokio::test]
async fn streams_that_outgrew_the_buffer_or_started_their_response_are_not_retried() {
    let b = backends(&[Options::default(), Options::default()]).await;
    let (agent, listen) = agent_with_routes(&b, RETRY_3).await;
    let mut c = client(listen).await;
    let calls = |b: &[Handle]| b.iter().map(|b| b.stats.calls.load(Relaxed)).sum::<u64>();
    let fail = |mut m: Vec<HelloRequest>| {
        for r in &mut m {
            r.fail_code = Code::Unavailable as i32;
        }
        m
    };

    // A small client stream that fails is retried: held whole, 1 + 3 attempts.
    let small = fail(hellos("s", 4, 1000, b'a'));
    let e = c
        .collect_hellos(futures_util::stream::iter(small))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(calls(&b), 4, "retried while its request is held");

    // One of 200 KiB outgrew the 64 KiB buffer: tried once.
    let large = fail(hellos("l", 4, 50_000, b'b'));
    let e = c
        .collect_hellos(futures_util::stream::iter(large))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(calls(&b), 5, "not retried");

    // A server stream that sent a message before failing: the client had its response
    // headers, tried once.
    let mut stream = c
        .say_hello_stream(HelloRequest {
            count: 1,
            fail_code: Code::Unavailable as i32,
            ..hello("started")
        })
        .await
        .expect("response headers")
        .into_inner();
    assert!(stream.next().await.unwrap().is_ok());
    let e = stream.next().await.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(calls(&b), 6, "not retried");

    for reason in [
        "attempts_exhausted",
        "request_too_large",
        "response_started",
    ] {
        let label = format!("reason=\"{reason}\"");
        assert_metric(&agent, "balancer_calls_not_retried_total", &[&label], 1.0);
    }
}

#[tokio::test]
async fn a_per_try_timeout_moves_a_slow_attempt_to_another_endpoint() {
    let slow = Options {
        delay_ms: 2000,
        ..Options::default()
    };
    let b = backends(&[slow, Options::default()]).await;
    let routes = r#"    rules:
      - name: hedged
        backends: [{}]
        timeout_ms: 5000
        retries: {attempts: 1, per_try_timeout_ms: 200, retry_on: deadline-exceeded}
"#;
    let (agent, listen) = agent_with_routes(&b, routes).await;
    let mut c = client(listen).await;
    for i in 0..6 {
        let started = Instant::now();
        let r = c.say_hello(hello(&format!("t{i}"))).await.expect("retried");
        let r = r.into_inner();
        assert_eq!(r.backend, "backend-2");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
    }
    // Each slow attempt was cancelled on its backend.
    let slow_calls = b[0].stats.calls.load(Relaxed);
    assert!(slow_calls >= 2, "{slow_calls}");
    wait_until("the slow attempts cancelled", BOUND, || {
        b[0].stats.cancelled.load(Relaxed) == slow_calls
    })
    .await;
    let labels = [r#"condition="per_try_timeout""#];
    assert_metric(
        &agent,
        "balancer_call_retries_total",
        &labels,
        slow_calls as f64,
    );
}

/// A unary call with `grpc-timeout` set to `timeout`, the backend sleeping `sleep`.
fn timed(timeout: Duration, sleep_ms: u32) -> Request<HelloRequest> {
    let mut r = Request::new(HelloRequest {
        sleep_ms,
        ..hello("timed")
    });
    r.set_timeout(timeout);
    r
}

fn received_timeout(r: &tonic::Response<HelloReply>) -> Duration {
    let v = r.metadata().get("x-received-grpc-timeout").unwrap();
    let v = v.to_str().unwrap();
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().unwrap();
    match unit {
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        "S" => Duration::from_secs(n),
        other => panic!("unit {other}"),
    }
}

#[tokio::test]
async fn the_shorter_of_the_route_timeout_and_grpc_timeout_wins() {
    let b = backends(&[Options::default()]).await;
    let routes = r#"    rules:
      - name: streams
        match: [{method: {exact: SayHelloStream}}]
        backends: [{}]
        timeout_ms: 0
      - name: unary
        backends: [{}]
        timeout_ms: 400
"#;
    let (agent, listen) = agent_with_routes(&b, routes).await;
    let mut c = client(listen).await;
    // The route's 400 ms is shorter than the client's 10 s: the endpoint is told the route's.
    let r = c
        .say_hello(timed(Duration::from_secs(10), 0))
        .await
        .unwrap();
    assert!(received_timeout(&r) <= Duration::from_millis(400));
    // The client's 200 ms is shorter: the endpoint is told the client's.
    let r = c
        .say_hello(timed(Duration::from_millis(200), 0))
        .await
        .unwrap();
    assert!(received_timeout(&r) <= Duration::from_millis(200));
    // Without grpc-timeout, the route's is passed on.
    let r = c.say_hello(hello("none")).await.unwrap();
    assert!(received_timeout(&r) <= Duration::from_millis(400));

    // The route's deadline passes: DEADLINE_EXCEEDED from the proxy, the backend cancelled.
    let started = Instant::now();
    let e = c
        .say_hello(timed(Duration::from_secs(10), 3000))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("proxy"), "{e:?}");
    assert!(
        took >= Duration::from_millis(390) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    wait_until("the backend's call cancelled", BOUND, || {
        b[0].stats.cancelled.load(Relaxed) == 1
    })
    .await;

    // `timeout_ms: 0`: no deadline of the route's. A stream longer than every default timeout
    // of the agent (connect 1 s, keepalive 10 s) runs to its end.
    let started = Instant::now();
    let stream = c
        .say_hello_stream(HelloRequest {
            count: 12,
            sleep_ms: 1000,
            ..hello("long")
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = stream.collect().await;
    assert_eq!(got.len(), 12);
    assert!(got.iter().all(Result::is_ok), "{got:?}");
    assert!(started.elapsed() >= Duration::from_secs(12));
    assert_metric(&agent, "balancer_calls_total", &[r#"grpc_status="4""#], 1.0);
}

#[tokio::test]
async fn a_circuit_breaker_trips_exactly_at_its_limit_and_recovers() {
    let b = backends(&[Options::default(), Options::default()]).await;
    let routes = r#"    connection_pool: {max_requests: 5}
"#;
    let (agent, listen) = agent_with_routes(&b, routes).await;
    let c = client(listen).await;
    let held = hold(&c, 5, 1500);
    wait_until("five calls in flight", BOUND, || {
        b.iter()
            .map(|b| b.stats.in_flight.load(Relaxed))
            .sum::<u64>()
            == 5
    })
    .await;
    let mut c2 = c.clone();
    let started = Instant::now();
    let e = c2.say_hello(hello("over")).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(300), "at once");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("max_requests"), "{e:?}");
    for h in held {
        h.await
            .unwrap()
            .expect("the calls within the limit succeed");
    }
    // Recovered: five at once again, and one more after.
    let codes = run(&c, 50, 5).await;
    assert_eq!(count(&codes, Code::Ok), 50);
    let labels = [r#"limit="max_requests""#, r#"service="greeter""#];
    assert_metric(
        &agent,
        "balancer_circuit_breaker_overflows_total",
        &labels,
        1.0,
    );
}

#[tokio::test]
async fn injected_aborts_and_delays_hit_their_share_of_calls() {
    let b = backends(&[Options::default(), Options::default()]).await;
    let routes = r#"    rules:
      - name: chaos
        backends: [{}]
        fault:
          delay: {fixed_delay_ms: 100, percent: 50}
          abort: {grpc_status: UNAVAILABLE, percent: 25}
"#;
    let (agent, listen) = agent_with_routes(&b, routes).await;
    let c = client(listen).await;
    let n = 2000;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..n / 16 + usize::from(t < n % 16) {
                let started = Instant::now();
                let r = c.say_hello(hello(&format!("{t}-{i}"))).await;
                seen.push((r.map_or_else(|e| e.code(), |_| Code::Ok), started.elapsed()));
            }
            seen
        }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.extend(t.await.unwrap());
    }
    assert_eq!(seen.len(), n);
    let aborted = seen.iter().filter(|s| s.0 == Code::Unavailable).count();
    let delayed = seen
        .iter()
        .filter(|s| s.1 >= Duration::from_millis(100))
        .count();
    let share = |k: usize| k as f64 / n as f64;
    eprintln!("aborted {aborted}, delayed {delayed} of {n}");
    assert!((0.20..=0.30).contains(&share(aborted)), "aborted {aborted}");
    assert!((0.45..=0.55).contains(&share(delayed)), "delayed {delayed}");
    assert_eq!(seen.iter().filter(|s| s.0 == Code::Ok).count(), n - aborted);
    // The metrics say the same.
    let m = agent.metrics();
    let faults = |kind: &str| {
        metric(
            &m,
            "balancer_faults_injected_total",
            &[r#"route="chaos""#, &format!("kind=\"{kind}\"")],
        ) as usize
    };
    assert_eq!(faults("abort"), aborted);
    // Every delayed call took its 100 ms; a call can be slow without a fault, rarely (the
    // machine is shared).
    assert!(faults("delay") <= delayed, "{} {delayed}", faults("delay"));
    assert!(
        delayed - faults("delay") <= n / 50,
        "{} {delayed}",
        faults("delay")
    );
    // The backends never saw an aborted call.
    let served: u64 = b.iter().map(|b| b.stats.calls.load(Relaxed)).sum();
    assert_eq!(served as usize, n - aborted);
}

#[tokio::test]
async fn a_services_outlier_detection_ejects_after_its_own_count_of_its_own_errors() {
    // The node-wide default ejects after 7 failures in a row: 6 calls would all be tried.
    let routes = "    outlier_detection: {consecutive_errors: 2, base_ejection_ms: 30000}\n";
    let b = backends(&[failing(0), Options::default()]).await;
    let (_agent, listen) = agent_with_routes(&b, routes).await;
    let codes = run(&client(listen).await, 12, 1).await;
    assert_eq!(
        b[0].stats.calls.load(Relaxed),
        2,
        "ejected at its second failure"
    );
    assert_eq!(count(&codes, Code::Ok), 10);

    // Gateway errors only: INTERNAL does not count, the endpoint keeps its share.
    let routes = "    outlier_detection: {consecutive_errors: 2, errors: gateway}\n";
    let internal = Options {
        fail_code: Code::Internal as i32,
        ..Options::default()
    };
    let b = backends(&[internal, Options::default()]).await;
    let (_agent, listen) = agent_with_routes(&b, routes).await;
    let codes = run(&client(listen).await, 12, 1).await;
    assert_eq!(b[0].stats.calls.load(Relaxed), 6, "never ejected");
    assert_eq!(count(&codes, Code::Internal), 6);

    // Both endpoints fail, at most half may be out: one is ejected, the other keeps its calls.
    let routes = "    outlier_detection: {consecutive_errors: 2, max_ejection_percent: 50}\n";
    let b = backends(&[failing(0), failing(0)]).await;
    let (agent, listen) = agent_with_routes(&b, routes).await;
    let codes = run(&client(listen).await, 12, 1).await;
    assert_eq!(count(&codes, Code::Unavailable), 12);
    let health: Vec<_> = agent
        .json("/api/endpoints")
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["health"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        health.iter().filter(|h| *h == "ejected").count(),
        1,
        "{health:?}"
    );
    let calls: Vec<_> = b.iter().map(|b| b.stats.calls.load(Relaxed)).collect();
    assert!(calls.contains(&2) && calls.contains(&10), "{calls:?}");
}

#[tokio::test]
async fn a_services_pool_settings_bound_its_connections_and_their_calls() {
    let two_streams = Options {
        max_concurrent_streams: Some(2),
        ..Options::default()
    };
    let b = backends(&[two_streams]).await;
    let routes = "    connection_pool: {max_connections: 1, max_requests_per_connection: 4}\n";
    let (agent, listen) = agent_with_routes(&b, routes).await;
    let c = client(listen).await;
    let held = hold(&c, 2, 1000);
    wait_until("two calls in flight", BOUND, || {
        b[0].stats.in_flight.load(Relaxed) == 2
    })
    .await;
    // The one connection allowed is at the endpoint's stream limit: no second one opens.
    let e = c.clone().say_hello(hello("third")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("stream limit"), "{e:?}");
    assert_eq!(b[0].stats.connections.load(Relaxed), 1);
    for h in held {
        h.await
            .unwrap()
            .expect("the calls within the limit succeed");
    }
    // A connection carries 4 calls, then the next one opens.
    let codes = run(&c, 12, 1).await;
    assert_eq!(count(&codes, Code::Ok), 12);
    let opened = b[0].stats.connections.load(Relaxed);
    assert!(
        (4..=5).contains(&opened),
        "{opened} connections for 14 calls"
    );
    drop(agent);
}

/// Runs `balancer-agent inspect ARGS` against `agent`: its standard output.
fn inspect(agent: &Agent, args: &[&str]) -> String {
    let out = std::process::Command::new(balancer_tests::agent::agent_bin())
        .args(["inspect", "--admin", &agent.admin.to_string()])
        .args(args)
        .output()
        .expect("running inspect");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn inspect_shows_retries_faults_and_the_circuit_breaker_per_service_and_route() {
    let b = backends(&[Options::default()]).await;
    let routes = r#"    connection_pool: {max_requests: 100, max_retries: 3}
    outlier_detection: {consecutive_errors: 5, base_ejection_ms: 30000}
    retry_budget: {percent: 20, min_retries_per_second: 10}
    rules:
      - name: retried
        backends: [{}]
        timeout_ms: 10000
        retries: {attempts: 3, per_try_timeout_ms: 2000, retry_on: "cancelled,deadline-exceeded,internal,resource-exhausted"}
        fault: {delay: {fixed_delay_ms: 100, percent: 50}, abort: {grpc_status: UNAVAILABLE, percent: 25}}
"#;
    let (agent, _listen) = agent_with_routes(&b, routes).await;
    let text = inspect(&agent, &["routes"]);
    for needle in [
        "circuit breaker: max_requests 100, max_retries 3",
        "outlier detection: base_ejection 30000ms, codes server_errors, consecutive_errors 5",
        "retry budget: min_per_second 10, ratio_permille 200, ttl 10000ms",
        "retries: 3 attempt(s) on cancelled,deadline-exceeded,internal,resource-exhausted, 2000ms per try",
        "fault:   delay 100ms on 50.00%, abort UNAVAILABLE on 25.00%",
    ] {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }
    let args = [
        "explain",
        "--to",
        "greeter.default.svc.cluster.local",
        "--method",
        "/helloworld.Greeter/SayHello",
    ];
    let text = inspect(&agent, &args);
    for needle in [
        "decision: route retried (file) takes the call",
        "  timeout: 10000 ms",
        "  retries: 3 attempt(s) on cancelled,deadline-exceeded,internal,resource-exhausted, 2000ms per try",
        "circuit breaker: max_requests 100, max_retries 3",
    ] {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }
}

#[tokio::test]
async fn retries_in_flight_and_calls_waiting_for_a_connection_are_bounded_per_service() {
    // Both backends fail every call after 300 ms: four calls fail together, and only one may
    // retry at a time (max_retries: 1); the others fail as they are.
    let slow_failing = Options {
        delay_ms: 300,
        ..failing(0)
    };
    let b = backends(&[slow_failing.clone(), slow_failing]).await;
    let routes = format!("    connection_pool: {{max_retries: 1}}\n{RETRY_3}");
    let (agent, listen) = agent_with_routes(&b, &routes).await;
    let codes = run(&client(listen).await, 4, 4).await;
    assert_eq!(count(&codes, Code::Unavailable), 4);
    let max_retries = [r#"reason="max_retries""#];
    assert_metric(
        &agent,
        "balancer_calls_not_retried_total",
        &max_retries,
        3.0,
    );
    assert_metric(&agent, "balancer_call_retries_total", &[], 3.0);
    let limit = [r#"limit="max_retries""#];
    assert_metric(
        &agent,
        "balancer_circuit_breaker_overflows_total",
        &limit,
        3.0,
    );
    drop((agent, b));

    // An endpoint that never answers the handshake: a call waits for its connection (up to
    // the connect timeout); with max_pending_requests: 1, a second call fails at once.
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = mute.local_addr().unwrap();
    let routes = "    connection_pool: {max_pending_requests: 1, connect_timeout_ms: 3000}\n";
    let extra = format!("routes:\n  - service: greeter\n{routes}");
    let (agent, listen) = balancer_tests::harness::agent("round-robin", &[addr], &extra).await;
    let c = client(listen).await;
    let waiting = hold(&c, 1, 0);
    wait_until("one call waiting for its connection", BOUND, || {
        metric(&agent.metrics(), "balancer_active_calls", &[]) == 1.0
    })
    .await;
    let started = Instant::now();
    let e = c.clone().say_hello(hello("second")).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(500), "at once");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_pending_requests"), "{e:?}");
    let first = waiting
        .into_iter()
        .next()
        .unwrap()
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(first.code(), Code::Unavailable, "{first:?}");
    drop(mute);
}
