//! The client pod's own address, end to end on a simulated node: a backend that accepts only
//! the client pod's IP (an allow list, as a NetworkPolicy keyed by pod selectors ends up) keeps
//! working when the pod's calls go through the agent, because the agent connects to endpoints
//! from the pod's network namespace and address (`datapath.source_address: pod`, the default).
//! Every test needs root (skipped loudly without it).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use balancer_tests::{
    agent::Agent,
    free_port,
    node::{BACKEND_PORT, Scenario, pod_bin},
    require_root,
};

/// Starts `count` backend pods `guarded-N` that accept connections from `allow` only.
async fn guarded_backends(s: &mut Scenario, count: usize, allow: &str) -> Vec<SocketAddr> {
    let mut addrs = Vec::new();
    for i in 1..=count {
        let name = format!("guarded-{i}");
        let pod = s.node.add_pod(&name).expect("adding a backend pod");
        let listen = format!("0.0.0.0:{BACKEND_PORT}");
        let child = pod
            .command(
                pod_bin().to_str().expect("UTF-8 path"),
                &[
                    "serve", "--name", &name, "--listen", &listen, "--allow", allow,
                ],
            )
            .spawn()
            .expect("starting a guarded backend");
        s.children.push(child);
        addrs.push(SocketAddr::from((pod.ip, BACKEND_PORT)));
    }
    for addr in &addrs {
        let addr = *addr;
        // The listener is up once a connect succeeds (the allow list closes it at once).
        balancer_tests::wait_until_async(
            &format!("{addr} listening"),
            Duration::from_secs(10),
            || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
        )
        .await;
    }
    addrs
}

/// The agent's configuration: service `guarded` on `vip` over `endpoints`, with the given
/// `datapath.source_address`.
fn config(
    s: &Scenario,
    vip: SocketAddr,
    endpoints: &[SocketAddr],
    admin: SocketAddr,
    source: &str,
) -> String {
    let eps: String = endpoints
        .iter()
        .map(|a| format!("      - address: {a}\n"))
        .collect();
    let services = format!(
        "  - name: guarded\n    vips: [\"{vip}\"]\n    policy: round-robin\n    endpoints:\n{eps}"
    );
    s.config_with_services(&services, admin, "off").replacen(
        "  opted_in_cgroups:",
        &format!("  source_address: {source}\n  opted_in_cgroups:"),
        1,
    )
}

async fn start(s: &Scenario, yaml: impl FnOnce(SocketAddr) -> String) -> Agent {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cg = s.node.agent_cgroup().expect("agent cgroup");
    let agent = Agent::start_in_cgroup(&yaml(admin), admin, cg.path()).await;
    std::mem::forget(cg);
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_backends_see_the_client_pods_address_and_their_allow_list_holds() {
    require_root!();
    let mut s = Scenario::new(0).await.unwrap();
    let client_ip = s.node.pod("client").ip.to_string();
    let endpoints = guarded_backends(&mut s, 2, &client_ip).await;
    let gw = s.node.gateway.octets();
    let vip_ip = std::net::Ipv4Addr::new(10, 96, gw[2], 40);
    s.node.add_vip(vip_ip).unwrap();
    let vip = SocketAddr::from((vip_ip, BACKEND_PORT));

    // The allow list is real: the node's address is refused, the client pod's is served.
    let mut agent = start(&s, |admin| config(&s, vip, &endpoints, admin, "node")).await;
    assert!(
        s.try_call("client", vip, Duration::from_secs(10))
            .await
            .is_none(),
        "from the node's address the backends' allow list refuses the calls"
    );
    agent.terminate();

    let _agent = start(&s, |admin| config(&s, vip, &endpoints, admin, "pod")).await;
    let out = s.call("client", vip, 40).await;
    let counts: BTreeMap<String, u64> = out["counts"]
        .as_object()
        .expect("counts")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    assert_eq!(
        counts,
        BTreeMap::from([("guarded-1".into(), 20), ("guarded-2".into(), 20)]),
        "from the pod's address both backends serve, per call"
    );
}
