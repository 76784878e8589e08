//! `balancer-bench`: the end-to-end benchmark of balancer-agent beside nginx and HAProxy.
//!
//! One run, side by side, against the same four greeter backends:
//! - `direct`: the client spreads its calls itself over one connection per backend (baseline);
//! - `agent`: balancer-agent, standalone configuration, P2C over peak-EWMA;
//! - `nginx`: `grpc_pass` to an upstream of the four backends, HTTP/2 listener;
//! - `haproxy`: `mode http`, `proto h2` on the bind line and on the servers, round robin.
//!
//! Fairness: every proxy is pinned with `taskset` to the same CPUs (`--proxy-cpus`, default
//! the last core) with the same number of workers (`--workers`, default 1: the agent's
//! data-plane workers (`--workers`), nginx `worker_processes`, haproxy `nbthread`).
//! The load generator and the backends are pinned to the other CPUs (`--client-cpus`), so the
//! proxy under test never competes with them for a core.
//!
//! Load: for each concurrency (default 1, 64, 100, 1000), in each of `--rounds` rounds (default 3),
//! for each target in turn, one HTTP/2 connection carries that many unary `SayHello` calls in
//! flight for a warm-up, then for the measured window. The machine is shared and noisy, so a
//! ratio between the agent and a peer is taken within each round (runs seconds apart) and the
//! median over the rounds is reported with its range; the targets are checked on the median.
//! Figures: calls/s, p50/p90/p99 latency, the proxy's CPU time per call
//! (utime + stime of all its processes over the window, divided by the calls completed in it),
//! its CPU use, its resident memory (the highest VmRSS sampled in the window, and VmHWM), and
//! failed calls.

pub mod loadgen;
pub mod peers;
pub mod procfs;
pub mod routes;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use peers::{Placement, Proxy};

/// The targets, in the order they are run and shown.
pub const TARGETS: [&str; 4] = ["direct", "agent", "nginx", "haproxy"];

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the JSON results go.
    pub out: PathBuf,
    /// Measured window of each run.
    pub duration: Duration,
    /// Warm-up before each window.
    pub warmup: Duration,
    /// Calls in flight, one run each.
    pub concurrency: Vec<usize>,
    /// Rounds of every target at each concurrency (paired for the ratios).
    pub rounds: usize,
    /// Which of [`TARGETS`] to run.
    pub targets: Vec<String>,
    /// The proxies route every call through ten routes ([`routes`]); `direct` calls the
    /// backends as ever.
    pub routes: bool,
    /// Proxy CPUs and workers.
    pub placement: Placement,
    /// `taskset -c` list for this process (load generator and backends); empty: no pinning.
    pub client_cpus: String,
}

/// One run: one target at one concurrency.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// `direct`, `agent`, `nginx`, `haproxy`.
    pub target: String,
    /// Calls in flight.
    pub concurrency: usize,
    /// Which round (from 1).
    pub round: usize,
    /// Successful calls completed in the window.
    pub calls: u64,
    /// Failed calls (whole run).
    pub errors: u64,
    /// The first error messages, if any.
    pub first_errors: Vec<String>,
    /// The measured window, seconds.
    pub window_s: f64,
    /// Calls per second.
    pub calls_per_s: f64,
    /// Latency percentiles, microseconds.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// The proxy's CPU time in the window, seconds (none for `direct`).
    pub proxy_cpu_s: Option<f64>,
    /// The proxy's CPU time per call, µs.
    pub proxy_cpu_us_per_call: Option<f64>,
    /// The proxy's time on a CPU per call from the scheduler's exact clock
    /// (`/proc/<pid>/task/*/schedstat`), µs: a cross-check of the tick-sampled figure.
    pub proxy_sched_us_per_call: Option<f64>,
    /// The proxy's `write`/`writev` system calls per call (`syscw` of `/proc/<pid>/io`): how
    /// well it batches frames into writes. `send`/`sendmsg` are not counted by the kernel
    /// there, so a proxy that sends with them (haproxy) shows about 0.
    pub proxy_writev_per_call: Option<f64>,
    /// The proxy's CPU use in the window, in cores (1.0 = one core busy).
    pub proxy_cpu_cores: Option<f64>,
    /// The highest VmRSS sampled (every 100 ms) in the window, summed over the proxy's
    /// processes, MiB.
    pub proxy_rss_max_mib: Option<f64>,
    /// VmHWM (peak resident set since start) after the run, summed, MiB.
    pub proxy_hwm_mib: Option<f64>,
}

/// Runs the benchmark, prints the table and writes the JSON.
pub fn main(opts: Options) -> anyhow::Result<()> {
    // Counted before this process is pinned (pinning narrows what it reports).
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    if !opts.client_cpus.is_empty() {
        // Before any thread exists, so that every thread of this process inherits it.
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", &opts.client_cpus])
            .arg(std::process::id().to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .context("running taskset")?;
        anyhow::ensure!(
            status.success(),
            "taskset -p -c {} failed",
            opts.client_cpus
        );
    }
    let noise = noise();
    eprintln!(
        "balancer-bench: proxies on CPUs {} with {} worker(s); load generator and backends on CPUs {}; \
         {} s warm-up + {} s per run; {noise}",
        opts.placement.proxy_cpus,
        opts.placement.workers,
        if opts.client_cpus.is_empty() {
            "any"
        } else {
            &opts.client_cpus
        },
        opts.warmup.as_secs_f64(),
        opts.duration.as_secs_f64(),
    );

    let backends = peers::spawn_backends(4)?;
    let wants = |t: &str| opts.targets.iter().any(|x| x == t);
    let mut proxies: Vec<Proxy> = Vec::new();
    if wants("agent") {
        proxies.push(peers::start_agent(&opts.placement, &backends, opts.routes)?);
    }
    if wants("nginx") {
        proxies.push(peers::start_nginx(&opts.placement, &backends, opts.routes)?);
    }
    if wants("haproxy") {
        proxies.push(peers::start_haproxy(
            &opts.placement,
            &backends,
            opts.routes,
        )?);
    }
    for p in &proxies {
        eprintln!("  {} on {} (pids {:?})", p.name, p.addr, p.pids);
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ticks = procfs::clock_ticks();
    let mut results = Vec::new();
    for &c in &opts.concurrency {
        for (round, target) in (1..=opts.rounds.max(1))
            .flat_map(|r| TARGETS.iter().filter(|t| wants(t)).map(move |t| (r, t)))
        {
            let proxy = proxies.iter().find(|p| p.name == *target);
            let addrs: Vec<SocketAddr> = match proxy {
                Some(p) => vec![p.addr],
                None => backends.clone(),
            };
            let r = rt.block_on(run_one(target, proxy, &addrs, (c, round), &opts, ticks))?;
            eprintln!(
                "  {target:>8} c={c:<5} round {round} {:>9.0} calls/s  p50 {:>8.0} us  p99 {:>8.0} us  cpu/call {} (sched {})  errors {}",
                r.calls_per_s,
                r.p50_us,
                r.p99_us,
                r.proxy_cpu_us_per_call
                    .map_or("-".into(), |v| format!("{v:.1} us")),
                r.proxy_sched_us_per_call
                    .map_or("-".into(), |v| format!("{v:.1} us")),
                r.errors
            );
            results.push(r);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    drop(proxies);

    let report = Report::new(&results);
    println!("{}", report.text(&opts));
    let doc = json!({
        "settings": {
            "proxy_cpus": opts.placement.proxy_cpus,
            "proxy_workers": opts.placement.workers,
            "client_cpus": opts.client_cpus,
            "warmup_s": opts.warmup.as_secs_f64(),
            "duration_s": opts.duration.as_secs_f64(),
            "concurrency": opts.concurrency,
            "rounds": opts.rounds,
            "connections": "one HTTP/2 connection from the load generator to each proxy; one per backend for direct",
            "backends": backends.len(),
            "cpus": cpus,
            "noise": noise,
            "nginx": version("nginx", &["-v"]),
            "haproxy": version("haproxy", &["-v"]),
            "scenario": if opts.routes { "routes: 3 method routes, 6 header routes, then an 80/20 split (tests/src/bench/routes.rs)" } else { "one upstream of four backends" },
            "retries": opts.placement.retries,
            "health_checks": if opts.placement.health_checks { "on: agent grpc.health.v1 Watch, haproxy check inter 1s, nginx none (open source)" } else { "off" },
        },
        "results": results,
        "ratios": report.ratios,
        "targets": report.targets,
    });
    if let Some(dir) = opts.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.out, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", opts.out.display()))?;
    eprintln!("balancer-bench: results written to {}", opts.out.display());
    Ok(())
}

async fn run_one(
    target: &str,
    proxy: Option<&Proxy>,
    addrs: &[SocketAddr],
    (concurrency, round): (usize, usize),
    opts: &Options,
    ticks: f64,
) -> anyhow::Result<RunResult> {
    let begin = Instant::now();
    let window_start = begin + opts.warmup;
    let window_end = window_start + opts.duration;
    let pids = proxy.map(|p| p.pids.clone()).unwrap_or_default();
    // Samples the proxy's CPU at both ends of the window, and its RSS in between.
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(window_start.into()).await;
        let (t0, cpu0, sched0, writes0) = (
            Instant::now(),
            procfs::cpu_ticks_of(&pids),
            procfs::sched_ns_of(&pids),
            procfs::write_calls_of(&pids),
        );
        let mut rss_max = procfs::rss_kib(&pids);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while Instant::now() < window_end {
            tick.tick().await;
            rss_max = rss_max.max(procfs::rss_kib(&pids));
        }
        let (t1, cpu1, sched1, writes1) = (
            Instant::now(),
            procfs::cpu_ticks_of(&pids),
            procfs::sched_ns_of(&pids),
            procfs::write_calls_of(&pids),
        );
        (
            t0,
            t1,
            cpu1.saturating_sub(cpu0),
            sched1.saturating_sub(sched0),
            writes1.saturating_sub(writes0),
            rss_max,
        )
    });
    let authority = "greeter.bench";
    let headers = if opts.routes { routes::HEADERS } else { &[] };
    let samples = loadgen::run(addrs, authority, headers, concurrency, window_end).await?;
    let (t0, t1, cpu, sched, writes, rss_max) = sampler.await?;
    let mut lat: Vec<Duration> = samples
        .calls
        .iter()
        .filter(|(end, _)| *end >= t0 && *end <= t1)
        .map(|(_, l)| *l)
        .collect();
    lat.sort_unstable();
    let calls = lat.len() as u64;
    let window = (t1 - t0).as_secs_f64();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1e6
    };
    let cpu_s = cpu as f64 / ticks;
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok(RunResult {
        target: target.into(),
        concurrency,
        round,
        calls,
        errors: samples.errors,
        first_errors: samples.first_errors,
        window_s: window,
        calls_per_s: calls as f64 / window,
        p50_us: pct(0.50),
        p90_us: pct(0.90),
        p99_us: pct(0.99),
        proxy_cpu_s: proxy.map(|_| cpu_s),
        proxy_cpu_us_per_call: proxy.map(|_| cpu_s * 1e6 / calls.max(1) as f64),
        proxy_sched_us_per_call: proxy.map(|_| sched as f64 / 1e3 / calls.max(1) as f64),
        proxy_writev_per_call: proxy.map(|_| writes as f64 / calls.max(1) as f64),
        proxy_cpu_cores: proxy.map(|_| cpu_s / window),
        proxy_rss_max_mib: proxy.map(|_| mib(rss_max)),
        proxy_hwm_mib: proxy.map(|p| mib(p.hwm_kib())),
    })
}

/// The ratios and target checks of one run set.
struct Report<'a> {
    results: &'a [RunResult],
    ratios: Vec<serde_json::Value>,
    targets: Vec<serde_json::Value>,
}

/// The runs of `target` at `c`, by round.
fn runs<'a>(rs: &'a [RunResult], target: &str, c: usize) -> Vec<&'a RunResult> {
    let mut v: Vec<&RunResult> = rs
        .iter()
        .filter(|r| r.target == target && r.concurrency == c)
        .collect();
    v.sort_by_key(|r| r.round);
    v
}

/// Median, lowest and highest of the ratios `agent / peer` taken round by round (`None` for a
/// round where either figure is missing or the peer's is 0).
fn paired(
    agent: &[&RunResult],
    peer: &[&RunResult],
    figure: impl Fn(&RunResult) -> Option<f64>,
) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = agent
        .iter()
        .zip(peer)
        .filter_map(|(a, p)| match (figure(a), figure(p)) {
            (Some(a), Some(p)) if p > 0.0 => Some(a / p),
            _ => None,
        })
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((median, v[0], v[n - 1]))
}

impl<'a> Report<'a> {
    fn new(results: &'a [RunResult]) -> Self {
        let mut concurrency: Vec<usize> = results.iter().map(|r| r.concurrency).collect();
        concurrency.dedup();
        let mut ratios = Vec::new();
        let mut targets = Vec::new();
        let who = "agent";
        for &c in &concurrency {
            let agent = runs(results, who, c);
            if agent.is_empty() {
                continue;
            }
            for peer in ["haproxy", "nginx"] {
                let p = runs(results, peer, c);
                if p.is_empty() {
                    continue;
                }
                let ratio = |f: fn(&RunResult) -> Option<f64>| {
                    let r = paired(&agent, &p, f);
                    (r.map(|r| r.0), r.map(|(_, lo, hi)| [lo, hi]))
                };
                let (cpu, cpu_range) = ratio(|r| r.proxy_cpu_us_per_call);
                let (sched, sched_range) = ratio(|r| r.proxy_sched_us_per_call);
                let (p50, p50_range) = ratio(|r| Some(r.p50_us));
                let (p99, _) = ratio(|r| Some(r.p99_us));
                let (rate, _) = ratio(|r| Some(r.calls_per_s));
                ratios.push(json!({
                    "agent": who,
                    "concurrency": c,
                    "vs": peer,
                    "rounds": agent.len().min(p.len()),
                    "cpu_per_call": cpu,
                    "cpu_per_call_range": cpu_range,
                    "sched_per_call": sched,
                    "sched_per_call_range": sched_range,
                    "p50": p50,
                    "p50_range": p50_range,
                    "p99": p99,
                    "calls_per_s": rate,
                }));
                let (what, met) = if peer == "haproxy" {
                    (
                        format!("{who} CPU per call below haproxy's"),
                        cpu.map(|r| r < 1.0),
                    )
                } else {
                    (
                        format!("{who} CPU per call at most half of nginx's"),
                        cpu.map(|r| r <= 0.5),
                    )
                };
                targets.push(json!({"concurrency": c, "target": what, "met": met}));
                if peer == "haproxy" {
                    targets.push(json!({
                        "concurrency": c,
                        "target": format!("{who} p50 no worse than haproxy's"),
                        "met": p50.map(|r| r <= 1.0),
                    }));
                }
            }
            if c >= 1000 {
                let rss = agent
                    .iter()
                    .flat_map(|a| [a.proxy_hwm_mib, a.proxy_rss_max_mib])
                    .flatten()
                    .fold(f64::NAN, f64::max);
                targets.push(json!({
                    "concurrency": c,
                    "target": format!("{who} peak RSS under 30 MB at 1000 concurrent streams"),
                    "met": rss < 30.0,
                    "value_mib": rss,
                }));
            }
        }
        // The cost of a call must not grow with the streams open on the connection: the
        // agent's CPU per call at 1000 in flight within 20% of its CPU per call at 100, the
        // ratio taken within each round.
        let (at_100, at_1000) = (runs(results, who, 100), runs(results, who, 1000));
        if !at_100.is_empty() && !at_1000.is_empty() {
            let scaling = paired(&at_1000, &at_100, |r| r.proxy_cpu_us_per_call);
            targets.push(json!({
                "concurrency": 1000,
                "target": format!("{who} CPU per call at 1000 streams within 20% of 100 streams"),
                "met": scaling.map(|(m, _, _)| (0.8..=1.2).contains(&m)),
                "ratio": scaling.map(|(m, _, _)| m),
                "range": scaling.map(|(_, lo, hi)| [lo, hi]),
            }));
        }
        Self {
            results,
            ratios,
            targets,
        }
    }

    fn text(&self, opts: &Options) -> String {
        let mut s = String::new();
        let opt =
            |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
        s.push_str(&format!(
            "\n== balancer-bench: unary SayHello, 4 greeter backends; proxies on CPUs {} with {} worker(s) each{}\n\n",
            opts.placement.proxy_cpus,
            opts.placement.workers,
            match (opts.placement.health_checks, opts.placement.retries) {
                (true, _) => "; active health checks on (agent: grpc.health.v1 Watch; haproxy: check inter 1s; nginx: none in open source)",
                (false, true) => "; retries configured, none needed (agent: 3 on UNAVAILABLE; haproxy: retries 3, retry-on; nginx: grpc_next_upstream, 4 tries)",
                (false, false) => "",
            }
        ));
        s.push_str(&format!(
            "{:<11} {:>6} {:>5} {:>10} {:>9} {:>9} {:>9} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>7}\n",
            "target",
            "conc",
            "round",
            "calls/s",
            "p50 us",
            "p90 us",
            "p99 us",
            "cpu us/call",
            "sched us/c",
            "writev/c",
            "cpu cores",
            "RSS MiB",
            "HWM MiB",
            "errors"
        ));
        for r in self.results {
            s.push_str(&format!(
                "{:<11} {:>6} {:>5} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>7}\n",
                r.target,
                r.concurrency,
                r.round,
                r.calls_per_s,
                r.p50_us,
                r.p90_us,
                r.p99_us,
                opt(r.proxy_cpu_us_per_call, 1),
                opt(r.proxy_sched_us_per_call, 1),
                opt(r.proxy_writev_per_call, 2),
                opt(r.proxy_cpu_cores, 2),
                opt(r.proxy_rss_max_mib, 1),
                opt(r.proxy_hwm_mib, 1),
                r.errors
            ));
        }
        s.push_str(
            "(writev/c: write and writev system calls per call; the kernel does not count send(2) \
             there, which haproxy uses)\n",
        );
        s.push_str(
            "\n== agent vs peers: median over the rounds of the ratio within a round [lowest-highest] \
             (ratio < 1: the agent is cheaper or faster)\n\n",
        );
        s.push_str(&format!(
            "{:<12} {:>6} {:<8} {:>6} {:>20} {:>20} {:>18} {:>7} {:>9}\n",
            "agent",
            "conc",
            "vs",
            "rounds",
            "cpu per call",
            "sched per call",
            "p50",
            "p99",
            "calls/s"
        ));
        for r in &self.ratios {
            let f = |k: &str| r[k].as_f64().map_or("-".into(), |v| format!("{v:.2}"));
            let ranged = |k: &str| match r[format!("{k}_range")].as_array() {
                Some(lh) if lh.len() == 2 => format!(
                    "{} [{:.2}-{:.2}]",
                    f(k),
                    lh[0].as_f64().unwrap_or(f64::NAN),
                    lh[1].as_f64().unwrap_or(f64::NAN)
                ),
                _ => f(k),
            };
            s.push_str(&format!(
                "{:<12} {:>6} {:<8} {:>6} {:>20} {:>20} {:>18} {:>7} {:>9}\n",
                r["agent"].as_str().unwrap_or(""),
                r["concurrency"].as_u64().unwrap_or(0),
                r["vs"].as_str().unwrap_or(""),
                r["rounds"].as_u64().unwrap_or(0),
                ranged("cpu_per_call"),
                ranged("sched_per_call"),
                ranged("p50"),
                f("p99"),
                f("calls_per_s")
            ));
        }
        s.push_str("\n== targets\n\n");
        for t in &self.targets {
            let met = match t["met"].as_bool() {
                Some(true) => "MET",
                Some(false) => "MISSED",
                None => "n/a",
            };
            let value = t["value_mib"]
                .as_f64()
                .map_or(String::new(), |v| format!(" ({v:.1} MiB)"));
            s.push_str(&format!(
                "  c={:<5} {:<58} {met}{value}\n",
                t["concurrency"].as_u64().unwrap_or(0),
                t["target"].as_str().unwrap_or("")
            ));
        }
        s
    }
}

/// Other heavy work on the machine while the benchmark runs (it skews the figures).
fn noise() -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();
    let rustc = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "rustc")
                })
                .count()
        })
        .unwrap_or(0);
    format!("load average {load}, {rustc} rustc process(es) running")
}

fn version(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|e| format!("unavailable: {e}"))
}
