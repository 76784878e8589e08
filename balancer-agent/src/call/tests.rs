//! The call layer's rules, on their own: no socket, tokio's clock paused where time matters.

use std::time::Duration;

use super::*;
use crate::{
    call::grpc::Code,
    config::{Policy, PoolConfig},
    state::{EndpointSpec, ServiceSpec, Update},
};

/// Calls over a store with service `greeter` (authority `greeter.default:50051`, VIP
/// 10.96.0.10:50051) and `endpoints` ready endpoints.
fn calls(endpoints: u16, limits: Limits) -> Arc<Calls> {
    let store = Store::new(PoolConfig::default());
    store.apply(Update::Reset(vec![ServiceSpec {
        name: "greeter".into(),
        authorities: vec!["greeter.default".into()],
        vips: vec!["10.96.0.10:50051".parse().unwrap()],
        policy: Policy::RoundRobin,
        endpoints: (1..=endpoints)
            .map(|i| EndpointSpec::ready(SocketAddr::from(([10, 0, 0, i as u8], 50051))))
            .collect(),
        balancing: Default::default(),
    }]));
    let metrics = Metrics::new(store.clone(), 10);
    Calls::new(store, metrics, limits)
}

fn conn(calls: &Calls, target: &Target) -> Arc<ConnInfo> {
    let peer = "10.1.0.5:40000".parse().unwrap();
    let local = "10.1.0.1:15001".parse().unwrap();
    calls.registry.open_connection(peer, local, target)
}

fn request(authority: &str, extra: &[(&str, &str)]) -> Fields {
    let mut f = Fields::default();
    for (n, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/helloworld.Greeter/SayHello"),
        (":authority", authority),
    ]
    .iter()
    .chain(extra)
    {
        f.push(n.as_bytes(), v.as_bytes());
    }
    f
}

const BY_AUTHORITY: Target = Target::Authority { default: None };

#[tokio::test]
async fn a_call_is_admitted_to_its_service_and_counted_until_it_ends() {
    let calls = calls(2, Limits::default());
    let conn = conn(&calls, &BY_AUTHORITY);
    let fields = request("greeter.default:50051", &[]);
    let admitted = calls.admit(&BY_AUTHORITY, &conn, &fields, true).unwrap();
    assert_eq!(&*admitted.service.name, "greeter");
    assert_eq!(admitted.path.path(), "/helloworld.Greeter/SayHello");
    assert!(admitted.replay.complete);
    assert_eq!(calls.active(), 1);
    assert_eq!(calls.registry.calls().len(), 1);
    admitted.cancelled(&calls);
    assert_eq!(calls.active(), 0);
    let m = calls.metrics.render();
    assert!(m.contains(r#"grpc_status="1""#), "{m}");
}

#[tokio::test]
async fn a_call_without_a_service_is_answered_unavailable_by_the_proxy() {
    let calls = calls(2, Limits::default());
    let vip = Target::Vip("10.96.0.99:80".parse().unwrap());
    let conn = conn(&calls, &vip);
    let refused = calls
        .admit(&vip, &conn, &request("x", &[]), true)
        .unwrap_err();
    assert_eq!(refused.status.code, Code::Unavailable);
    assert!(refused.status.message.contains("10.96.0.99:80"));
    assert!(refused.service.is_none());
    let unknown = calls
        .admit(&BY_AUTHORITY, &conn, &request("nope:1", &[]), true)
        .unwrap_err();
    assert!(unknown.status.message.contains("\"nope:1\""));
    calls.refused(&refused);
    calls.refused(&unknown);
    assert_eq!(calls.active(), 0);
}

#[tokio::test]
async fn calls_over_the_active_limit_are_answered_resource_exhausted() {
    let limits = Limits {
        max_active_calls: 1,
        ..Limits::default()
    };
    let calls = calls(1, limits);
    let conn = conn(&calls, &BY_AUTHORITY);
    let fields = request("greeter.default", &[]);
    let first = calls.admit(&BY_AUTHORITY, &conn, &fields, true).unwrap();
    let second = calls
        .admit(&BY_AUTHORITY, &conn, &fields, true)
        .unwrap_err();
    assert_eq!(second.status.code, Code::ResourceExhausted);
    assert!(second.status.message.contains("limits.max_active_calls"));
    calls.refused(&second);
    // A reload raises the limit: in force for the next call.
    calls.set_limits(Limits {
        max_active_calls: 2,
        ..Limits::default()
    });
    let second = calls.admit(&BY_AUTHORITY, &conn, &fields, true).unwrap();
    second.cancelled(&calls);
    first.cancelled(&calls);
    assert_eq!(calls.active(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_runs_on_the_proxys_clock_and_the_endpoint_gets_the_time_left() {
    let calls = calls(2, Limits::default());
    let conn = conn(&calls, &BY_AUTHORITY);
    let fields = request("greeter.default", &[("grpc-timeout", "100m")]);
    let admitted = calls.admit(&BY_AUTHORITY, &conn, &fields, false).unwrap();
    let deadline = admitted
        .replay
        .deadline
        .expect("a deadline from grpc-timeout");
    assert_eq!(deadline - admitted.start, Duration::from_millis(100));
    tokio::time::advance(Duration::from_millis(30)).await;
    let left = deadline_field(deadline, Instant::now());
    assert_eq!(
        grpc::parse_timeout(left.as_bytes()),
        Some(Duration::from_millis(70))
    );
    // Refused unprocessed while time is left: it may be replayed.
    let mut attempts = Attempts::default();
    let guard = attempts.next(&admitted.destination).unwrap();
    let call = admitted.sent(calls.clone(), guard);
    assert_eq!(call.replay_refusal(Instant::now()), None);
    // Once the deadline passed, it may not: DEADLINE_EXCEEDED.
    tokio::time::advance(Duration::from_millis(71)).await;
    let refusal = call.replay_refusal(Instant::now()).unwrap();
    assert_eq!(refusal.code, Code::DeadlineExceeded);
    assert!(refusal.message.contains("greeter"));
    call.finish(End::Status("4"));
    assert_eq!(calls.active(), 0);
}

#[tokio::test]
async fn a_request_that_outgrew_the_replay_buffer_is_not_replayed() {
    let calls = calls(2, Limits::default());
    let conn = conn(&calls, &BY_AUTHORITY);
    let admitted = calls
        .admit(
            &BY_AUTHORITY,
            &conn,
            &request("greeter.default", &[]),
            false,
        )
        .unwrap();
    let guard = Attempts::default().next(&admitted.destination).unwrap();
    let mut call = admitted.sent(calls.clone(), guard);
    call.request_data(&[0; REPLAY_LIMIT], false);
    assert!(call.replay.is_some(), "exactly the limit is kept");
    call.request_data(&[0], true);
    let refusal = call.replay_refusal(Instant::now()).unwrap();
    assert_eq!(refusal.code, Code::Unavailable);
    assert!(refusal.message.contains("outgrew the replay buffer"));
    // And a call whose response started is never replayed.
    let admitted = calls
        .admit(&BY_AUTHORITY, &conn, &request("greeter.default", &[]), true)
        .unwrap();
    let guard = Attempts::default().next(&admitted.destination).unwrap();
    let mut answered = admitted.sent(calls.clone(), guard);
    assert!(answered.responded());
    assert!(
        !answered.responded(),
        "only the first headers start the response"
    );
    assert!(answered.replay.is_none());
    call.finish(End::Reset);
    answered.finish(End::Status("0"));
    assert_eq!(calls.active(), 0);
}

#[tokio::test]
async fn at_most_three_distinct_endpoints_are_tried_and_the_answer_says_why() {
    let calls = calls(5, Limits::default());
    let service = Destination::service(calls.store.snapshot().by_name("greeter").unwrap().clone());
    let mut attempts = Attempts::default();
    let mut seen = Vec::new();
    while let Some(g) = attempts.next(&service) {
        assert!(
            !seen.contains(&g.endpoint().addr),
            "an endpoint tried twice"
        );
        seen.push(g.endpoint().addr);
        attempts.record(AttemptError::Full(g.endpoint().addr));
    }
    assert_eq!(seen.len(), MAX_ATTEMPTS);
    assert_eq!(attempts.exhausted(&service).code, Code::ResourceExhausted);
    // One of them failed: the answer is UNAVAILABLE with the last error.
    let mut attempts = Attempts::new(vec![seen[0]], Some(AttemptError::Refused(seen[0])));
    while let Some(g) = attempts.next(&service) {
        attempts.record(AttemptError::Full(g.endpoint().addr));
    }
    let status = attempts.exhausted(&service);
    assert_eq!(status.code, Code::Unavailable);
    assert!(status.message.contains("3 endpoint(s) tried"));
    assert!(
        status.message.ends_with("every pooled connection full"),
        "the last error: {}",
        status.message
    );
    // An endpoint out of reach: the engine's error, as it says it.
    let mut attempts = Attempts::default();
    assert!(attempts.next(&service).is_some());
    let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    attempts.record(AttemptError::Unreachable(refused.into()));
    while let Some(g) = attempts.next(&service) {
        attempts.record(AttemptError::Refused(g.endpoint().addr));
    }
    let status = attempts.exhausted(&service);
    assert_eq!(status.code, Code::Unavailable);
    assert!(
        status.message.contains("refused the call unprocessed"),
        "{}",
        status.message
    );
    // No endpoint at all.
    let empty = self::calls(0, Limits::default());
    let service = Destination::service(empty.store.snapshot().by_name("greeter").unwrap().clone());
    let mut attempts = Attempts::default();
    assert!(attempts.next(&service).is_none());
    assert!(
        attempts
            .exhausted(&service)
            .message
            .contains("has no ready endpoint")
    );
}

#[test]
fn the_proxys_own_answers_are_grpc_statuses() {
    let status = Status::unavailable("endpoint 10.0.0.1:80: connect failed: 100%");
    let f = answer_fields(&status, true);
    assert_eq!(f.get(b":status"), Some(&b"200"[..]));
    assert_eq!(f.get(b"content-type"), Some(&b"application/grpc"[..]));
    assert_eq!(f.get(b"grpc-status"), Some(&b"14"[..]));
    assert_eq!(
        f.get(b"grpc-message"),
        Some(&b"endpoint 10.0.0.1:80: connect failed: 100%25"[..])
    );
    // In trailers, after the response started: no :status.
    let f = answer_fields(&Status::deadline("late"), false);
    assert_eq!(f.get(b":status"), None);
    assert_eq!(f.get(b"grpc-status"), Some(&b"4"[..]));
}
