//! Replacing a node's agent without failing a call, and what a crash costs.
//!
//! - A new agent starts beside the running one (the order `deploy/` rolls the DaemonSet in:
//!   the new pod ready first, then SIGTERM to the old one) while a pod's gRPC clients call
//!   continuously on long-lived connections: no call fails, no client connection ends up on the
//!   kube-proxy path, and the clients stay balanced per call through the new agent. Clients:
//!   tonic over hyper-util's pooled client and gRPC C-core (Python grpcio), which both send a
//!   call a connection going away never sent on a new one; and tonic's Channel, which fails
//!   such calls (hyper cancels them): only those may fail.
//! - The drain's two steps at the frame level (RFC 9113 §6.8): a first GOAWAY with 2^31-1, a
//!   PING, a second GOAWAY with the last stream once the PING is answered; every stream up to
//!   it is served, none is refused.
//! - kill -9, then a restart: pods reach their Services within a second; the new agent adopts
//!   the pinned maps and balances new connections; a connection opened around the dead agent
//!   stays on the kube-proxy path, working, as the README says.
//!
//! The handover and crash tests use the real datapath on a simulated node (root).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use balancer_agent::wire::hpack;
use balancer_tests::{
    agent::Agent,
    free_port, greeter,
    harness::{self, frame, grpc_frame},
    node::{BACKEND_PORT, Scenario},
    pb::HelloRequest,
    require_root, wait_until,
};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const BOUND: Duration = Duration::from_secs(20);

/// A VIP for this scenario, 10.96.<the node's subnet>.`last`: an address of the node
/// (nothing ever leaves the machine).
fn vip(s: &Scenario, last: u8) -> SocketAddr {
    let [_, _, subnet, _] = s.node.gateway.octets();
    let vip = Ipv4Addr::new(10, 96, subnet, last);
    s.node.add_vip(vip).expect("adding the VIP to the node");
    (vip, BACKEND_PORT).into()
}

/// Starts an agent in the node, in a cgroup of its own named `name`, with the configuration
/// `config(admin address)`, and waits until it is ready.
async fn start_agent(s: &Scenario, name: &str, config: impl FnOnce(SocketAddr) -> String) -> Agent {
    start_agent_with(s, name, config, &[]).await
}

/// [`start_agent`] with more arguments for `balancer-agent run`.
async fn start_agent_with(
    s: &Scenario,
    name: &str,
    config: impl FnOnce(SocketAddr) -> String,
    args: &[&str],
) -> Agent {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cg = s.node.cgroup.child(name).expect("agent cgroup");
    let agent = Agent::start_in_cgroup_with(&config(admin), admin, cg.path(), |c| {
        c.args(args);
    })
    .await;
    // The cgroup goes with the node's tree (after the agent's process).
    std::mem::forget(cg);
    agent
}

/// kube-proxy's stand-in: connections to `vip` go to `backend`; it counts them. Every
/// connection it sees went around the agent.
async fn kube_proxy(vip: SocketAddr, backend: SocketAddr) -> Arc<AtomicU64> {
    let listener = TcpListener::bind(vip).await.expect("binding the VIP");
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            count.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                if let Ok(mut upstream) = TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    accepted
}

/// `balancer-pod-load` running in a pod: tonic channels calling continuously.
struct Load {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    summary: Arc<Mutex<Option<Value>>>,
}

impl Load {
    /// Starts it in `pod` against `target`: `connections` clients with 4 calls of 20 ms each
    /// always in flight, plus one client calling sequentially, over `transport` (`pooled`:
    /// tonic over hyper-util's pool, which sends a request a connection going away never sent
    /// again, as gRPC's own clients do; `channel`: tonic's Channel, which fails it; `grpcio`:
    /// Python grpcio, gRPC C-core, tests/python/load_client.py).
    async fn start(
        s: &Scenario,
        pod: &str,
        target: SocketAddr,
        connections: usize,
        transport: &str,
    ) -> Self {
        let (target, connections) = (target.to_string(), connections.to_string());
        let mut args = vec![
            "--target",
            &target,
            "--connections",
            &connections,
            "--in-flight",
            "4",
        ];
        let program = if transport == "grpcio" {
            args.insert(
                0,
                concat!(env!("CARGO_MANIFEST_DIR"), "/python/load_client.py"),
            );
            "python3"
        } else {
            args.extend(["--transport", transport]);
            env!("CARGO_BIN_EXE_balancer-pod-load")
        };
        let mut cmd = tokio::process::Command::from(s.node.pod(pod).command(program, &args));
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("starting balancer-pod-load");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let summary = Arc::new(Mutex::new(None));
        tokio::spawn({
            let (ok, failed, summary) = (ok.clone(), failed.clone(), summary.clone());
            async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let Ok(v) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    if v.get("phases").is_some() {
                        *summary.lock().unwrap() = Some(v);
                    } else {
                        ok.store(v["ok"].as_u64().unwrap_or(0), Relaxed);
                        failed.store(v["failed"].as_u64().unwrap_or(0), Relaxed);
                    }
                }
            }
        });
        Self {
            child,
            stdin,
            ok,
            failed,
            summary,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Relaxed)
    }

    /// Waits until `n` more calls succeeded (failing at once if the process died).
    async fn wait_calls(&mut self, what: &str, n: u64) {
        let target = self.ok() + n;
        let deadline = tokio::time::Instant::now() + BOUND;
        while self.ok() < target {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("balancer-pod-load exited ({status}) while waiting for {what}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {} calls, {} failed",
                self.ok(),
                self.failed.load(Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts a new phase: the calls from now on are counted apart.
    async fn mark(&mut self) {
        let stdin = self.stdin.as_mut().expect("running");
        stdin
            .write_all(b"mark\n")
            .await
            .expect("writing to the client");
        stdin.flush().await.expect("flushing");
    }

    /// Stops the clients (the calls in flight finish) and returns their phases.
    async fn finish(mut self) -> Vec<Value> {
        drop(self.stdin.take());
        let status = tokio::time::timeout(BOUND, self.child.wait())
            .await
            .expect("balancer-pod-load ends within the bound")
            .expect("waiting for balancer-pod-load");
        assert!(status.success(), "balancer-pod-load failed: {status}");
        // The reader task sees the last line right after the exit.
        let summary = self.summary.clone();
        wait_until("the load summary", BOUND, || {
            summary.lock().unwrap().is_some()
        })
        .await;
        let v = summary.lock().unwrap().take().unwrap();
        v["phases"].as_array().expect("phases").clone()
    }
}

/// A phase's calls served per backend on the sequential channel.
fn sequential(phase: &Value) -> BTreeMap<String, u64> {
    serde_json::from_value(phase["sequential"].clone()).expect("calls per backend")
}

/// The sum of a count (`ok`, `failed`) over phases.
fn sum(phases: &[Value], key: &str) -> u64 {
    phases
        .iter()
        .map(|p| p[key].as_u64().expect("a count"))
        .sum()
}

/// What `balancer-pod call` says each backend served.
fn counts(out: &Value) -> BTreeMap<String, u64> {
    serde_json::from_value(out["counts"].clone()).expect("calls per backend")
}

/// The agent's client connections from `ip`.
fn connections_from(agent: &Agent, ip: Ipv4Addr) -> usize {
    agent
        .json("/api/connections")
        .as_array()
        .expect("connections")
        .iter()
        .filter(|c| {
            c["peer"]
                .as_str()
                .and_then(|p| p.parse::<SocketAddr>().ok())
                .is_some_and(|p| p.ip() == ip)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_new_agent_takes_over_from_the_old_one_without_failing_a_call() {
    require_root!();
    let s = Scenario::new(3).await.unwrap();
    let vip = vip(&s, 20);
    let bypassed = kube_proxy(vip, s.backends[0].1).await;
    let mut old = start_agent(&s, "agent-old", |a| s.agent_config(vip, a, "auto")).await;

    // 4 connections with 4 calls of 20 ms each in flight, and one calling sequentially; and
    // the same with tonic's Channel, which fails a call on every GOAWAY (see Load::start);
    // and gRPC C-core (Python grpcio): 2 connections with 4 calls in flight, 1 sequential.
    let mut load = Load::start(&s, "client", vip, 4, "pooled").await;
    let mut channels = Load::start(&s, "client", vip, 4, "channel").await;
    let mut grpcio = Load::start(&s, "client", vip, 2, "grpcio").await;
    load.wait_calls("calls through the old agent", 300).await;
    channels
        .wait_calls("calls through the old agent", 300)
        .await;
    grpcio
        .wait_calls("grpcio calls through the old agent", 100)
        .await;
    let client_ip = s.node.pod("client").ip;
    assert_eq!(
        connections_from(&old, client_ip),
        13,
        "5 + 5 + 3 connections"
    );

    // The rollout: the new agent starts beside the old one and becomes ready...
    let new = start_agent(&s, "agent-new", |a| s.agent_config(vip, a, "auto")).await;
    load.wait_calls("calls while both agents run", 300).await;
    grpcio
        .wait_calls("grpcio calls while both agents run", 100)
        .await;
    channels
        .wait_calls("calls while both agents run", 300)
        .await;
    // ...then the old one gets SIGTERM, and drains.
    old.sigterm();
    let drain_started = Instant::now();
    let status = old
        .wait_exit(BOUND)
        .await
        .expect("the old agent exits after its drain");
    let drained_in = drain_started.elapsed();
    assert!(status.success(), "the old agent exited with {status}");

    // Every client connection came back to the new agent.
    wait_until("the 13 connections on the new agent", BOUND, || {
        connections_from(&new, client_ip) == 13
    })
    .await;
    load.mark().await;
    grpcio.mark().await;
    load.wait_calls("calls through the new agent", 600).await;
    grpcio
        .wait_calls("grpcio calls through the new agent", 200)
        .await;
    let phases = load.finish().await;
    let channel_phases = channels.finish().await;
    let grpcio_phases = grpcio.finish().await;

    let (total, failed) = (sum(&phases, "ok"), sum(&phases, "failed"));
    println!(
        "handover: {total} calls, {failed} failed; the old agent drained in {drained_in:?}; \
         sequential calls before {:?}, after {:?}",
        sequential(&phases[0]),
        sequential(&phases[1])
    );
    assert_eq!(failed, 0, "calls failed across the handover: {phases:?}");
    let grpcio_ok = sum(&grpcio_phases, "ok");
    let grpcio_failed = sum(&grpcio_phases, "failed");
    println!("grpcio: {grpcio_ok} calls, {grpcio_failed} failed");
    assert_eq!(grpcio_failed, 0, "grpcio calls failed: {grpcio_phases:?}");
    assert_eq!(
        sequential(&grpcio_phases[1]).len(),
        3,
        "grpcio's sequential channel still balanced per call: {grpcio_phases:?}"
    );
    // tonic's Channel: hyper fails the calls given to a connection after its GOAWAY while a
    // call was open on it (at most the 4 x 4 + 1 that can be waiting), without sending them:
    // it cancels them, or h2 refuses to open their stream after the GOAWAY. Every other call
    // succeeds.
    let channel_failed = sum(&channel_phases, "failed");
    let channel_ok = sum(&channel_phases, "ok");
    println!("tonic Channel: {channel_ok} calls, {channel_failed} failed: {channel_phases:?}");
    assert!(channel_failed <= 17, "{channel_phases:?}");
    for p in &channel_phases {
        for e in p["errors"].as_array().unwrap() {
            let e = e.as_str().unwrap();
            let unsent = e.starts_with("Cancelled: operation was canceled")
                || (e.contains("GoAway") && e.contains("NO_ERROR") && e.contains("Remote"));
            assert!(unsent, "a call failed otherwise than unsent: {e}");
        }
    }
    assert_eq!(
        bypassed.load(Relaxed),
        0,
        "a client connection went around the agents (kube-proxy path)"
    );
    assert_eq!(
        new.bpf_counter("connect4_agent_down"),
        0,
        "a connect found no agent serving"
    );
    // The single channel is still balanced per call, through the new agent.
    let after = sequential(&phases[1]);
    assert_eq!(
        after.len(),
        3,
        "the sequential channel's calls after the handover reach every backend: {after:?}"
    );
    // The old agent left the pins to the new one, which still serves new connections.
    assert!(std::path::Path::new(&s.pin_path()).exists());
    assert_eq!(counts(&s.call("client", vip, 30).await).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_an_agent_stopped_before_its_replacement_serves_waits_for_it() {
    require_root!();
    let s = Scenario::new(3).await.unwrap();
    let vip = vip(&s, 22);
    let bypassed = kube_proxy(vip, s.backends[0].1).await;
    // As the DaemonSet runs it: on SIGTERM, wait up to 15 s for another agent to redirect.
    let wait = ["--handover-wait-ms", "15000"];
    let config = |a| s.agent_config(vip, a, "auto");
    let mut old = start_agent_with(&s, "agent-old", config, &wait).await;
    let mut load = Load::start(&s, "client", vip, 4, "pooled").await;
    let mut grpcio = Load::start(&s, "client", vip, 2, "grpcio").await;
    load.wait_calls("calls through the old agent", 300).await;
    grpcio
        .wait_calls("grpcio calls through the old agent", 100)
        .await;

    // A pod deleted by hand: SIGTERM first, its replacement started at the same time.
    old.sigterm();
    let stopped = Instant::now();
    let new = start_agent_with(&s, "agent-new", config, &wait).await;
    let replaced_in = stopped.elapsed();
    assert!(
        old.exited().is_none(),
        "the old agent served until its replacement was ready ({replaced_in:?})"
    );
    load.wait_calls("calls while the new agent takes over", 300)
        .await;
    let status = old.wait_exit(BOUND).await.expect("the old agent exits");
    assert!(status.success(), "{status}");
    let client_ip = s.node.pod("client").ip;
    wait_until("the 8 connections on the new agent", BOUND, || {
        connections_from(&new, client_ip) == 8
    })
    .await;
    load.mark().await;
    grpcio.mark().await;
    load.wait_calls("calls through the new agent", 300).await;
    grpcio
        .wait_calls("grpcio calls through the new agent", 100)
        .await;
    let phases = load.finish().await;
    let grpcio_phases = grpcio.finish().await;
    let failed = sum(&phases, "failed") + sum(&grpcio_phases, "failed");
    println!(
        "replaced by hand: the new agent ready {replaced_in:?} after SIGTERM; {failed} failed \
         calls: {phases:?} {grpcio_phases:?}"
    );
    assert_eq!(failed, 0, "{phases:?} {grpcio_phases:?}");
    assert_eq!(
        bypassed.load(Relaxed),
        0,
        "a connection went around the agents"
    );
    assert_eq!(new.bpf_counter("connect4_agent_down"), 0);
    assert_eq!(sequential(&phases[1]).len(), 3, "{phases:?}");
}

/// The request HEADERS of a SayHello call on stream `sid`.
fn request(sid: u32) -> Vec<u8> {
    let block = frame::header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/helloworld.Greeter/SayHello"),
        (":authority", "greeter"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    frame::encode(frame::HEADERS, frame::END_HEADERS, sid, &block)
}

/// The request body of a call the backend holds `sleep_ms`.
fn body(sid: u32, sleep_ms: u32) -> Vec<u8> {
    let msg = grpc_frame(&HelloRequest {
        name: format!("stream {sid}"),
        sleep_ms,
        ..Default::default()
    });
    frame::encode(frame::DATA, frame::END_STREAM, sid, &msg)
}

/// What a raw client saw of one stream.
#[derive(Debug, Default)]
struct Seen {
    status: Option<String>,
    reset: Option<u32>,
}

#[tokio::test]
async fn the_drain_sends_two_goaways_and_serves_every_stream_up_to_the_second() {
    let backend = greeter::spawn("127.0.0.1:0", "backend-1").await;
    let (mut agent, listen) = harness::agent("round-robin", &[backend.addr], "").await;
    let mut sock = TcpStream::connect(listen).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame::encode(frame::SETTINGS, 0, 0, &[]));
    // Stream 1: a call the backend holds 1 s, in flight when the drain starts.
    out.extend(request(1));
    out.extend(body(1, 1000));
    sock.write_all(&out).await.unwrap();
    wait_until("the call in flight", BOUND, || {
        backend.stats.in_flight.load(Relaxed) == 1
    })
    .await;

    agent.sigterm();
    let (mut rd, mut wr) = sock.into_split();
    let mut dec = hpack::Decoder::default();
    let mut seen: BTreeMap<u32, Seen> = BTreeMap::new();
    let mut goaways = Vec::new();
    let mut drain_ping = None;
    let mut answered = false;
    let read = tokio::time::timeout(BOUND, async {
        while let Some((kind, flags, sid, payload)) = frame::read(&mut rd).await {
            match kind {
                frame::GOAWAY => {
                    let last = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                    goaways.push((last, code));
                }
                frame::PING if flags & frame::ACK == 0 => drain_ping = Some(payload),
                frame::SETTINGS if flags & frame::ACK == 0 => {
                    wr.write_all(&frame::encode(frame::SETTINGS, frame::ACK, 0, &[]))
                        .await
                        .unwrap();
                }
                frame::HEADERS => {
                    let s = seen.entry(sid).or_default();
                    dec.decode(&payload, 64 * 1024, &mut |n, v| {
                        if n == b"grpc-status" {
                            s.status = Some(String::from_utf8_lossy(v).into_owned());
                        }
                    })
                    .expect("a valid header block");
                }
                frame::RST_STREAM => {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    seen.entry(sid).or_default().reset = Some(code);
                }
                _ => {}
            }
            if goaways.len() == 1
                && !answered
                && let Some(ping) = &drain_ping
            {
                // A stream the client sent before it read the first GOAWAY: it arrives before
                // the PING's ACK, and must be served.
                let mut out = request(3);
                out.extend(body(3, 200));
                out.extend(frame::encode(frame::PING, frame::ACK, 0, ping));
                wr.write_all(&out).await.unwrap();
                answered = true;
            }
            if goaways.len() == 2 && !seen.contains_key(&5) {
                // A client that ignores both GOAWAYs: above the last stream, refused.
                let mut out = request(5);
                out.extend(body(5, 0));
                wr.write_all(&out).await.unwrap();
                seen.insert(5, Seen::default());
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the connection did not close: {goaways:?} {seen:?}"
    );
    const NO_ERROR: u32 = 0;
    const REFUSED_STREAM: u32 = 7;
    assert_eq!(
        goaways,
        [((1 << 31) - 1, NO_ERROR), (3, NO_ERROR)],
        "a first GOAWAY with 2^31-1, a second naming the last stream"
    );
    assert!(drain_ping.is_some(), "a PING followed the first GOAWAY");
    for sid in [1, 3] {
        let s = &seen[&sid];
        assert_eq!(s.reset, None, "stream {sid} reset: {seen:?}");
        assert_eq!(
            s.status.as_deref(),
            Some("0"),
            "stream {sid} served: {seen:?}"
        );
    }
    assert_eq!(seen[&5].reset, Some(REFUSED_STREAM), "{seen:?}");
    assert_eq!(
        backend.stats.calls.load(Relaxed),
        2,
        "the backend served streams 1 and 3, never 5"
    );
    let status = agent.wait_exit(BOUND).await.expect("the agent exits");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_after_kill_9_pods_fail_open_and_a_restarted_agent_adopts_the_pins() {
    require_root!();
    let s = Scenario::new(3).await.unwrap();
    let vip = vip(&s, 21);
    let bypassed = kube_proxy(vip, s.backends[0].1).await;
    let mut first = start_agent(&s, "agent-1", |a| s.agent_config(vip, a, "auto")).await;
    assert_eq!(
        counts(&s.call("client", vip, 30).await).len(),
        3,
        "balanced"
    );
    let redirected = first.bpf_counter("connect4_redirected");

    first.kill();
    let killed = Instant::now();
    // The links died with the process: the first connect after the kill goes around it.
    let answered = s.try_call("client", vip, Duration::from_secs(5)).await;
    let took = killed.elapsed();
    assert!(
        answered.is_some(),
        "no call reached the Service after the kill"
    );
    assert_eq!(
        bypassed.load(Relaxed),
        1,
        "the call went through kube-proxy"
    );
    assert!(took < Duration::from_secs(1), "fail-open took {took:?}");
    assert!(
        std::path::Path::new(&s.pin_path()).exists(),
        "the killed agent's pins stay for the next one"
    );

    // A client that connects while no agent runs: around it, to one backend.
    let mut around = Load::start(&s, "client", vip, 0, "pooled").await;
    around.wait_calls("calls around the dead agent", 50).await;
    let bypassed_before = bypassed.load(Relaxed);

    let second = start_agent(&s, "agent-2", |a| s.agent_config(vip, a, "auto")).await;
    // The counters map was adopted, not made anew.
    assert!(
        second.bpf_counter("connect4_redirected") >= redirected,
        "the restarted agent's counters start from the first one's"
    );
    // New connections are balanced again.
    let out = s.call("client", vip, 30).await;
    assert_eq!(counts(&out).len(), 3, "balanced after the restart: {out}");
    assert!(second.bpf_counter("connect4_redirected") > redirected);

    // The connection opened around the dead agent stays where it is, and keeps working.
    around.mark().await;
    around
        .wait_calls("calls on the bypassing connection after the restart", 100)
        .await;
    let phases = around.finish().await;
    let after = &phases[1];
    assert_eq!(after["failed"], 0, "{after}");
    assert_eq!(
        sequential(after).keys().collect::<Vec<_>>(),
        ["backend-1"],
        "still on the kube-proxy path: {after}"
    );
    assert_eq!(
        bypassed.load(Relaxed),
        bypassed_before,
        "no new connection went around the restarted agent"
    );
}

/// `balancer-agent probe WHAT --socket PATH`: its exit status and output.
fn probe(socket: &std::path::Path, what: &str) -> (bool, String) {
    let out = std::process::Command::new(balancer_tests::agent::agent_bin())
        .args(["probe", what, "--socket"])
        .arg(socket)
        .output()
        .expect("running balancer-agent probe");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn a_second_agent_shares_the_listener_answers_its_own_probes_and_takes_the_admin_address_over()
 {
    let backend = greeter::spawn("127.0.0.1:0", "backend-1").await;
    let listen = harness::local_addr();
    let admin = harness::local_addr();
    let config = harness::config(listen, admin, "round-robin", &[backend.addr], "");
    let dir = balancer_tests::agent::TempDir::new("balancer-handover-probe");
    let socket = |name: &str| dir.0.join(format!("{name}.sock"));
    let (sock_old, sock_new) = (socket("old"), socket("new"));
    let mut old = Agent::start_with(&config, admin, |c| {
        c.arg("--admin-socket").arg(&sock_old);
    })
    .await;
    assert_eq!(probe(&sock_old, "ready"), (true, "ready\n".into()));
    assert!(probe(&sock_old, "live").0);

    // The same configuration: the same listener address (SO_REUSEPORT) and admin address.
    // `start_with` returns at once (the old agent answers on the admin address); the new one
    // answers its own probes on its own socket.
    let mut new = Agent::start_with(&config, admin, |c| {
        c.arg("--admin-socket").arg(&sock_new);
    })
    .await;
    balancer_tests::wait_until("the new agent ready on its socket", BOUND, || {
        probe(&sock_new, "ready").0
    })
    .await;
    assert!(new.exited().is_none(), "the second agent runs");
    let mut c = harness::client(listen).await;
    c.say_hello(harness::hello("both")).await.unwrap();

    old.sigterm();
    let status = old.wait_exit(BOUND).await.expect("the old agent exits");
    assert!(status.success(), "{status}");
    assert!(
        !probe(&sock_old, "ready").0,
        "the old agent's socket is gone with it"
    );
    // The new agent takes the admin address over once it is free, and serves the listener.
    balancer_tests::wait_until_async("the new agent on the admin address", BOUND, || async {
        matches!(
            balancer_tests::agent::http_get(admin, "/ready"),
            Ok((200, _))
        )
    })
    .await;
    let mut c = harness::client(listen).await;
    let r = c.say_hello(harness::hello("after")).await.unwrap();
    assert_eq!(r.into_inner().backend, "backend-1");
    assert!(probe(&sock_new, "ready").0);
    assert!(new.exited().is_none());
}
