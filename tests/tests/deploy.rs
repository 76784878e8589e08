//! The deployment: the manifests under `deploy/` and the image `cargo xtask image` builds.
//!
//! - Every manifest `kubectl apply -k deploy/` installs validates against the Kubernetes
//!   OpenAPI schemas, offline (`kubernetes-validate`, installed by `cargo xtask setup`, ships
//!   them), and so does what kustomize renders from them.
//! - The ClusterRole grants get/list/watch on exactly `discovery::WATCHED_RESOURCES`.
//! - The DaemonSet is not privileged, adds only capabilities from an allowed list, and is
//!   wired to the configuration: arguments the agent's CLI accepts, probes that ask the pod's
//!   own agent (its admin Unix socket, in the pod's emptyDir), the mounts the datapath settings
//!   point into, the downward-API variables the file expands; and it rolls out in the order a
//!   handover needs (maxSurge 1, maxUnavailable 0, no host ports, the node's tcp_migrate_req
//!   writable).
//! - The ConfigMap holds a configuration the agent accepts.
//! - The image's entrypoint is a static agent that starts (`--version`, `--help`, and
//!   `run --check` on the deployed configuration), unpacked from the OCI archive.
//! - As root: the agent loads and attaches its eBPF programs holding exactly the DaemonSet's
//!   capabilities, and fails without either of the two it cannot do without; and (ignored
//!   until the agent does it) it exits on SIGTERM and removes its pins.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use balancer_agent::{cli::Cli, config::Config, discovery::WATCHED_RESOURCES};
use balancer_tests::agent::{TempDir, agent_bin, http_get};
use clap::Parser;
use serde::Deserialize;
use serde_yaml::Value;

/// Kubernetes versions the manifests must validate against: the oldest still in common use
/// and the newest `kubernetes-validate` knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.37.0"];

/// Capabilities the DaemonSet may add, each justified in `deploy/daemonset.yaml`. Adding one
/// here needs the same: a reason the agent cannot run without it.
/// SYS_ADMIN and SYS_PTRACE: the client pod's network namespace (`datapath.source_address:
/// pod`), as ztunnel's in-pod mode needs them.
const ALLOWED_CAPABILITIES: &[&str] = &[
    "BPF",
    "NET_ADMIN",
    "SYS_RESOURCE",
    "SYS_ADMIN",
    "SYS_PTRACE",
];

/// What the ClusterRole grants on each watched resource.
const READ_VERBS: &[&str] = &["get", "list", "watch"];

/// A stand-in node IP for `${NODE_IP}` in the deployed configuration.
const NODE_IP: &str = "10.0.0.5";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document in a file.
fn documents(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            Value::deserialize(d).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The files kustomization.yaml lists.
fn kustomize_resources() -> Vec<PathBuf> {
    let k = &documents(&deploy_dir().join("kustomization.yaml"))[0];
    k["resources"]
        .as_sequence()
        .expect("kustomization.yaml lists resources")
        .iter()
        .map(|r| deploy_dir().join(r.as_str().expect("a resource is a file name")))
        .collect()
}

/// Every object `kubectl apply -k deploy/` installs.
fn objects() -> Vec<Value> {
    kustomize_resources()
        .iter()
        .flat_map(|p| documents(p))
        .collect()
}

/// The one object of this kind.
fn object(kind: &str) -> Value {
    let mut found: Vec<Value> = objects()
        .into_iter()
        .filter(|o| o["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} in deploy/");
    found.remove(0)
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {v:?}"))
}

fn seq_of<'a>(v: &'a Value, what: &str) -> &'a [Value] {
    v.as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{what}: expected a list, found {v:?}"))
}

/// The agent container of the DaemonSet.
fn agent_container(ds: &Value) -> Value {
    let containers = seq_of(&ds["spec"]["template"]["spec"]["containers"], "containers");
    assert_eq!(containers.len(), 1, "the DaemonSet runs one container");
    containers[0].clone()
}

/// The deployed agent configuration, `${NODE_IP}` expanded, parsed and validated by the agent.
fn deployed_config() -> Config {
    let cm = object("ConfigMap");
    let text = str_of(&cm["data"]["config.yaml"], "ConfigMap data config.yaml");
    let expanded = text.replace("${NODE_IP}", NODE_IP);
    assert!(
        !expanded.contains("${"),
        "the configuration uses a variable the DaemonSet does not set:\n{expanded}"
    );
    Config::from_yaml(&expanded, "deploy/configmap.yaml").unwrap_or_else(|e| panic!("{e}"))
}

/// `python3 -m kubernetes_validate --strict` (unknown fields are errors), or why it cannot run.
fn validator() -> Result<Command, String> {
    let probe = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {
            let mut c = Command::new("python3");
            c.args(["-m", "kubernetes_validate", "--strict"]);
            Ok(c)
        }
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(format!("python3: {e}")),
    }
}

/// Validates the files against each of [`KUBERNETES_VERSIONS`]; skips loudly without the tool.
fn validate(files: &[PathBuf]) {
    for version in KUBERNETES_VERSIONS {
        let mut cmd = match validator() {
            Ok(c) => c,
            Err(why) => {
                eprintln!(
                    "SKIPPED schema validation: kubernetes-validate is not installed ({why}); \
                     `cargo xtask setup` installs it"
                );
                return;
            }
        };
        let out = cmd
            .args(["--kubernetes-version", version])
            .args(files)
            .output()
            .expect("running kubernetes-validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "deploy/ does not validate against Kubernetes {version}:\n{text}"
        );
        // An object of a kind it has no schema for only warns: every one must have been checked.
        assert!(
            !text.contains("Couldn't find schema"),
            "an object was not checked against Kubernetes {version}:\n{text}"
        );
    }
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let listed = kustomize_resources();
    // Nothing under deploy/ is left out of `kubectl apply -k`.
    let on_disk: BTreeSet<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    assert_eq!(
        on_disk,
        listed.iter().cloned().collect::<BTreeSet<_>>(),
        "every manifest under deploy/ is listed in kustomization.yaml, and only those"
    );
    validate(&listed);

    // What kubectl really applies: kustomize's rendering of the same files.
    match Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir())
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "kubectl kustomize deploy/ failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let dir = TempDir::new("balancer-deploy-render");
            let rendered = dir.0.join("rendered.yaml");
            std::fs::write(&rendered, &out.stdout).unwrap();
            let kinds: BTreeSet<String> = documents(&rendered)
                .iter()
                .map(|o| str_of(&o["kind"], "kind").to_string())
                .collect();
            let expected: BTreeSet<String> = [
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "ConfigMap",
                "DaemonSet",
            ]
            .map(String::from)
            .into();
            assert_eq!(kinds, expected, "what kubectl apply -k deploy/ installs");
            validate(&[rendered]);
        }
        Err(e) => eprintln!("SKIPPED kustomize rendering: kubectl: {e}"),
    }
}

#[test]
fn cluster_role_grants_read_on_exactly_the_watched_resources() {
    let role = object("ClusterRole");
    let mut granted = BTreeSet::new();
    for (i, rule) in seq_of(&role["rules"], "rules").iter().enumerate() {
        let map = rule.as_mapping().expect("a rule is a mapping");
        for key in map.keys() {
            assert!(
                ["apiGroups", "resources", "verbs"].contains(&str_of(key, "rule key")),
                "rules[{i}] uses {key:?}: only apiGroups, resources and verbs are expected \
                 (no resourceNames, no nonResourceURLs)"
            );
        }
        for group in seq_of(&rule["apiGroups"], "apiGroups") {
            for resource in seq_of(&rule["resources"], "resources") {
                for verb in seq_of(&rule["verbs"], "verbs") {
                    granted.insert((
                        str_of(group, "apiGroup").to_string(),
                        str_of(resource, "resource").to_string(),
                        str_of(verb, "verb").to_string(),
                    ));
                }
            }
        }
    }
    let expected: BTreeSet<(String, String, String)> = WATCHED_RESOURCES
        .iter()
        .flat_map(|(group, resource)| {
            READ_VERBS
                .iter()
                .map(move |verb| (group.to_string(), resource.to_string(), verb.to_string()))
        })
        .collect();
    assert_eq!(
        granted, expected,
        "the ClusterRole must grant get/list/watch on discovery::WATCHED_RESOURCES, no more, \
         no less"
    );

    // It is bound to the DaemonSet's service account, in the DaemonSet's namespace.
    let binding = object("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let ds = object("DaemonSet");
    let sa = &ds["spec"]["template"]["spec"]["serviceAccountName"];
    let subjects = seq_of(&binding["subjects"], "subjects");
    assert_eq!(subjects.len(), 1, "one subject: the agent");
    assert_eq!(subjects[0]["kind"], "ServiceAccount");
    assert_eq!(&subjects[0]["name"], sa);
    assert_eq!(subjects[0]["namespace"], ds["metadata"]["namespace"]);
    let account = object("ServiceAccount");
    assert_eq!(&account["metadata"]["name"], sa);
    assert_eq!(
        account["metadata"]["namespace"],
        ds["metadata"]["namespace"]
    );
}

#[test]
fn daemonset_is_not_privileged_and_adds_only_allowed_capabilities() {
    let ds = object("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    for host in ["hostPID", "hostIPC"] {
        assert!(
            pod[host].is_null() || pod[host] == false,
            "the agent needs no {host}"
        );
    }
    let c = agent_container(&ds);
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"], true, "the agent must not run privileged");
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    let drop: Vec<&str> = seq_of(&sc["capabilities"]["drop"], "capabilities.drop")
        .iter()
        .map(|v| str_of(v, "capability"))
        .collect();
    assert_eq!(drop, ["ALL"], "every capability is dropped first");
    for cap in daemonset_capabilities() {
        assert!(
            ALLOWED_CAPABILITIES.contains(&cap.as_str()),
            "capability {cap} is not in the allowed list {ALLOWED_CAPABILITIES:?}"
        );
    }
}

/// The capabilities the DaemonSet adds, as Kubernetes spells them (`NET_ADMIN`).
fn daemonset_capabilities() -> Vec<String> {
    let c = agent_container(&object("DaemonSet"));
    seq_of(
        &c["securityContext"]["capabilities"]["add"],
        "capabilities.add",
    )
    .iter()
    .map(|v| {
        str_of(v, "capability")
            .trim_start_matches("CAP_")
            .to_string()
    })
    .collect()
}

/// The value a container's environment gives `name`.
fn container_env(c: &Value, name: &str) -> Option<String> {
    seq_of(&c["env"], "env")
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| str_of(&e["value"], "env value").to_string())
}

/// The environment variable an argument of a subcommand of the agent reads.
fn cli_env(subcommand: &str, arg: &str) -> String {
    use clap::CommandFactory;
    let cli = Cli::command();
    let sub = cli
        .find_subcommand(subcommand)
        .unwrap_or_else(|| panic!("no subcommand {subcommand}"));
    let a = sub
        .get_arguments()
        .find(|a| a.get_id() == arg)
        .unwrap_or_else(|| panic!("no argument {arg} of {subcommand}"));
    a.get_env()
        .unwrap_or_else(|| panic!("{subcommand} {arg} reads no environment variable"))
        .to_string_lossy()
        .into_owned()
}

/// The image's entrypoint, as the Containerfile sets it.
fn image_entrypoint() -> String {
    let file = std::fs::read_to_string(deploy_dir().join("Containerfile")).unwrap();
    let line = file
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("the Containerfile sets an ENTRYPOINT");
    let v: Vec<String> = serde_json::from_str(line).expect("ENTRYPOINT in JSON form");
    assert_eq!(v.len(), 1, "the entrypoint is the binary alone");
    v[0].clone()
}

/// A container's environment variable that comes from the downward API: its fieldPath.
fn downward_env(c: &Value) -> BTreeMap<String, String> {
    seq_of(&c["env"], "env")
        .iter()
        .filter_map(|e| {
            let path = e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?;
            Some((str_of(&e["name"], "env name").to_string(), path.to_string()))
        })
        .collect()
}

/// The container's args after the image's entrypoint (`balancer-agent`).
fn daemonset_args() -> Vec<String> {
    let c = agent_container(&object("DaemonSet"));
    assert!(
        c["command"].is_null(),
        "the DaemonSet keeps the image's entrypoint"
    );
    seq_of(&c["args"], "args")
        .iter()
        .map(|a| str_of(a, "arg").to_string())
        .collect()
}

#[test]
fn daemonset_is_wired_to_the_agent_and_its_configuration() {
    let ds = object("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = agent_container(&ds);
    let config = deployed_config();

    // The agent's own CLI accepts the arguments.
    let args = daemonset_args();
    let cli =
        Cli::try_parse_from(std::iter::once("balancer-agent".to_string()).chain(args.clone()))
            .unwrap_or_else(|e| panic!("the agent refuses the DaemonSet's args {args:?}:\n{e}"));
    let balancer_agent::cli::Command::Run(run) = cli.command else {
        panic!("the DaemonSet runs `balancer-agent run`, not {args:?}");
    };
    assert!(
        args.iter().any(|a| a == "--kubernetes"),
        "discovery from the Kubernetes API"
    );

    // The configuration file it reads is the ConfigMap's key, mounted whole (not by subPath,
    // which would never see an update).
    let mounts = seq_of(&c["volumeMounts"], "volumeMounts");
    let mount = |name: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no volume mount {name}"))
            .clone()
    };
    let volumes = seq_of(&pod["volumes"], "volumes");
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    };
    let cm = object("ConfigMap");
    let config_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"] == cm["metadata"]["name"])
        .expect("the ConfigMap is mounted");
    let config_mount = mount(str_of(&config_volume["name"], "volume name"));
    assert!(config_mount["subPath"].is_null());
    assert_eq!(
        run.config,
        Path::new(str_of(&config_mount["mountPath"], "mountPath")).join("config.yaml")
    );

    // `${NODE_IP}` and --node-name (env NODE_NAME) come from the downward API.
    let env = downward_env(&c);
    assert_eq!(
        env.get("NODE_IP").map(String::as_str),
        Some("status.hostIP")
    );
    assert_eq!(
        env.get("NODE_NAME").map(String::as_str),
        Some("spec.nodeName")
    );

    // Pods reach the listener at the node's IP: the pod is in the host network namespace,
    // and the proxy address is a listener's address.
    assert_eq!(pod["hostNetwork"], true);
    assert!(config.datapath.enabled);
    let proxy = SocketAddr::V4(config.datapath.proxy_address.unwrap());
    assert_eq!(proxy.ip().to_string(), NODE_IP);
    assert!(
        config.listeners.iter().any(|l| l.address == proxy),
        "datapath.proxy_address {proxy} is not a listener's address"
    );

    // The probes ask this pod's own agent: `balancer-agent probe` (the image's binary) through
    // the Unix socket `run` serves, named by one variable for both, in a directory of the pod's
    // own (an emptyDir), never the node's loopback, which answers for another agent during a
    // rollout.
    let entrypoint = image_entrypoint();
    let socket_env = cli_env("run", "admin_socket");
    assert_eq!(cli_env("probe", "socket"), socket_env);
    let socket = container_env(&c, &socket_env).expect("the admin socket variable is set");
    let socket_dir = Path::new(&socket).parent().unwrap();
    let socket_mount = mounts
        .iter()
        .find(|m| Path::new(str_of(&m["mountPath"], "mountPath")) == socket_dir)
        .unwrap_or_else(|| panic!("nothing is mounted at {}", socket_dir.display()));
    let socket_volume = volume(str_of(&socket_mount["name"], "mount name"));
    assert!(
        socket_volume["emptyDir"].is_mapping(),
        "the admin socket lives in the pod's own emptyDir: {socket_volume:?}"
    );
    assert_ne!(socket_mount["readOnly"], true);
    for (probe, what) in [("readinessProbe", "ready"), ("livenessProbe", "live")] {
        assert!(c[probe]["httpGet"].is_null(), "{probe}: an exec probe");
        let command: Vec<String> = seq_of(&c[probe]["exec"]["command"], "exec.command")
            .iter()
            .map(|a| str_of(a, "command").to_string())
            .collect();
        assert_eq!(command[0], entrypoint, "{probe} runs the image's agent");
        assert_eq!(command[1..], ["probe", what], "{probe}");
        let with_socket = command
            .iter()
            .map(String::as_str)
            .chain(["--socket", &socket]);
        let parsed = Cli::try_parse_from(with_socket)
            .unwrap_or_else(|e| panic!("the agent refuses the {probe} command {command:?}:\n{e}"));
        assert!(matches!(
            parsed.command,
            balancer_agent::cli::Command::Probe(_)
        ));
    }

    // The datapath's paths are the node's, mounted from the host.
    let host_path_of = |mount_path: &str| {
        let m = mounts
            .iter()
            .find(|m| m["mountPath"] == mount_path)
            .unwrap_or_else(|| panic!("nothing is mounted at {mount_path}"));
        let v = volume(str_of(&m["name"], "mount name"));
        str_of(&v["hostPath"]["path"], "hostPath").to_string()
    };
    let cgroup_root = config.datapath.cgroup_root.as_ref().unwrap();
    assert_eq!(
        host_path_of(cgroup_root.to_str().unwrap()),
        "/sys/fs/cgroup"
    );
    let pin_parent = config.datapath.pin_path.as_ref().unwrap().parent().unwrap();
    assert_eq!(host_path_of(pin_parent.to_str().unwrap()), "/sys/fs/bpf");

    // Waiting for a replacement and draining end before the kubelet's SIGKILL. The wait is
    // on: with maxSurge a pod deleted by hand gets its replacement at once, while it drains.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let stop = run.handover_wait_ms + run.drain_timeout_ms;
    assert!(
        run.handover_wait_ms > 0,
        "the agent waits for its replacement"
    );
    assert!(
        Duration::from_secs(grace) >= Duration::from_millis(stop + 5_000),
        "terminationGracePeriodSeconds {grace} leaves too little time after a wait of {} ms \
         and a drain of {} ms",
        run.handover_wait_ms,
        run.drain_timeout_ms
    );

    // The rollout order the handover needs: on each node the new agent starts beside the old
    // one and the old one is stopped only once the new one is ready; one node at a time.
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxSurge"], 1, "the new agent first");
    assert_eq!(
        rolling["maxUnavailable"], 0,
        "never a node without an agent"
    );
    // With hostNetwork a declared port is a host port: the scheduler would hold the new pod
    // until the old one is gone.
    assert!(
        c["ports"].as_sequence().is_none_or(|p| p.is_empty()),
        "no declared ports: {:?}",
        c["ports"]
    );
    // The node's net.ipv4.tcp_migrate_req, writable, where the agent's variable says: what
    // the old agent's listeners queued moves to the new agent's when they close.
    let migrate_env = cli_env("run", "tcp_migrate_req");
    let migrate = container_env(&c, &migrate_env).expect("the tcp_migrate_req variable is set");
    assert_eq!(host_path_of(&migrate), "/proc/sys/net/ipv4/tcp_migrate_req");
    let migrate_mount = mounts.iter().find(|m| m["mountPath"] == migrate.as_str());
    assert_ne!(
        migrate_mount.unwrap()["readOnly"],
        true,
        "the agent writes it"
    );

    // The image tag follows the agent's version.
    assert_eq!(
        c["image"],
        format!("balancer-agent:{}", env!("CARGO_PKG_VERSION")),
        "bump the DaemonSet's image with the version"
    );
}

#[test]
fn configmap_holds_a_configuration_the_agent_accepts() {
    let config = deployed_config();
    assert!(config.services.is_empty(), "services come from Kubernetes");
    assert!(
        config.datapath.cgroup_root.is_some(),
        "inside a container, auto-detection finds the container's own cgroup namespace"
    );
}

// ---------------------------------------------------------------------------------------
// The image.

/// The archive `cargo xtask image` writes.
fn image_archive() -> PathBuf {
    std::env::var_os("BALANCER_IMAGE_ARCHIVE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/image/balancer-agent.oci.tar")
        })
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| {
        panic!("reading {}: {e}", path.display());
    }))
    .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// An OCI blob of the layout unpacked at `layout`.
fn blob(layout: &Path, digest: &serde_json::Value) -> PathBuf {
    let digest = digest.as_str().expect("a digest");
    let (algo, hex) = digest.split_once(':').expect("algo:hex");
    layout.join("blobs").join(algo).join(hex)
}

fn tar_x(archive: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let status = Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .status()
        .expect("running tar");
    assert!(status.success(), "tar -xf {} failed", archive.display());
}

/// Whether an ELF executable names a program interpreter (a dynamic loader): a scratch image
/// has none, so its entrypoint must not.
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == PT_INTERP
    })
}

#[test]
fn image_entrypoint_is_a_static_agent_that_starts() {
    let archive = image_archive();
    if !archive.exists() {
        eprintln!(
            "SKIPPED {}: {} is missing; build it with `cargo xtask image`",
            module_path!(),
            archive.display()
        );
        return;
    }
    let dir = TempDir::new("balancer-image");
    let layout = dir.0.join("layout");
    tar_x(&archive, &layout);
    let index = read_json(&layout.join("index.json"));
    let manifests = index["manifests"].as_array().expect("index manifests");
    assert_eq!(manifests.len(), 1, "one image in the archive");
    let manifest = read_json(&blob(&layout, &manifests[0]["digest"]));
    let config = read_json(&blob(&layout, &manifest["config"]["digest"]));
    assert_eq!(config["os"], "linux");
    let image = &config["config"];

    let rootfs = dir.0.join("rootfs");
    for layer in manifest["layers"].as_array().expect("layers") {
        tar_x(&blob(&layout, &layer["digest"]), &rootfs);
    }
    let entrypoint: Vec<String> =
        serde_json::from_value(image["Entrypoint"].clone()).expect("the image has an entrypoint");
    assert_eq!(entrypoint.len(), 1, "the entrypoint is the binary alone");
    let in_image = entrypoint[0].trim_start_matches('/');
    let binary = rootfs.join(in_image);
    let elf =
        std::fs::read(&binary).unwrap_or_else(|e| panic!("the entrypoint {}: {e}", entrypoint[0]));
    assert!(
        !has_interpreter(&elf),
        "the entrypoint is dynamically linked: a scratch image has no loader"
    );
    // The rootfs holds the binary and nothing else worth mentioning.
    let files: Vec<PathBuf> = walk(&rootfs).into_iter().filter(|p| p.is_file()).collect();
    assert_eq!(
        files,
        std::slice::from_ref(&binary),
        "the image holds only the agent"
    );
    // `kubectl exec ds/balancer-agent -- balancer-agent ...` finds it on PATH.
    let path = image["Env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str()?.strip_prefix("PATH="))
        .next()
        .expect("the image sets PATH");
    let dir_of_binary = Path::new(&entrypoint[0]).parent().unwrap();
    assert!(
        path.split(':').any(|p| Path::new(p) == dir_of_binary),
        "PATH {path} lacks {}",
        dir_of_binary.display()
    );

    // As root, run it chrooted in the image's filesystem, where nothing else exists: proof
    // that it needs nothing from the host. Otherwise, run it in place.
    let chroot = balancer_tests::is_root()
        .then(|| {
            ["/usr/sbin/chroot", "/usr/bin/chroot", "/sbin/chroot"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        })
        .flatten();
    if chroot.is_none() {
        eprintln!("NOTE: not root (or no chroot): the image's agent runs outside its filesystem");
    }
    let in_rootfs = |args: &[&str]| {
        let mut c = if let Some(chroot) = chroot.as_ref() {
            let mut c = Command::new(chroot);
            c.arg(&rootfs).arg(&entrypoint[0]);
            c
        } else {
            Command::new(&binary)
        };
        c.args(args).env_clear().env("PATH", path);
        c
    };
    let out = run_bounded(in_rootfs(&["--version"]));
    assert_eq!(
        out.trim(),
        format!("balancer-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let help = run_bounded(in_rootfs(&["--help"]));
    for needle in ["run", "inspect"] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
    let run_help = run_bounded(in_rootfs(&["run", "--help"]));
    for arg in daemonset_args().iter().filter(|a| a.starts_with("--")) {
        assert!(
            run_help.contains(arg.as_str()),
            "the image's agent lacks the DaemonSet's {arg}:\n{run_help}"
        );
    }

    // The image's agent accepts the deployed configuration, ${NODE_IP} expanded from the
    // environment as in the DaemonSet.
    let cm = object("ConfigMap");
    let etc = rootfs.join("etc/balancer");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("config.yaml"),
        str_of(&cm["data"]["config.yaml"], "config.yaml"),
    )
    .unwrap();
    let config_arg = if chroot.is_some() {
        "/etc/balancer/config.yaml".to_string()
    } else {
        etc.join("config.yaml").display().to_string()
    };
    let mut check = in_rootfs(&["run", "--check", "--config", &config_arg]);
    check.env("NODE_IP", NODE_IP);
    let out = run_bounded(check);
    assert!(out.contains("valid"), "{out}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Runs a command that must exit successfully within 20 s; returns stdout.
fn run_bounded(mut cmd: Command) -> String {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

// ---------------------------------------------------------------------------------------
// The capabilities, for real (root).

/// Linux capability numbers (include/uapi/linux/capability.h).
fn capability_number(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other}: add its number to this test"),
    }
}

/// This process's capability bounding set (what it can hand on to a child).
fn own_bounding_set() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .expect("CapBnd in /proc/self/status")
}

/// Whether the binary embeds the real eBPF object (not the stub): a 64-bit little-endian ELF
/// header for EM_BPF (247) somewhere past the start.
fn embeds_bpf_object(bytes: &[u8]) -> bool {
    const MAGIC: &[u8] = b"\x7fELF\x02\x01\x01";
    bytes
        .windows(MAGIC.len())
        .enumerate()
        .any(|(i, w)| i > 0 && w == MAGIC && bytes.get(i + 18..i + 20) == Some(&[247, 0][..]))
}

/// The agent with its datapath on, holding only `caps` (as the container would: uid 0, every
/// other capability out of the bounding set, no_new_privs), its programs attached at a cgroup
/// of the test's own. Returns whether it became ready with the datapath loaded, and its output.
fn agent_with_capabilities(caps: &[String], cgroup: &Path) -> (bool, u64, String) {
    let dir = TempDir::new("balancer-deploy-caps");
    let (listen, admin) = (balancer_tests::free_port(), balancer_tests::free_port());
    let pin = PathBuf::from(format!(
        "/sys/fs/bpf/balancer-test-deploy-{}-{listen}",
        std::process::id()
    ));
    let config = format!(
        "listeners:\n  - address: 127.0.0.1:{listen}\nadmin:\n  address: 127.0.0.1:{admin}\n\
         datapath:\n  enabled: true\n  proxy_address: 127.0.0.1:{listen}\n  cgroup_root: {}\n  \
         pin_path: {}\n",
        cgroup.display(),
        pin.display()
    );
    let config_path = dir.0.join("config.yaml");
    std::fs::write(&config_path, config).unwrap();
    let bounding: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let log = dir.0.join("agent.log");
    let mut child = Command::new("setpriv")
        .args(["--inh-caps=-all", "--no-new-privs"])
        .arg(format!("--bounding-set={bounding}"))
        .arg("--")
        .arg(agent_bin())
        .args(["run", "--config"])
        .arg(&config_path)
        .args(["--drain-timeout-ms", "200"])
        .env("BALANCER_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting setpriv (util-linux)");
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut loaded = false;
    let mut cap_eff = 0;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if let Ok((200, body)) = http_get(admin, "/api/bpf") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            loaded = v["loaded"] == true;
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
            cap_eff = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                .unwrap_or(0);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&pin);
    (
        loaded,
        cap_eff,
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

#[test]
fn root_agent_attaches_its_programs_with_exactly_the_daemonset_capabilities() {
    balancer_tests::require_root!();
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!(
            "SKIPPED {}: setpriv (util-linux) is missing",
            module_path!()
        );
        return;
    }
    let bin = agent_bin();
    if !embeds_bpf_object(&std::fs::read(&bin).unwrap()) {
        eprintln!(
            "SKIPPED {}: {} carries the stub eBPF object; `cargo xtask setup` then rebuild",
            module_path!(),
            bin.display()
        );
        return;
    }
    let cgroup = balancer_tests::node::Cgroup::create("deploy-caps").expect("a cgroup");
    let caps = daemonset_capabilities();

    let (loaded, cap_eff, log) = agent_with_capabilities(&caps, cgroup.path());
    assert!(
        loaded,
        "with the DaemonSet's capabilities {caps:?} the datapath did not load:\n{log}"
    );
    // A capability this test process lacks cannot be handed on (a sandbox may withhold
    // CAP_SYS_RESOURCE, which matters only before 5.11 anyway).
    let own = own_bounding_set();
    let expected: u64 = caps
        .iter()
        .map(|c| 1u64 << capability_number(c))
        .sum::<u64>()
        & own;
    for c in &caps {
        if own & (1 << capability_number(c)) == 0 {
            eprintln!("NOTE: this test process lacks CAP_{c}; the agent ran without it");
        }
    }
    assert_eq!(
        cap_eff, expected,
        "the agent held other capabilities than {caps:?} (CapEff {cap_eff:#x})"
    );

    // Each of the two the datapath cannot do without is needed: without it the start fails
    // and says why. (SYS_RESOURCE matters only on kernels before 5.11, so it is not tested.)
    // SYS_ADMIN, there for the client pod's network namespace, would stand in for both
    // (the kernel's bpf_capable and bpf_net_capable accept it): each is tested without it, as
    // an agent with `source_address: node` runs.
    for needed in ["BPF", "NET_ADMIN"] {
        let fewer: Vec<String> = caps
            .iter()
            .filter(|c| *c != needed && *c != "SYS_ADMIN")
            .cloned()
            .collect();
        let (loaded, _, log) = agent_with_capabilities(&fewer, cgroup.path());
        assert!(
            !loaded,
            "the datapath loaded without {needed}: is it still needed? ({fewer:?})"
        );
        assert!(
            log.contains("Operation not permitted") || log.contains("EPERM"),
            "without {needed} the agent should fail with a permission error:\n{log}"
        );
    }
}

/// What the DaemonSet's `terminationGracePeriodSeconds` and the uninstall notes rely on: on
/// SIGTERM the agent drains, removes its pins and exits by itself, well before the kubelet's
/// SIGKILL.
#[test]
fn root_agent_exits_on_sigterm_and_removes_its_pins() {
    balancer_tests::require_root!();
    let bin = agent_bin();
    if !embeds_bpf_object(&std::fs::read(&bin).unwrap()) {
        eprintln!("SKIPPED {}: stub eBPF object", module_path!());
        return;
    }
    let cgroup = balancer_tests::node::Cgroup::create("deploy-sigterm").expect("a cgroup");
    let dir = TempDir::new("balancer-deploy-sigterm");
    let (listen, admin) = (balancer_tests::free_port(), balancer_tests::free_port());
    let pin = PathBuf::from(format!(
        "/sys/fs/bpf/balancer-test-sigterm-{}-{listen}",
        std::process::id()
    ));
    let config_path = dir.0.join("config.yaml");
    std::fs::write(
        &config_path,
        format!(
            "listeners:\n  - address: 127.0.0.1:{listen}\nadmin:\n  address: 127.0.0.1:{admin}\n\
             datapath:\n  enabled: true\n  proxy_address: 127.0.0.1:{listen}\n  \
             cgroup_root: {}\n  pin_path: {}\n",
            cgroup.path().display(),
            pin.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&config_path)
        .args(["--drain-timeout-ms", "200"])
        .stdin(Stdio::null())
        .spawn()
        .expect("starting the agent");
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(http_get(admin, "/ready"), Ok((200, _))) {
        assert!(Instant::now() < deadline, "the agent did not become ready");
        assert!(child.try_wait().unwrap().is_none(), "the agent exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(pin.exists(), "{} is not pinned", pin.display());
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let pinned_after = pin.exists();
    let _ = std::fs::remove_dir_all(&pin);
    let status = status.expect("the agent did not exit within 10 s of SIGTERM");
    assert!(
        status.success(),
        "the agent exited with {status} after SIGTERM"
    );
    assert!(
        !pinned_after,
        "the agent left its pins in {}",
        pin.display()
    );
}
