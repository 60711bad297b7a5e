//! The Kubernetes manifests (`k8s/`), proven short of a cluster:
//!
//! - every overlay renders with `kubectl kustomize`, and what it renders is wired up: each
//!   probe and each Envoy cluster points at a port that a container of the pod really
//!   listens on (read from the container's args and, for Envoy, its config), every file an
//!   arg names is mounted from a ConfigMap that has it, every container meets the
//!   restricted Pod Security Standard and has requests and limits, the termination grace
//!   covers the shutdown sequence; the rendered keys pass `check-config` and the rendered
//!   Envoy config `envoy --mode validate`, with the same filters as `envoy/envoy.yaml`;
//! - the demo's gateway pod runs as its manifests say: its two containers as local
//!   processes (command, args, env and ports from the Deployment), each ConfigMap laid out
//!   as the kubelet does it, the manifests' own probes polled, OpenAI traffic through the
//!   pod's Envoy, a live edit of the keys ConfigMap, and the pod's termination.
//!
//! Strict schema validation (`kubernetes-validate --strict`) is in `scripts/k8s-check.sh`.
//!
//! What the simulation changes, because one machine is not a pod network: every port the
//! pod uses is moved to a free loopback port and `0.0.0.0` binds become `127.0.0.1` (in
//! the args and in the Envoy ConfigMap alike, by one mapping), the Services the pod names
//! (`redis`, `llm-upstream`) are a Redis and a mock upstream of the test's own, mount paths
//! are directories under a temp dir, and a command names the binary built here (`envoy` is
//! `$ENVOY_BIN`). Everything else — the args, the env, the probes, the preStop wait, the
//! order of signals — is read from the rendered Deployment.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{envoy_bin, free_port, Proc, RedisServer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const LIMITER: &str = env!("CARGO_BIN_EXE_llm-ratelimit");
const MOCK: &str = env!("CARGO_BIN_EXE_mock-upstream");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One test of this file at a time: the pod's limiter has a 50 ms store deadline, and the
/// other tests' kubectl and Envoy runs would share the CPU with it.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn kubectl() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// `kubectl kustomize k8s/<dir>`, as objects.
fn render(dir: &str) -> Vec<Value> {
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(Path::new(ROOT).join("k8s").join(dir))
        .output()
        .expect("run kubectl (scripts/test.sh checks that it is installed)");
    assert!(
        out.status.success(),
        "kubectl kustomize k8s/{dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("k8s/{dir} renders YAML we cannot read: {e}"))
}

struct Rendered {
    objects: Vec<Value>,
}

impl Rendered {
    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects.iter().filter(move |o| o["kind"] == kind)
    }

    fn get<'a>(&'a self, kind: &'a str, name: &str) -> &'a Value {
        self.of_kind(kind)
            .find(|o| o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    fn config_map(&self, name: &str) -> &serde_json::Map<String, Value> {
        self.get("ConfigMap", name)["data"]
            .as_object()
            .unwrap_or_else(|| panic!("ConfigMap {name} has no data"))
    }

    /// Every pod template: of Deployments and Jobs.
    fn pods(&self) -> Vec<(String, &Value)> {
        self.objects
            .iter()
            .filter(|o| o["kind"] == "Deployment" || o["kind"] == "Job")
            .map(|o| {
                (
                    format!("{}/{}", o["kind"].as_str().unwrap(), o["metadata"]["name"]),
                    &o["spec"]["template"],
                )
            })
            .collect()
    }
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The value of `--flag value` or `--flag=value` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let eq = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == name {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(&eq)
        }
    })
}

fn binary(container: &Value) -> String {
    let command = strs(&container["command"]);
    let first = command
        .first()
        .unwrap_or_else(|| panic!("container {} has no command", container["name"]));
    first.rsplit('/').next().unwrap().to_string()
}

/// `(address, port)` of a `host:port` flag value.
fn addr(value: &str) -> (String, u16) {
    let (host, port) = value.rsplit_once(':').unwrap();
    (host.to_string(), port.parse().unwrap())
}

/// The file an absolute path in a container's args names, read from the ConfigMap volume
/// mounted over it; `None` when no mount covers the path.
fn mounted_file(rendered: &Rendered, pod: &Value, container: &Value, path: &str) -> Option<String> {
    for mount in container["volumeMounts"].as_array()? {
        let dir = mount["mountPath"].as_str().unwrap();
        let Some(rest) = path.strip_prefix(dir).and_then(|r| r.strip_prefix('/')) else {
            continue;
        };
        assert!(
            mount.get("subPath").is_none(),
            "{path}: a subPath mount never sees ConfigMap updates"
        );
        let volume = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("volume {} is not defined", mount["name"]));
        let map = volume["configMap"]["name"].as_str()?;
        return rendered
            .config_map(map)
            .get(rest)
            .map(|v| v.as_str().unwrap().to_string());
    }
    None
}

/// The `socket_address`es of an Envoy config's listeners (and admin), and its clusters'
/// endpoints, by cluster name.
struct EnvoyAddresses {
    listens: Vec<(String, u16)>,
    clusters: Vec<(String, String, u16)>,
}

fn socket(v: &Value) -> (String, u16) {
    let s = &v["socket_address"];
    (
        s["address"].as_str().unwrap().to_string(),
        s["port_value"].as_u64().unwrap() as u16,
    )
}

fn envoy_addresses(config: &Value) -> EnvoyAddresses {
    let mut listens = vec![socket(&config["admin"]["address"])];
    for l in config["static_resources"]["listeners"].as_array().unwrap() {
        listens.push(socket(&l["address"]));
    }
    let mut clusters = vec![];
    for c in config["static_resources"]["clusters"].as_array().unwrap() {
        for group in c["load_assignment"]["endpoints"].as_array().unwrap() {
            for e in group["lb_endpoints"].as_array().unwrap() {
                let (a, p) = socket(&e["endpoint"]["address"]);
                clusters.push((c["name"].as_str().unwrap().to_string(), a, p));
            }
        }
    }
    EnvoyAddresses { listens, clusters }
}

/// Where a container listens, from its args (and, for Envoy, the config its args name).
fn listens(rendered: &Rendered, pod: &Value, container: &Value) -> Vec<(String, u16)> {
    let args = strs(&container["args"]);
    match binary(container).as_str() {
        "llm-ratelimit" => {
            assert_eq!(args.first().map(String::as_str), Some("serve"));
            // The binary's defaults, when a flag is absent.
            let http = flag(&args, "--http-addr").unwrap_or("127.0.0.1:8080");
            let grpc = flag(&args, "--grpc-addr").unwrap_or("127.0.0.1:8081");
            vec![addr(http), addr(grpc)]
        }
        "mock-upstream" => vec![addr(flag(&args, "--addr").unwrap_or("127.0.0.1:9000"))],
        "redis-server" => {
            let port = flag(&args, "--port").unwrap_or("6379").parse().unwrap();
            vec![("0.0.0.0".into(), port)]
        }
        "envoy" => {
            let path = flag(&args, "-c").expect("envoy -c");
            let text = mounted_file(rendered, pod, container, path)
                .unwrap_or_else(|| panic!("envoy's {path} is not mounted"));
            envoy_addresses(&serde_saphyr::from_str::<Value>(&text).unwrap()).listens
        }
        "llm-loadtest" => vec![],
        "otelcol" => {
            let path = flag(&args, "--config").expect("otelcol --config");
            let text = mounted_file(rendered, pod, container, path)
                .unwrap_or_else(|| panic!("the collector's {path} is not mounted"));
            let config: Value = serde_saphyr::from_str(&text).unwrap();
            let mut found = vec![];
            for section in ["receivers", "extensions"] {
                endpoints(&config[section], &mut found);
            }
            found
        }
        other => panic!("no rule for what {other} listens on"),
    }
}

/// Every `endpoint: host:port` under a collector config's section.
fn endpoints(v: &Value, found: &mut Vec<(String, u16)>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v.as_str()) {
                    ("endpoint", Some(e)) => found.push(addr(e)),
                    _ => endpoints(v, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| endpoints(v, found)),
        _ => {}
    }
}

/// The port number a probe or a `targetPort` names (a number, or a containerPort's name).
fn port_of(container: &Value, port: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return n as u16;
    }
    let name = port.as_str().unwrap();
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("container {} has no port {name}", container["name"]))
        ["containerPort"]
        .as_u64()
        .unwrap() as u16
}

fn probe_port(container: &Value, probe: &Value) -> u16 {
    let spec = ["httpGet", "grpc", "tcpSocket"]
        .iter()
        .find_map(|k| probe.get(*k))
        .or_else(|| probe.get("exec").map(|_| &Value::Null))
        .unwrap_or_else(|| panic!("unknown probe {probe}"));
    port_of(container, &spec["port"])
}

const PROBES: [&str; 3] = ["startupProbe", "readinessProbe", "livenessProbe"];

fn check_pod(rendered: &Rendered, what: &str, pod: &Value) {
    let spec = &pod["spec"];
    assert_eq!(
        spec["automountServiceAccountToken"], false,
        "{what}: service-account token"
    );
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{what}");
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{what}"
    );
    for container in spec["containers"].as_array().unwrap() {
        let name = format!("{what} container {}", container["name"]);
        // The restricted Pod Security Standard.
        let sc = &container["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{name}");
        assert!(
            sc["runAsUser"].as_u64().unwrap_or(0) > 0,
            "{name}: runAsUser"
        );
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
        assert!(sc["capabilities"].get("add").is_none(), "{name}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        for kind in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    container["resources"][kind].get(resource).is_some(),
                    "{name}: resources.{kind}.{resource}"
                );
            }
        }
        // Every probe on a port the container listens on; one the kubelet reaches from
        // outside the pod, so not on loopback alone.
        let listening = listens(rendered, pod, container);
        let declared: Vec<u16> = container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p["containerPort"].as_u64().unwrap() as u16)
            .collect();
        for port in &declared {
            assert!(
                listening.iter().any(|(_, p)| p == port),
                "{name}: containerPort {port} is not one it listens on ({listening:?})"
            );
        }
        for probe in PROBES.iter().filter_map(|p| container.get(*p)) {
            if probe.get("exec").is_some() {
                continue;
            }
            let port = probe_port(container, probe);
            assert!(
                listening.iter().any(|(a, p)| *p == port && a == "0.0.0.0"),
                "{name}: probe on {port}, which it does not listen on from outside ({listening:?})"
            );
        }
        if binary(container) != "llm-loadtest" {
            for probe in PROBES {
                assert!(container.get(probe).is_some(), "{name}: no {probe}");
            }
        }
        // Every file an arg names is mounted, from a ConfigMap that has it.
        for arg in strs(&container["args"])
            .iter()
            .filter(|a| a.starts_with('/'))
        {
            assert!(
                mounted_file(rendered, pod, container, arg).is_some(),
                "{name}: {arg} is not mounted from a ConfigMap that has it"
            );
        }
    }
}

fn services(rendered: &Rendered) -> HashMap<String, Vec<u16>> {
    rendered
        .of_kind("Service")
        .map(|s| {
            let ports = s["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["port"].as_u64().unwrap() as u16)
                .collect();
            (s["metadata"]["name"].as_str().unwrap().to_string(), ports)
        })
        .collect()
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn seconds(text: &str) -> u64 {
    let d = llm_ratelimit::config::parse_duration(text).unwrap();
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The http_filters of the first listener and the limiter's clusters, without addresses.
fn limiter_wiring(config: &Value) -> (Value, Vec<Value>) {
    let listener = &config["static_resources"]["listeners"][0];
    let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
    let clusters = config["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("limiter_"))
        .map(|c| {
            let mut c = c.clone();
            c.as_object_mut().unwrap().remove("load_assignment");
            c
        })
        .collect();
    (hcm["http_filters"].clone(), clusters)
}

/// Checks one rendering; `complete`: it is deployable as it is (the Services the
/// gateway's Envoy names exist), which `base` alone is not.
fn check_overlay(dir: &str, complete: bool) -> Rendered {
    let _serial = serial();
    let rendered = Rendered {
        objects: render(dir),
    };
    for (what, pod) in rendered.pods() {
        check_pod(&rendered, &what, pod);
    }
    let services = services(&rendered);
    let deployment = rendered.get("Deployment", "llm-gateway");
    assert_eq!(deployment["metadata"]["namespace"], "llm-ratelimit");
    assert!(
        deployment["spec"]["replicas"].as_u64().unwrap() >= 2,
        "{dir}: replicas"
    );
    let pod = &deployment["spec"]["template"];
    assert!(
        pod["spec"]["topologySpreadConstraints"]
            .as_array()
            .is_some_and(|c| !c.is_empty()),
        "{dir}: spread across nodes"
    );
    let envoy = container(pod, "envoy");
    let limiter = container(pod, "llm-ratelimit");

    // The keys ConfigMap: its fixed name, only digests, and valid for the limiter.
    let keys = rendered.config_map("llm-ratelimit-keys")["keys.yaml"]
        .as_str()
        .unwrap();
    assert!(
        !keys.contains("\n    key:"),
        "{dir}: a secret in the keys ConfigMap"
    );
    let tmp = tempfile::tempdir().unwrap();
    let keys_file = tmp.path().join("keys.yaml");
    std::fs::write(&keys_file, keys).unwrap();
    let out = Command::new(LIMITER)
        .arg("check-config")
        .arg(&keys_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{dir}: check-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let limiter_args = strs(&limiter["args"]);
    let config_path = flag(&limiter_args, "--config").expect("--config");
    assert_eq!(
        mounted_file(&rendered, pod, limiter, config_path).as_deref(),
        Some(keys)
    );

    // The Envoy ConfigMap: valid for Envoy, the same limiter wiring as envoy/envoy.yaml,
    // every cluster at a port of this pod (localhost) or of a Service.
    let envoy_args = strs(&envoy["args"]);
    let envoy_text = mounted_file(&rendered, pod, envoy, flag(&envoy_args, "-c").unwrap()).unwrap();
    let envoy_file = tmp.path().join("envoy.yaml");
    std::fs::write(&envoy_file, &envoy_text).unwrap();
    let out = Command::new(envoy_bin())
        .args(["--mode", "validate", "-c"])
        .arg(&envoy_file)
        .output()
        .expect("run envoy (scripts/test.sh installs it into .venv)");
    assert!(
        out.status.success(),
        "{dir}: envoy --mode validate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let envoy_config: Value = serde_saphyr::from_str(&envoy_text).unwrap();
    let shipped: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("envoy/envoy.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        limiter_wiring(&envoy_config),
        limiter_wiring(&shipped),
        "{dir}: k8s Envoy differs from envoy/envoy.yaml"
    );
    // The same tracing as envoy/envoy.yaml, and the limiter exports to the collector
    // Envoy's tracer does (its address checked below with every other cluster).
    let tracing = |c: &Value| {
        c["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["tracing"]
            .clone()
    };
    assert!(tracing(&shipped).is_object());
    assert_eq!(
        tracing(&envoy_config),
        tracing(&shipped),
        "{dir}: k8s Envoy traces differently from envoy/envoy.yaml"
    );
    let env = |name: &str| {
        limiter["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("{dir}: the limiter has no {name}"))
            .to_string()
    };
    let collector = env("OTEL_EXPORTER_OTLP_ENDPOINT");
    assert_eq!(env("OTEL_EXPORTER_OTLP_PROTOCOL"), "grpc");
    assert_eq!(env("OTEL_SERVICE_NAME"), "llm-ratelimit");
    let exported_to = addr(collector.strip_prefix("http://").unwrap());
    let in_pod: Vec<(String, u16)> = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| listens(&rendered, pod, c))
        .collect();
    let addresses = envoy_addresses(&envoy_config);
    for (cluster, address, port) in &addresses.clusters {
        if address == "127.0.0.1" {
            assert!(
                in_pod.iter().any(|(_, p)| p == port),
                "{dir}: Envoy cluster {cluster} at 127.0.0.1:{port}, where nothing in the pod listens"
            );
        } else if complete {
            let known = services
                .get(address.as_str())
                .is_some_and(|ports| ports.contains(port));
            assert!(
                known,
                "{dir}: Envoy cluster {cluster} at {address}:{port}, no such Service port"
            );
        }
    }
    let envoy_collector: Vec<_> = addresses
        .clusters
        .iter()
        .filter(|(c, _, _)| c == "otel_collector")
        .map(|(_, a, p)| (a.clone(), *p))
        .collect();
    assert_eq!(
        envoy_collector,
        vec![exported_to],
        "{dir}: Envoy and the limiter trace to different collectors"
    );
    // The limiter's gRPC port is the one Envoy's limiter clusters use.
    let grpc_port = addr(flag(&limiter_args, "--grpc-addr").unwrap()).1;
    assert!(addresses
        .clusters
        .iter()
        .filter(|(c, _, _)| c.starts_with("limiter_"))
        .all(|(_, a, p)| a == "127.0.0.1" && *p == grpc_port));

    // The Service reaches Envoy's listener.
    let service = rendered.get("Service", "llm-gateway");
    for port in service["spec"]["ports"].as_array().unwrap() {
        let target = port_of(envoy, &port["targetPort"]);
        assert!(addresses
            .listens
            .iter()
            .any(|(a, p)| a == "0.0.0.0" && *p == target));
    }

    // Prometheus scrapes the limiter's HTTP port.
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    let http_port = addr(flag(&limiter_args, "--http-addr").unwrap()).1;
    assert_eq!(annotations["prometheus.io/port"], http_port.to_string());

    // The grace covers Envoy's preStop wait and the limiter's delay, with room to drain.
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    let pre_stop = envoy["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    let delay = seconds(flag(&limiter_args, "--shutdown-delay").unwrap_or("5s"));
    assert!(
        delay > pre_stop,
        "{dir}: the limiter must outlive Envoy's serving"
    );
    assert!(
        grace >= delay + 10 && grace >= pre_stop + 10,
        "{dir}: grace {grace}s"
    );
    rendered
}

#[test]
fn base_renders_and_is_wired_up() {
    check_overlay("base", false);
}

#[test]
fn demo_renders_and_is_wired_up() {
    let rendered = check_overlay("overlays/demo", true);
    for name in ["redis", "mock-upstream"] {
        rendered.get("Deployment", name);
    }
    let job = rendered.get("Job", "llm-loadtest");
    let args = strs(&job["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert_eq!(args[0], "http");
    assert!(flag(&args, "--verify").is_some());
    let target = flag(&args, "--target").unwrap();
    assert_eq!(
        target, "http://llm-gateway",
        "the Job drives the gateway Service"
    );
    let limiter = container(
        &rendered.get("Deployment", "llm-gateway")["spec"]["template"],
        "llm-ratelimit",
    );
    let redis = limiter["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "REDIS_URL")
        .unwrap();
    assert_eq!(redis["value"], "redis://redis:6379");
    assert!(services(&rendered)["redis"].contains(&6379));
    // The collector: its Service reaches its OTLP receivers, whose spans it logs.
    let collector = &rendered.get("Deployment", "otel-collector")["spec"]["template"];
    let otelcol = container(collector, "otel-collector");
    let service = rendered.get("Service", "otel-collector");
    let listening = listens(&rendered, collector, otelcol);
    for port in service["spec"]["ports"].as_array().unwrap() {
        let target = port_of(otelcol, &port["targetPort"]);
        assert!(
            listening
                .iter()
                .any(|(a, p)| a == "0.0.0.0" && *p == target),
            "the collector Service's {target}: {listening:?}"
        );
    }
    let config_path = flag(&strs(&otelcol["args"]), "--config")
        .unwrap()
        .to_string();
    let config: Value =
        serde_saphyr::from_str(&mounted_file(&rendered, collector, otelcol, &config_path).unwrap())
            .unwrap();
    let traces = &config["service"]["pipelines"]["traces"];
    assert_eq!(traces["receivers"], json!(["otlp"]));
    assert_eq!(traces["exporters"], json!(["debug"]));
    assert_eq!(config["service"]["extensions"], json!(["health_check"]));
}

#[test]
fn production_renders_and_is_wired_up() {
    let rendered = check_overlay("overlays/production", true);
    let pod = &rendered.get("Deployment", "llm-gateway")["spec"]["template"];
    let limiter = container(pod, "llm-ratelimit");
    let redis = limiter["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "REDIS_URL")
        .unwrap();
    assert_eq!(
        redis["valueFrom"]["secretKeyRef"]["name"],
        "llm-ratelimit-redis"
    );
    let selector = &pod["metadata"]["labels"]["app.kubernetes.io/name"];
    let pdb = rendered.get("PodDisruptionBudget", "llm-gateway");
    assert_eq!(
        &pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        selector
    );
    let hpa = rendered.get("HorizontalPodAutoscaler", "llm-gateway");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "llm-gateway");
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);
    assert!(
        rendered
            .of_kind("Deployment")
            .all(|d| d["metadata"]["name"] == "llm-gateway"),
        "no in-cluster Redis, no collector of ours"
    );
    // Traces go to the user's collector, named by an ExternalName Service.
    let collector = rendered.get("Service", "otel-collector");
    assert_eq!(collector["spec"]["type"], "ExternalName");
    assert!(collector["spec"]["externalName"].as_str().is_some());
}

// ---------------------------------------------------------------------------------------
// The demo's gateway pod, run as local processes.

/// A child process killed by pid when dropped, unless it has exited.
/// A ConfigMap volume as the kubelet lays it out: `..<timestamp>/<files>`, `..data` → that
/// directory, and each file a symlink `<file> → ..data/<file>`.
struct ConfigMapVolume {
    dir: PathBuf,
    generation: u32,
}

impl ConfigMapVolume {
    fn new(dir: PathBuf, data: &BTreeMap<String, String>) -> ConfigMapVolume {
        std::fs::create_dir_all(&dir).unwrap();
        let mut volume = ConfigMapVolume { dir, generation: 0 };
        volume.update(data);
        for name in data.keys() {
            symlink(format!("..data/{name}"), volume.dir.join(name)).unwrap();
        }
        volume
    }

    /// The kubelet's update: a new timestamped directory, `..data_tmp` pointing at it,
    /// renamed over `..data` in one step, the old directory removed.
    fn update(&mut self, data: &BTreeMap<String, String>) {
        self.generation += 1;
        let stamp = format!("..2026_12_01_00_00_00.{:09}", self.generation);
        let new = self.dir.join(&stamp);
        std::fs::create_dir(&new).unwrap();
        for (name, text) in data {
            std::fs::write(new.join(name), text).unwrap();
        }
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        symlink(&stamp, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}

/// The simulation's one port mapping: a free loopback port for each port the pod uses.
struct Ports(HashMap<u16, u16>);

impl Ports {
    fn get(&self, port: u16) -> u16 {
        *self
            .0
            .get(&port)
            .unwrap_or_else(|| panic!("port {port} is not the pod's"))
    }

    /// `0.0.0.0:P` / `127.0.0.1:P` → `127.0.0.1:<mapped P>`.
    fn arg(&self, arg: &str) -> String {
        for host in ["0.0.0.0:", "127.0.0.1:"] {
            if let Some(port) = arg.strip_prefix(host).and_then(|p| p.parse().ok()) {
                return format!("127.0.0.1:{}", self.get(port));
            }
        }
        arg.to_string()
    }
}

/// The Envoy config with every socket address moved: the pod's ports by `ports`, the
/// Services to the test's own processes. Every address must be one of those.
fn envoy_for_simulation(
    text: &str,
    ports: &Ports,
    services: &HashMap<(String, u16), u16>,
) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if let Some(at) = line.find("socket_address: { address: ") {
            let rest = &line[at + "socket_address: { address: ".len()..];
            let (address, rest) = rest.split_once(", port_value: ").unwrap();
            let port: u16 = rest.trim_end_matches(" }").parse().unwrap();
            let mapped = match address {
                "0.0.0.0" | "127.0.0.1" => ports.get(port),
                service => *services
                    .get(&(service.to_string(), port))
                    .unwrap_or_else(|| panic!("Envoy names {service}:{port}, not simulated")),
            };
            out.push_str(&format!(
                "{}socket_address: {{ address: 127.0.0.1, port_value: {mapped} }}\n",
                &line[..at]
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

struct SimContainer {
    spec: Value,
    proc: Proc,
}

async fn grpc_serving(port: u16) -> Option<bool> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(
        reply.into_inner().status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
    )
}

/// One run of a probe as the kubelet does it: success or not.
async fn probe(spec: &Value, probe: &Value, ports: &Ports) -> bool {
    let port = ports.get(probe_port(spec, probe));
    if let Some(http) = probe.get("httpGet") {
        let url = format!("http://127.0.0.1:{port}{}", http["path"].as_str().unwrap());
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        // The kubelet: any status from 200 to 399 is a success.
        return client
            .get(url)
            .send()
            .await
            .is_ok_and(|r| (200..400).contains(&r.status().as_u16()));
    }
    if probe.get("grpc").is_some() {
        return grpc_serving(port).await == Some(true);
    }
    if probe.get("tcpSocket").is_some() {
        return TcpStream::connect(("127.0.0.1", port)).is_ok();
    }
    panic!("probe {probe} is not simulated")
}

async fn poll_probe(c: &SimContainer, kind: &str, ports: &Ports, want: bool) {
    let p = &c.spec[kind];
    let deadline = Instant::now() + Duration::from_secs(60);
    while probe(&c.spec, p, ports).await != want {
        assert!(
            Instant::now() < deadline,
            "{} {kind} never became {want}",
            c.spec["name"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The SSE text of a streamed chat request through `listener`, read to its end; `first`
/// hears when its status line has arrived. A 503 (see [`chat`]) is sent again.
fn stream_chat(listener: u16, key: &str, first: std::sync::mpsc::Sender<()>) -> String {
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":200,"stream":true,"stream_options":{"include_usage":true}}"#;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut reader = loop {
        let mut tcp = TcpStream::connect(("127.0.0.1", listener)).unwrap();
        write!(
            tcp,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: llm\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut reader = BufReader::new(tcp);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        if status.starts_with("HTTP/1.1 503") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        break reader;
    };
    let _ = first.send(());
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    rest
}

fn completion_tokens(sse: &str) -> u64 {
    sse.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v["usage"]["completion_tokens"].as_u64())
        .expect("a usage chunk")
}

async fn usage(client: &reqwest::Client, http: u16, name: &str) -> Value {
    client
        .get(format!("http://127.0.0.1:{http}/v1/usage/{name}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The status of a chat request through the pod. A 503 (the limiter could not decide in
/// its 50 ms store deadline, as happens on a loaded CI box) counted nothing, so it is
/// sent again, as a client would.
async fn chat(client: &reqwest::Client, listener: u16, key: &str) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = client
            .post(format!("http://127.0.0.1:{listener}/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status != 503 || Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// The guard only keeps the other tests of this file (plain threads) out for the whole run;
// nothing on this runtime waits for it.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_gateway_pod_runs_reloads_keys_live_and_shuts_down_in_order() {
    let _serial = serial();
    let rendered = Rendered {
        objects: render("overlays/demo"),
    };
    let deployment = rendered.get("Deployment", "llm-gateway");
    let pod = &deployment["spec"]["template"];
    let tmp = tempfile::tempdir().unwrap();

    // The Services the pod names, as processes of the test's own.
    let redis = RedisServer::start();
    let mock_port = free_port();
    let _mock = Proc(
        Command::new(MOCK)
            .args([
                "--addr",
                &format!("127.0.0.1:{mock_port}"),
                "--stream-interval-ms",
                "100",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // No collector: a port nothing listens on, so the pod must work with tracing's
    // exports failing (Envoy's and the limiter's alike).
    let services: HashMap<(String, u16), u16> = [
        (("llm-upstream".to_string(), 9000), mock_port),
        (("redis".to_string(), 6379), redis.port),
        (("otel-collector".to_string(), 4317), free_port()),
    ]
    .into();

    // Every port the pod's containers listen on, mapped to a free loopback port.
    let mut ports = HashMap::new();
    for c in pod["spec"]["containers"].as_array().unwrap() {
        for (_, port) in listens(&rendered, pod, c) {
            ports.entry(port).or_insert_with(free_port);
        }
    }
    let ports = Ports(ports);

    // The volumes, as the kubelet lays out ConfigMaps; Envoy's with the mapped addresses.
    let mut volumes = HashMap::new();
    for v in pod["spec"]["volumes"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap().to_string();
        let map = v["configMap"]["name"]
            .as_str()
            .expect("only ConfigMap volumes are simulated");
        let data: BTreeMap<String, String> = rendered
            .config_map(map)
            .iter()
            .map(|(k, v)| {
                let text = v.as_str().unwrap();
                let text = if k == "envoy.yaml" {
                    envoy_for_simulation(text, &ports, &services)
                } else {
                    text.to_string()
                };
                (k.clone(), text)
            })
            .collect();
        let volume = ConfigMapVolume::new(tmp.path().join(&name), &data);
        volumes.insert(name, (volume, data));
    }

    let start = |spec: &Value| -> SimContainer {
        let mounts: Vec<(String, PathBuf)> = spec["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["mountPath"].as_str().unwrap().to_string(),
                    tmp.path().join(m["name"].as_str().unwrap()),
                )
            })
            .collect();
        let args: Vec<String> = strs(&spec["args"])
            .iter()
            .map(|a| {
                for (path, dir) in &mounts {
                    if let Some(rest) = a.strip_prefix(path.as_str()) {
                        return format!("{}{rest}", dir.display());
                    }
                }
                ports.arg(a)
            })
            .collect();
        let program: PathBuf = match binary(spec).as_str() {
            "envoy" => envoy_bin(),
            "llm-ratelimit" => LIMITER.into(),
            other => panic!("{other} is not simulated"),
        };
        let mut cmd = Command::new(program);
        cmd.args(&args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for e in spec["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap();
            let value = if let Some(v) = e["value"].as_str() {
                let mut v = v.to_string();
                for ((host, port), local) in &services {
                    v = v.replace(&format!("{host}:{port}"), &format!("127.0.0.1:{local}"));
                }
                v
            } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
                "llm-gateway-simulated".to_string()
            } else {
                panic!("env {name} is not simulated: {e}")
            };
            cmd.env(name, value);
        }
        let log = std::fs::File::create(
            tmp.path()
                .join(format!("{}.log", spec["name"].as_str().unwrap())),
        )
        .unwrap();
        let proc = Proc(
            cmd.stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        SimContainer {
            spec: spec.clone(),
            proc,
        }
    };
    let mut envoy = start(container(pod, "envoy"));
    let mut limiter = start(container(pod, "llm-ratelimit"));

    // The kubelet: startup probes until they pass, then readiness.
    for c in [&envoy, &limiter] {
        poll_probe(c, "startupProbe", &ports, true).await;
        poll_probe(c, "livenessProbe", &ports, true).await;
        poll_probe(c, "readinessProbe", &ports, true).await;
    }

    // OpenAI traffic through the pod's Envoy, counted by the limiter in Redis.
    let listener = ports.get(port_of(&envoy.spec, &json!("http")));
    let http = ports.get(addr(flag(&strs(&limiter.spec["args"]), "--http-addr").unwrap()).1);
    let client = reqwest::Client::new();
    let keys_text = rendered.config_map("llm-ratelimit-keys")["keys.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    for secret in ["sk-demo-team-a", "sk-demo-team-b"] {
        assert!(
            keys_text.contains(&hex::encode(Sha256::digest(secret))),
            "{secret}'s digest is in the keys"
        );
    }
    assert_eq!(chat(&client, listener, "sk-demo-team-a").await, 200);
    assert_eq!(chat(&client, listener, "sk-not-a-key").await, 401);
    let before = usage(&client, http, "team-a").await;
    assert_eq!(before["requests"]["used"], 1, "{before}");
    assert_eq!(before["requests"]["limit"], 600, "{before}");

    // Edit the keys ConfigMap (team-a: 600 rpm → 2): the kubelet swaps `..data`, and the
    // running limiter applies it.
    let (keys_volume, keys_data) = volumes.get_mut("keys").unwrap();
    let edited = keys_text.replacen("    rpm: 600\n", "    rpm: 2\n", 1);
    assert_ne!(edited, keys_text);
    keys_data.insert("keys.yaml".into(), edited);
    keys_volume.update(keys_data);
    let deadline = Instant::now() + Duration::from_secs(30);
    while usage(&client, http, "team-a").await["requests"]["limit"] != 2 {
        assert!(
            Instant::now() < deadline,
            "the edited limit was never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(chat(&client, listener, "sk-demo-team-a").await, 200);
    assert_eq!(
        chat(&client, listener, "sk-demo-team-a").await,
        429,
        "the new limit holds"
    );
    assert!(
        limiter.proc.0.try_wait().unwrap().is_none(),
        "applied without a restart"
    );

    // A stream in flight when the pod is deleted.
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let stream = std::thread::spawn(move || stream_chat(listener, "sk-demo-team-b", first_tx));
    first_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the stream started");

    // The kubelet deletes the pod: each container's preStop, then SIGTERM; the limiter
    // has none, so SIGTERM at once; Envoy's preStop sleeps first.
    let term = |p: &Proc| {
        assert!(Command::new("kill")
            .args(["-TERM", &p.0.id().to_string()])
            .status()
            .unwrap()
            .success());
    };
    assert!(limiter.spec["lifecycle"].get("preStop").is_none());
    let pre_stop = Duration::from_secs(
        envoy.spec["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap(),
    );
    let deleted = Instant::now();
    term(&limiter.proc);
    // Readiness fails while the limiter still runs; Envoy still serves meanwhile.
    poll_probe(&limiter, "readinessProbe", &ports, false).await;
    assert!(
        limiter.proc.0.try_wait().unwrap().is_none(),
        "exited before readiness was seen failing"
    );
    assert!(
        probe(&limiter.spec, &limiter.spec["livenessProbe"], &ports).await,
        "still alive while draining"
    );
    assert!(probe(&envoy.spec, &envoy.spec["readinessProbe"], &ports).await);
    let sse = tokio::task::spawn_blocking(move || stream.join().unwrap())
        .await
        .unwrap();
    let streamed = completion_tokens(&sse);
    assert!(
        streamed < 200,
        "the reservation was 200; the answer {streamed}"
    );
    tokio::time::sleep(pre_stop.saturating_sub(deleted.elapsed())).await;
    term(&envoy.proc);

    let wait_exit = |c: &mut SimContainer| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = c.proc.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit", c.spec["name"]);
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let _ = wait_exit(&mut envoy);
    let status = wait_exit(&mut limiter);
    assert!(status.success(), "llm-ratelimit exited {status}");

    let mut log = String::new();
    std::fs::File::open(tmp.path().join("llm-ratelimit.log"))
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(!log.contains("sk-demo"), "a secret in the log");
    assert!(log.contains("shutting down"), "{log}");

    // The stream was settled: a new pod's limiter on the same Redis sees the real output
    // tokens of team-b, not the 200 reserved.
    let replacement = start(container(pod, "llm-ratelimit"));
    poll_probe(&replacement, "readinessProbe", &ports, true).await;
    let after = usage(&client, http, "team-b").await;
    assert_eq!(after["output_tokens"]["used"], streamed, "{after}");
    assert_eq!(after["requests"]["used"], 1, "{after}");
}
