//! `balancer-agent inspect`: the operator's view of a node, read from the agent's localhost
//! admin API, as a table or as JSON.
#![forbid(unsafe_code)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

use serde_json::Value;

/// `balancer-agent inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The agent's admin address.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:15000",
        env = "BALANCER_ADMIN"
    )]
    pub admin: SocketAddr,
    /// Output: `table` or `json`.
    #[arg(long, short, global = true, default_value = "table")]
    pub output: String,
    /// Where the datapath's maps are pinned (read by `inspect bpf`).
    #[arg(
        long,
        global = true,
        default_value = "/sys/fs/bpf/balancer",
        env = "BALANCER_PIN_PATH"
    )]
    pub pin_path: std::path::PathBuf,
    /// What to show.
    #[command(subcommand)]
    pub what: What,
}

/// What `inspect` shows.
#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// Version, readiness, datapath, counts.
    Status,
    /// Services with their VIPs, policy and endpoint counts.
    Services,
    /// Endpoints with health, in-flight calls, EWMA latency, calls and failures.
    Endpoints {
        /// Only this service (an unknown name is an error).
        service: Option<String>,
    },
    /// The traffic policy in force: each service's routes, where each came from, and what
    /// the sources refused.
    Routes {
        /// Only this service.
        service: Option<String>,
    },
    /// What the agent would do with one call: the route that takes it, its backends with
    /// their weights and endpoints, and why every other route does not.
    Explain {
        /// The destination: a `VIP:port`, an `:authority`, or a service name.
        #[arg(long)]
        to: String,
        /// The call's `:path`, `/package.Service/Method`.
        #[arg(long)]
        method: String,
        /// A request header, `name:value`; repeat for more.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
    },
    /// Live client connections.
    Connections,
    /// Calls in flight.
    Calls,
    /// The datapath maps and counters, read from the pinned maps.
    Bpf,
    /// The configuration in force.
    Config,
}

/// Runs `inspect`.
pub fn main(args: Args) -> ExitCode {
    let path = match &args.what {
        What::Status => "/api/status".to_string(),
        What::Services => "/api/services".into(),
        What::Endpoints { service: Some(s) } => format!("/api/endpoints?service={}", encode(s)),
        What::Endpoints { service: None } => "/api/endpoints".into(),
        What::Routes { service: Some(s) } => format!("/api/routes?service={}", encode(s)),
        What::Routes { service: None } => "/api/routes".into(),
        What::Explain {
            to,
            method,
            headers,
        } => {
            let mut q = format!("/api/explain?to={}&method={}", encode(to), encode(method));
            for h in headers {
                q += &format!("&header={}", encode(h));
            }
            q
        }
        What::Connections => "/api/connections".into(),
        What::Calls => "/api/calls".into(),
        What::Bpf => "/api/bpf".into(),
        What::Config => "/config_dump".into(),
    };
    let fetched = if let What::Bpf = args.what {
        crate::ebpf::pinned::read(&args.pin_path)
            .map_err(|e| format!("balancer-agent inspect bpf: {e}"))
    } else {
        get_json(args.admin, &path).map_err(|e| match e.strip_prefix("HTTP ") {
            // The agent answered: what it said is the error (an unknown service, a bad
            // argument).
            Some(answer) => format!("balancer-agent inspect: {answer}"),
            None => format!(
                "balancer-agent inspect: cannot reach the agent's admin API at http://{}{path}: {e}; \
                 check that the agent runs on this node (kubectl -n balancer-system get pods -o wide) \
                 and that --admin matches its admin.address",
                args.admin
            ),
        })
    };
    let value = match fetched {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if args.output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("serializable")
        );
        return ExitCode::SUCCESS;
    }
    print!("{}", render(&args.what, &value));
    ExitCode::SUCCESS
}

/// GETs a JSON document from the admin API (HTTP/1.0, no dependencies beyond std).
pub fn get_json(admin: SocketAddr, path: &str) -> Result<Value, String> {
    let mut s =
        TcpStream::connect_timeout(&admin, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        return Err(format!("HTTP {status}: {}", body.trim()));
    }
    serde_json::from_str(body).map_err(|e| format!("invalid JSON: {e}"))
}

/// `text` as a URL query value: everything but unreserved characters `%XX`-escaped.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.2}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// A table with aligned columns.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out += &line(r);
    }
    out
}

fn rows(v: &Value, keys: &[&str]) -> Vec<Vec<String>> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|item| keys.iter().map(|k| s(&item[*k])).collect())
                .collect()
        })
        .unwrap_or_default()
}

fn render(what: &What, v: &Value) -> String {
    match what {
        What::Status => {
            let mut out = String::new();
            let ready = if v["ready"] == Value::Bool(true) {
                "yes".to_string()
            } else {
                format!("no ({})", s(&v["not_ready_reasons"]))
            };
            out += &format!("version:            {}\n", s(&v["version"]));
            out += &format!("ready:              {ready}\n");
            out += &format!("uptime:             {}s\n", s(&v["uptime_seconds"]));
            out += &format!("source:             {}\n", s(&v["source"]));
            if v["restart_required"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
            {
                out += &format!(
                    "restart required:   {} (changed in the file; `inspect config` shows the values in force)\n",
                    s(&v["restart_required"])
                );
            }
            match &v["datapath"] {
                Value::Null => out += "datapath:           off (standalone proxy)\n",
                d => {
                    out += &format!("datapath:           {}\n", s(&d["programs"]));
                    out += &format!("  cgroup root:      {}\n", s(&d["cgroup_root"]));
                    out += &format!("  proxy address:    {}\n", s(&d["proxy_address"]));
                    out += &format!("  pinned maps:      {}\n", s(&d["pin_dir"]));
                    let on = if d["shortcut"]["enabled"] == Value::Bool(true) {
                        "on"
                    } else {
                        "off"
                    };
                    out += &format!(
                        "  sk_msg shortcut:  {on} ({})\n",
                        s(&d["shortcut"]["reason"])
                    );
                }
            }
            let per_worker: Vec<String> = v["worker_connections"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            out += &format!(
                "services:           {}\nendpoints:          {} ready of {}\nclient connections: {} (per worker: {})\nactive calls:       {}\n",
                s(&v["services"]),
                s(&v["ready_endpoints"]),
                s(&v["endpoints"]),
                s(&v["client_connections"]),
                per_worker.join(" "),
                s(&v["active_calls"])
            );
            out
        }
        What::Services => table(
            &[
                "SERVICE",
                "VIPS",
                "AUTHORITIES",
                "PROTOCOL",
                "POLICY",
                "READY",
                "TOTAL",
            ],
            rows(
                v,
                &[
                    "name",
                    "vips",
                    "authorities",
                    "protocol",
                    "policy",
                    "ready_endpoints",
                    "endpoints",
                ],
            ),
        ),
        What::Endpoints { .. } => table(
            &[
                "SERVICE",
                "ENDPOINT",
                "NAME",
                "ZONE",
                "NODE",
                "HEALTH",
                "IN-FLIGHT",
                "EWMA-MS",
                "CALLS",
                "FAILURES",
                "CONNS",
            ],
            rows(
                v,
                &[
                    "service",
                    "address",
                    "name",
                    "zone",
                    "node",
                    "health",
                    "in_flight",
                    "ewma_ms",
                    "calls",
                    "failures",
                    "connections",
                ],
            ),
        ),
        What::Connections => table(
            &[
                "ID", "CLIENT", "LOCAL", "TARGET", "AGE-S", "ACTIVE", "CALLS",
            ],
            rows(
                v,
                &[
                    "id",
                    "peer",
                    "local",
                    "target",
                    "age_seconds",
                    "active_calls",
                    "calls_total",
                ],
            ),
        ),
        What::Calls => table(
            &["CONN", "CLIENT", "METHOD", "SERVICE", "ENDPOINT", "AGE-S"],
            rows(
                v,
                &[
                    "connection",
                    "peer",
                    "method",
                    "service",
                    "endpoint",
                    "age_seconds",
                ],
            ),
        ),
        What::Routes { .. } => render_routes(v),
        What::Explain { .. } => render_explain(v),
        What::Bpf => render_bpf(v),
        What::Config => serde_json::to_string_pretty(v).expect("serializable") + "\n",
    }
}

/// A backend in a line: `greeter subset v1 (version=v1) weight 80 (80%), round-robin:
/// 10.0.0.1:50051 10.0.0.2:50051`.
fn backend_line(b: &Value) -> String {
    let mut line = s(&b["service"]);
    if !b["subset"].is_null() {
        line += &format!(" subset {}", s(&b["subset"]));
        if let Some(labels) = b["labels"].as_object() {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}={}", s(v)))
                .collect();
            line += &format!(" ({})", l.join(","));
        }
    }
    let percent = b["percent"].as_f64().unwrap_or_default();
    line += &format!(" weight {} ({percent}%)", s(&b["weight"]));
    if !b["error"].is_null() {
        return line + &format!(": {}", s(&b["error"]));
    }
    let eps: Vec<String> = b["endpoints"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    let eps = if eps.is_empty() {
        "no ready endpoint".to_string()
    } else {
        eps.join(" ")
    };
    line + &format!(", {}: {eps}", s(&b["policy"]))
}

/// A route's retries and faults, one line each (`call::retry`, `call::fault`).
fn policy_lines(r: &Value, indent: &str) -> String {
    let mut out = String::new();
    let t = &r["retries"];
    if !t.is_null() {
        out += &format!(
            "{indent}retries: {} attempt(s) on {}",
            s(&t["attempts"]),
            s(&t["retry_on"])
        );
        if !t["per_try_timeout"].is_null() {
            out += &format!(", {} per try", s(&t["per_try_timeout"]));
        }
        out += "\n";
    }
    let f = &r["fault"];
    let mut faults = Vec::new();
    if !f["delay"].is_null() {
        let d = &f["delay"];
        faults.push(format!("delay {} on {}%", s(&d["fixed"]), s(&d["percent"])));
    }
    if !f["abort"].is_null() {
        let a = &f["abort"];
        faults.push(format!("abort {} on {}%", s(&a["code"]), s(&a["percent"])));
    }
    if !faults.is_empty() {
        out += &format!("{indent}fault:   {}\n", faults.join(", "));
    }
    out
}

/// A service's circuit breaker, outlier detection and retry budget (`call::breaker`): the
/// settings it has, one line each.
fn resilience_lines(r: &Value, indent: &str) -> String {
    let set = |v: &Value| -> Vec<String> {
        v.as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| format!("{k} {}", s(v)))
            .collect()
    };
    let mut out = String::new();
    for (key, what) in [
        ("connection_pool", "circuit breaker"),
        ("outlier_detection", "outlier detection"),
        ("retry_budget", "retry budget"),
    ] {
        let fields = set(&r[key]);
        if !fields.is_empty() {
            out += &format!("{indent}{what}: {}\n", fields.join(", "));
        }
    }
    out
}

fn render_routes(v: &Value) -> String {
    let mut out = String::new();
    for svc in v["services"].as_array().into_iter().flatten() {
        out += &format!(
            "SERVICE {} (policy from {})",
            s(&svc["service"]),
            s(&svc["from"])
        );
        if svc["unresolved"] == Value::Bool(true) {
            out += " -- not a known service: nothing routed yet";
        }
        if !svc["load_balancer"].is_null() {
            out += &format!(", load balancer {}", s(&svc["load_balancer"]));
        }
        out += "\n";
        out += &resilience_lines(&svc["resilience"], "  ");
        for (i, r) in svc["routes"].as_array().into_iter().flatten().enumerate() {
            out += &format!("  {}. {}  [{}]\n", i + 1, s(&r["name"]), s(&r["source"]));
            let matches = r["matches"].as_array().map_or(0, Vec::len);
            if matches == 0 {
                out += "     match:   any call\n";
            }
            for m in r["matches"].as_array().into_iter().flatten() {
                out += &format!("     match:   {}\n", s(m));
            }
            for b in r["backends"].as_array().into_iter().flatten() {
                out += &format!("     backend: {}\n", backend_line(b));
            }
            if !r["timeout_ms"].is_null() {
                out += &format!("     timeout: {} ms\n", s(&r["timeout_ms"]));
            }
            out += &policy_lines(r, "     ");
        }
        out += "  otherwise: every endpoint of the service\n\n";
    }
    if v["services"].as_array().is_none_or(Vec::is_empty) {
        out +=
            "no traffic policy in force: every call goes to all the endpoints of its service\n\n";
    }
    let rejected = v["rejected"].as_array().map_or(0, Vec::len);
    if rejected > 0 {
        out += "REFUSED (the last good policy stays in force)\n";
        out += &table(
            &["KIND", "NAME", "SERVICE", "REASON"],
            rows(&v["rejected"], &["kind", "name", "service", "reason"]),
        );
    }
    out
}

fn render_explain(v: &Value) -> String {
    let mut out = format!("service:  {}\n", s(&v["service"]));
    out += &format!("decision: {}\n", s(&v["outcome"]));
    let r = &v["route"];
    if !r.is_null() {
        for m in r["matches"].as_array().into_iter().flatten() {
            out += &format!("  match:   {}\n", s(m));
        }
        if !r["timeout_ms"].is_null() {
            out += &format!("  timeout: {} ms\n", s(&r["timeout_ms"]));
        }
        out += &policy_lines(r, "  ");
    }
    out += &resilience_lines(&v["resilience"], "");
    out += "backends:\n";
    for b in v["backends"].as_array().into_iter().flatten() {
        out += &format!("  {}\n", backend_line(b));
    }
    let picks = v["picks"].as_array().into_iter().flatten();
    let picks: Vec<_> = picks.map(|p| [s(&p["address"]), s(&p["why"])]).collect();
    if !picks.is_empty() {
        out += "which endpoint (why each gets its share):\n";
        let width = picks.iter().map(|[a, _]| a.len()).max().unwrap_or(0);
        for [address, why] in picks {
            out += &format!("  {address:width$}  {why}\n");
        }
    }
    let others = v["others"].as_array().map_or(0, Vec::len);
    if others > 0 {
        out += "other routes:\n";
        for o in v["others"].as_array().into_iter().flatten() {
            out += &format!("  {}  [{}]:", s(&o["name"]), s(&o["source"]));
            let why: Vec<String> = o["why"].as_array().into_iter().flatten().map(s).collect();
            if why.len() == 1 {
                out += &format!(" {}\n", why[0]);
            } else {
                out += "\n";
                for w in why {
                    out += &format!("    {w}\n");
                }
            }
        }
    }
    out
}

fn render_bpf(v: &Value) -> String {
    let a = &v["agent"];
    let mut out = format!(
        "pinned maps:  {}\nagent lease:  {} ({} ms left), proxy {}, redirect {}\n\n",
        s(&v["pin_path"]),
        if a["alive"] == Value::Bool(true) {
            "alive"
        } else {
            "EXPIRED (pods fail open)"
        },
        s(&a["lease_remaining_ms"]),
        s(&a["proxy_address"]),
        s(&a["redirect"]),
    );
    out += "AGENT SLOTS (BLB_AGENT)\n";
    out += &table(
        &["SLOT", "PID", "LIVE", "REDIRECT", "LEASE-MS", "PROXY"],
        rows(
            &a["slots"],
            &[
                "slot",
                "pid",
                "live",
                "redirect",
                "lease_remaining_ms",
                "proxy_address",
            ],
        ),
    );
    out += "\n";
    out += "SERVICES (BLB_SERVICES)\n";
    out += &table(
        &["VIP", "SERVICE-ID"],
        rows(&v["services"], &["vip", "service_id"]),
    );
    let opted: Vec<String> = v["opted_in_cgroups"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    out += &format!("\nOPTED-IN CGROUPS (BLB_OPTED_IN): {}\n", opted.join(" "));
    out += "\nORIGINAL DESTINATIONS (BLB_ORIG_TUPLE)\n";
    out += &table(
        &["CLIENT", "PROXY", "ORIGINAL-DESTINATION", "SERVICE-ID"],
        rows(
            &v["orig_dst_by_tuple"],
            &["client", "proxy", "original_destination", "service_id"],
        ),
    );
    out += &format!(
        "\npending connects (BLB_ORIG_COOKIE): {}\n\nCOUNTERS (BLB_COUNTERS)\n",
        s(&v["orig_dst_by_cookie"])
    );
    if let Some(c) = v["counters"].as_object() {
        out += &table(
            &["COUNTER", "VALUE"],
            c.iter().map(|(k, v)| vec![k.clone(), s(v)]).collect(),
        );
    }
    out
}
