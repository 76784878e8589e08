//! The `--routes` scenario of `balancer-bench`: every proxy has the same ten routes in its own
//! language, and every call goes through all of them before the last one takes it.
//!
//! The four backends are two subsets: `v1` (the first two) and `v2` (the other two). Routes,
//! tried in order:
//! - 3 on the method (`/helloworld.Greeter/Other1..3`, which the load never calls) to `v2`;
//! - 6 on a header (`x-tenant: tenant-1..6`; the load sends `x-tenant: bench`) to `v2`;
//! - 1 on a header the load sends (`x-env: prod`): a split, 80% `v1` and 20% `v2`.
//!
//! balancer-agent: its `routes` section (subsets by endpoint labels, `match` on `path` and
//! `headers`, weighted `backends`). HAProxy: ACLs on `path` and `req.hdr()`, `use_backend`, and
//! the split as server weights in one backend (40+40 on `v1`, 10+10 on `v2`). nginx: exact
//! `location`s for the methods, a `map` of the tenant header, `split_clients` on `$request_id`
//! for the split, `grpc_pass` to the upstream the maps chose.

use std::net::SocketAddr;

/// The headers every call of the scenario carries.
pub const HEADERS: &[(&str, &str)] = &[("x-tenant", "bench"), ("x-env", "prod")];

const METHODS: usize = 3;
const TENANTS: usize = 6;

/// The agent's endpoints (with their subset labels) and its `routes` section.
pub fn agent(backends: &[SocketAddr]) -> (String, String) {
    let endpoints = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "      - address: {b}\n        labels: {{version: v{}}}\n",
                1 + i * 2 / backends.len()
            )
        })
        .collect();
    let mut rules = String::new();
    for m in 1..=METHODS {
        rules += &format!(
            "      - name: method-{m}\n        match: [{{path: {{exact: /helloworld.Greeter/Other{m}}}}}]\n        backends: [{{subset: v2}}]\n"
        );
    }
    for t in 1..=TENANTS {
        rules += &format!(
            "      - name: tenant-{t}\n        match: [{{headers: {{x-tenant: {{exact: tenant-{t}}}}}}}]\n        backends: [{{subset: v2}}]\n"
        );
    }
    rules += "      - name: prod-split\n        match: [{headers: {x-env: {exact: prod}}}]\n        backends: [{subset: v1, weight: 80}, {subset: v2, weight: 20}]\n";
    let routes = format!(
        "routes:\n  - service: greeter\n    subsets:\n      - {{name: v1, labels: {{version: v1}}}}\n      - {{name: v2, labels: {{version: v2}}}}\n    rules:\n{rules}"
    );
    (endpoints, routes)
}

/// `(i, backend)` of subset `v1` (`true`) or `v2`.
fn subset(backends: &[SocketAddr], v1: bool) -> impl Iterator<Item = (usize, &SocketAddr)> {
    let half = backends.len() / 2;
    backends
        .iter()
        .enumerate()
        .filter(move |(i, _)| (*i < half) == v1)
}

/// HAProxy's frontend rules and backends (after `bind`).
pub fn haproxy(backends: &[SocketAddr]) -> String {
    let mut out = String::new();
    for m in 1..=METHODS {
        out += &format!("    acl method{m} path /helloworld.Greeter/Other{m}\n");
    }
    for t in 1..=TENANTS {
        out += &format!("    acl tenant{t} req.hdr(x-tenant) -m str tenant-{t}\n");
    }
    out += "    acl prod req.hdr(x-env) -m str prod\n";
    for m in 1..=METHODS {
        out += &format!("    use_backend v2 if method{m}\n");
    }
    for t in 1..=TENANTS {
        out += &format!("    use_backend v2 if tenant{t}\n");
    }
    out += "    use_backend split if prod\n    default_backend greeter\n\n";
    let server = |(i, b): (usize, &SocketAddr), weight: u32| {
        format!("    server b{} {b} proto h2 weight {weight}\n", i + 1)
    };
    out += "backend v2\n    balance roundrobin\n";
    out += &subset(backends, false)
        .map(|s| server(s, 1))
        .collect::<String>();
    // 80/20 over two and two servers: 40 each on v1, 10 each on v2.
    out += "\nbackend split\n    balance roundrobin\n";
    out += &subset(backends, true)
        .map(|s| server(s, 40))
        .collect::<String>();
    out += &subset(backends, false)
        .map(|s| server(s, 10))
        .collect::<String>();
    out += "\nbackend greeter\n    balance roundrobin\n";
    out += &backends
        .iter()
        .enumerate()
        .map(|s| server(s, 1))
        .collect::<String>();
    out
}

/// nginx's `http`-level maps and upstreams (`keepalive` as `upstream_keepalive`), and the
/// `server`'s locations.
pub fn nginx(backends: &[SocketAddr], upstream_keepalive: &str) -> (String, String) {
    let upstream = |name: &str, servers: Vec<&SocketAddr>| {
        let servers: String = servers
            .iter()
            .map(|b| format!("        server {b};\n"))
            .collect();
        format!("    upstream {name} {{\n{servers}{upstream_keepalive}    }}\n")
    };
    let mut http = String::from("    map $http_x_tenant $tenant_pool {\n        default \"\";\n");
    for t in 1..=TENANTS {
        http += &format!("        tenant-{t} v2;\n");
    }
    http += "    }\n    split_clients \"${request_id}\" $split {\n        80% v1;\n        * v2;\n    }\n";
    http += "    map \"$tenant_pool:$http_x_env\" $pool {\n        default greeter;\n        ~^v2: v2;\n        :prod $split;\n    }\n";
    http += &upstream("v1", subset(backends, true).map(|(_, b)| b).collect());
    http += &upstream("v2", subset(backends, false).map(|(_, b)| b).collect());
    http += &upstream("greeter", backends.iter().collect());
    let mut locations = String::new();
    for m in 1..=METHODS {
        locations += &format!(
            "        location = /helloworld.Greeter/Other{m} {{\n            grpc_pass grpc://v2;\n        }}\n"
        );
    }
    locations += "        location / {\n            grpc_pass grpc://$pool;\n        }\n";
    (http, locations)
}
