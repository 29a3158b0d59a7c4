//! The Kubernetes manifests (deploy/kubernetes), rendered by `kubectl kustomize` as a user
//! renders them: every object validates offline against the Kubernetes API schemas
//! (kubernetes-validate), the custom resources have what their definitions require, and
//! every workload holds what the README promises: restricted Pod Security, probes on the
//! health service, the nodes' own source addresses, one writer for SQLite, the database on
//! the volume. The PrometheusRule's rules pass `promtool check rules`.
//!
//! scripts/test installs kubectl (Debian's kubernetes-client, unless a kubectl is there) and
//! kubernetes-validate (PyPI, in a venv whose path it passes in TALOS_KMS_KUBERNETES_VALIDATE);
//! a test whose tool is missing skips loudly.

mod common;

use common::{run_limited, text};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use talos_kms_server::config::Config;
use talos_kms_server::store::Database;

/// Kubernetes releases whose API schemas every object must fit: the oldest the manifests
/// support and the newest kubernetes-validate bundles.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30", "1.37"];
/// Where the workloads mount the config (their `--config`).
const CONFIG_PATH: &str = "/etc/talos-kms-server/config/config.yaml";

fn skip(why: &str) {
    eprintln!("######## SKIPPED: {why} ########");
}

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// Runs a command to completion, killed after a minute.
fn run(command: &mut Command) -> Output {
    run_limited(command, Duration::from_secs(60))
}

/// A variant as a user deploys it: an overlay, with components added.
struct Variant {
    overlay: &'static str,
    components: &'static [&'static str],
}

const VARIANTS: [Variant; 5] = [
    Variant {
        overlay: "single",
        components: &[],
    },
    Variant {
        overlay: "replicas",
        components: &[],
    },
    Variant {
        overlay: "replicas-proxy-v2",
        components: &[],
    },
    Variant {
        overlay: "single",
        components: &["cert-manager"],
    },
    Variant {
        overlay: "replicas",
        components: &["cert-manager"],
    },
];

impl Variant {
    fn name(&self) -> String {
        std::iter::once(self.overlay)
            .chain(self.components.iter().copied())
            .collect::<Vec<_>>()
            .join("+")
    }

    /// `kubectl kustomize` of the overlay, or of a kustomization adding the components to it
    /// (kustomize takes other directories by relative path only).
    fn render(&self) -> Vec<Value> {
        let overlay = deploy().join("overlays").join(self.overlay);
        let scratch = tempfile::tempdir().unwrap();
        let dir = if self.components.is_empty() {
            overlay
        } else {
            let up = "../".repeat(scratch.path().components().count() - 1);
            let relative =
                |path: PathBuf| format!("{up}{}", path.strip_prefix("/").unwrap().display());
            let mut kustomization = format!("resources:\n  - {}\ncomponents:\n", relative(overlay));
            for component in self.components {
                kustomization.push_str(&format!(
                    "  - {}\n",
                    relative(deploy().join("components").join(component))
                ));
            }
            std::fs::write(scratch.path().join("kustomization.yaml"), kustomization).unwrap();
            scratch.path().to_path_buf()
        };
        let output = run(Command::new("kubectl").arg("kustomize").arg(&dir));
        assert!(
            output.status.success(),
            "kubectl kustomize {}: {}",
            self.name(),
            text(&output.stderr)
        );
        let objects: Vec<Value> = serde_saphyr::from_multiple(&text(&output.stdout))
            .unwrap_or_else(|e| panic!("{}: {e}", self.name()));
        assert!(objects.len() > 5, "{}: {objects:?}", self.name());
        objects
    }
}

/// A variant's name and its objects.
type Rendered = (String, Vec<Value>);

/// Why this machine's kubectl cannot render the manifests, if it cannot: they need the
/// kustomize of kubectl 1.21 or later (`labels`, components).
fn kubectl_cannot() -> Option<String> {
    let Ok(output) = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    else {
        return Some("no kubectl: scripts/test installs Debian's kubernetes-client".into());
    };
    let version = text(&output.stdout);
    let kustomize = version
        .split("Kustomize Version: v")
        .nth(1)
        .and_then(|rest| rest.split('.').next())
        .and_then(|major| major.parse::<u32>().ok());
    // Debian 12's kubernetes-client (1.20) embeds kustomize 2.0.3 and prints no version.
    (kustomize.unwrap_or(0) < 4).then(|| {
        format!(
            "this kubectl's kustomize is older than v4 and cannot render deploy/kubernetes \
             (install kubectl 1.24 or later): {}",
            version.trim()
        )
    })
}

/// Every variant rendered once for all the tests, or None (skipped loudly) when kubectl
/// cannot render them.
fn rendered() -> Option<&'static [Rendered]> {
    static RENDERED: std::sync::OnceLock<Option<Vec<Rendered>>> = std::sync::OnceLock::new();
    let rendered = RENDERED.get_or_init(|| match kubectl_cannot() {
        Some(why) => {
            skip(&why);
            None
        }
        None => Some(
            VARIANTS
                .iter()
                .map(|variant| (variant.name(), variant.render()))
                .collect(),
        ),
    });
    if rendered.is_none() {
        skip("kubectl cannot render the manifests (above)");
    }
    rendered.as_deref()
}

fn kind(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

fn one<'a>(objects: &'a [Value], wanted: &str, variant: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| kind(o) == wanted).collect();
    assert_eq!(found.len(), 1, "{variant}: one {wanted}, found {found:?}");
    found[0]
}

/// The custom resources: outside the Kubernetes API schemas, checked here.
const CUSTOM: [(&str, &str); 3] = [
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Certificate"),
];

fn is_custom(object: &Value) -> bool {
    CUSTOM
        .iter()
        .any(|(api, k)| object["apiVersion"] == *api && kind(object) == *k)
}

#[test]
fn every_variant_validates_against_the_kubernetes_api_schemas() {
    let Some(variants) = rendered() else { return };
    let validate = match std::env::var_os("TALOS_KMS_KUBERNETES_VALIDATE") {
        Some(path) => PathBuf::from(path),
        None if Command::new("kubernetes-validate")
            .arg("--version")
            .output()
            .is_ok() =>
        {
            PathBuf::from("kubernetes-validate")
        }
        None => {
            return skip(
                "kubernetes-validate is not installed: scripts/test installs it (PyPI) in a \
                 venv and sets TALOS_KMS_KUBERNETES_VALIDATE",
            );
        }
    };
    let dir = tempfile::tempdir().unwrap();
    for (variant, objects) in variants {
        // JSON documents are YAML documents: one file per variant, custom resources left out.
        let file = dir.path().join(format!("{variant}.yaml"));
        let documents: Vec<String> = objects
            .iter()
            .filter(|object| !is_custom(object))
            .map(|object| object.to_string())
            .collect();
        std::fs::write(&file, documents.join("\n---\n")).unwrap();
        for version in KUBERNETES_VERSIONS {
            let output = run(Command::new(&validate)
                .args(["--strict", "--quiet", "-k", version])
                .arg(&file));
            let report = format!("{}{}", text(&output.stdout), text(&output.stderr));
            assert!(
                output.status.success() && !report.contains("ERROR"),
                "{variant} against Kubernetes {version}:\n{report}"
            );
            // Nothing was left unchecked: every kind left had a schema.
            assert!(
                !report.contains("Couldn't find schema"),
                "{variant} against Kubernetes {version}:\n{report}"
            );
        }
    }
}

#[test]
fn the_custom_resources_have_what_their_definitions_require() {
    let Some(variants) = rendered() else { return };
    for (variant, objects) in variants {
        // Any other kind fails the schema check, which finds no schema for it.
        for object in objects.iter().filter(|o| is_custom(o)) {
            assert!(!name(object).is_empty(), "{variant}: {object}");
            assert_eq!(object["metadata"]["namespace"], "talos-kms", "{variant}");
        }

        let monitor = one(objects, "ServiceMonitor", variant);
        let selector = monitor["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap_or_else(|| panic!("{variant}: ServiceMonitor without spec.selector"));
        let endpoints = monitor["spec"]["endpoints"].as_array().unwrap();
        assert!(!endpoints.is_empty(), "{variant}: no endpoints");
        // The selector finds exactly the metrics Service, which has the endpoints' port.
        let services: Vec<&Value> = objects
            .iter()
            .filter(|o| kind(o) == "Service")
            .filter(|o| {
                selector
                    .iter()
                    .all(|(key, value)| o["metadata"]["labels"][key] == *value)
            })
            .collect();
        assert_eq!(services.len(), 1, "{variant}: {services:?}");
        for endpoint in endpoints {
            let port = &endpoint["port"];
            assert!(
                services[0]["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == *port),
                "{variant}: the ServiceMonitor scrapes port {port}, which the Service lacks"
            );
        }

        let rule = one(objects, "PrometheusRule", variant);
        let groups = rule["spec"]["groups"].as_array().unwrap();
        assert!(!groups.is_empty(), "{variant}");
        for group in groups {
            assert!(group["name"].is_string(), "{variant}: {group}");
            let rules = group["rules"].as_array().unwrap();
            assert!(!rules.is_empty(), "{variant}: {group}");
            for rule in rules {
                assert!(rule["expr"].is_string(), "{variant}: {rule}");
                assert!(
                    rule["alert"].is_string() != rule["record"].is_string(),
                    "{variant}: a rule is an alert or a recording rule: {rule}"
                );
            }
        }
        let packaged: Value = serde_saphyr::from_str(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/prometheus/alerts.yml"),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            rule["spec"]["groups"], packaged["groups"],
            "{variant}: the PrometheusRule differs from packaging/prometheus/alerts.yml"
        );

        if let Some(certificate) = objects.iter().find(|o| kind(o) == "Certificate") {
            let spec = &certificate["spec"];
            assert!(spec["secretName"].is_string(), "{variant}: {spec}");
            assert!(spec["issuerRef"]["name"].is_string(), "{variant}: {spec}");
            assert!(
                [
                    "dnsNames",
                    "ipAddresses",
                    "commonName",
                    "uris",
                    "emailAddresses"
                ]
                .iter()
                .any(|key| !spec[key].is_null()),
                "{variant}: the Certificate names nothing: {spec}"
            );
            // The Secret it fills is the one the server reads.
            let pod = &workload(objects, variant)["spec"]["template"]["spec"];
            assert!(
                pod["volumes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v["secret"]["secretName"] == spec["secretName"]),
                "{variant}: the pods do not mount {}",
                spec["secretName"]
            );
        }
    }
}

/// The one StatefulSet or Deployment of a variant.
fn workload<'a>(objects: &'a [Value], variant: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| ["StatefulSet", "Deployment"].contains(&kind(o)))
        .collect();
    assert_eq!(found.len(), 1, "{variant}: one workload");
    found[0]
}

/// The server's config as the workload mounts it, parsed by the server's own parser.
fn config(objects: &[Value], pod: &Value, variant: &str) -> (Config, String) {
    let volume = mounted_volume(pod, CONFIG_PATH, variant);
    let config_map = volume["configMap"]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("{variant}: the config is not from a ConfigMap"));
    let text = objects
        .iter()
        .find(|o| kind(o) == "ConfigMap" && name(o) == config_map)
        .and_then(|o| o["data"]["config.yaml"].as_str())
        .unwrap_or_else(|| panic!("{variant}: no ConfigMap {config_map} with config.yaml"))
        .to_string();
    let config = Config::parse(Path::new(CONFIG_PATH), &text)
        .unwrap_or_else(|e| panic!("{variant}: the server refuses its config: {e}"));
    (config, text)
}

/// The container's mount of the directory holding `path` (the deepest), not a subPath.
fn mount_of<'a>(pod: &'a Value, path: &str, variant: &str) -> &'a Value {
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            let dir = m["mountPath"].as_str().unwrap().trim_end_matches('/');
            path.starts_with(&format!("{dir}/"))
        })
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| panic!("{variant}: nothing is mounted where {path} is"));
    // A subPath mount never sees a Secret's or ConfigMap's updates.
    assert!(mount["subPath"].is_null(), "{variant}: {mount}");
    mount
}

/// The pod's volume mounted where `path` is.
fn mounted_volume<'a>(pod: &'a Value, path: &str, variant: &str) -> &'a Value {
    let mount = mount_of(pod, path, variant);
    pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("{variant}: no pod volume {}", mount["name"]))
}

fn port_number(container: &Value, port: &Value) -> u64 {
    port.as_u64().unwrap_or_else(|| {
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == *port)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port {port}"))
    })
}

#[test]
fn every_workload_is_restricted_probed_and_keeps_the_nodes_addresses() {
    let Some(variants) = rendered() else { return };
    for (variant, objects) in variants {
        let namespace = one(objects, "Namespace", variant);
        assert_eq!(
            namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted",
            "{variant}"
        );
        let workload = workload(objects, variant);
        let pod = &workload["spec"]["template"]["spec"];
        let (config, config_text) = config(objects, pod, variant);

        // The restricted Pod Security profile.
        for key in ["hostNetwork", "hostPID", "hostIPC"] {
            assert_ne!(pod[key], true, "{variant}: {key}");
        }
        assert!(
            pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|v| v["hostPath"].is_null()),
            "{variant}: a hostPath volume"
        );
        let containers = pod["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "{variant}");
        let container = &containers[0];
        let security = &container["securityContext"];
        let either = |key: &str| {
            if security[key].is_null() {
                pod["securityContext"][key].clone()
            } else {
                security[key].clone()
            }
        };
        assert_eq!(either("runAsNonRoot"), true, "{variant}");
        assert_ne!(either("runAsUser"), 0, "{variant}");
        assert_eq!(
            either("seccompProfile")["type"],
            "RuntimeDefault",
            "{variant}"
        );
        assert_eq!(security["allowPrivilegeEscalation"], false, "{variant}");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{variant}");
        assert_ne!(security["privileged"], true, "{variant}");
        assert_eq!(
            security["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{variant}"
        );
        assert!(security["capabilities"]["add"].is_null(), "{variant}");

        // Startup and readiness ask the gRPC health service, which the server answers
        // without TLS only on its metrics port; liveness never depends on the database.
        let metrics = config
            .metrics_address
            .unwrap_or_else(|| panic!("{variant}: no metricsAddress, so no plain health"));
        for probe in ["startupProbe", "readinessProbe"] {
            let grpc = &container[probe]["grpc"];
            assert_eq!(
                port_number(container, &grpc["port"]),
                u64::from(metrics.port()),
                "{variant}: {probe} must ask gRPC health on the metrics port"
            );
            assert!(
                grpc["service"].is_null() || grpc["service"] == "",
                "{variant}: {probe} asks for the server as a whole"
            );
        }
        let liveness = &container["livenessProbe"];
        assert!(
            liveness["grpc"].is_null() && liveness["tcpSocket"].is_object(),
            "{variant}: liveness must not restart a server whose database is away: {liveness}"
        );
        assert!(
            metrics.ip().is_unspecified(),
            "{variant}: the kubelet must reach {metrics}"
        );

        // The KMS Service reaches the server's port and keeps the nodes' addresses: no
        // kube-proxy SNAT, or a PROXY header read only from trusted proxies.
        let kms_service = objects
            .iter()
            .find(|o| kind(o) == "Service" && o["spec"]["type"] == "LoadBalancer")
            .unwrap_or_else(|| panic!("{variant}: no LoadBalancer Service"));
        let target = &kms_service["spec"]["ports"][0]["targetPort"];
        assert_eq!(
            port_number(container, target),
            u64::from(config.listen.port()),
            "{variant}: the Service's port is not the server's"
        );
        let proxied = config_text.contains("\ntrustedProxies:");
        assert!(
            kms_service["spec"]["externalTrafficPolicy"] == "Local"
                || (proxied && !config.limits.trusted_proxies.is_empty()),
            "{variant}: externalTrafficPolicy Local, or PROXY v2 from trustedProxies"
        );

        match &config.database {
            Database::Sqlite(path) => {
                // One writer: exactly one replica, and never two at once.
                assert_eq!(
                    kind(workload),
                    "StatefulSet",
                    "{variant}: SQLite needs one writer"
                );
                assert_eq!(workload["spec"]["replicas"], 1, "{variant}");
                assert_ne!(
                    workload["spec"]["podManagementPolicy"], "Parallel",
                    "{variant}"
                );
                let mount = mount_of(pod, path.to_str().unwrap(), variant);
                let on_claim = workload["spec"]["volumeClaimTemplates"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|claim| claim["metadata"]["name"] == mount["name"]);
                let on_pod_volume = pod["volumes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v["name"] == mount["name"]);
                assert!(
                    on_claim && !on_pod_volume,
                    "{variant}: {} is not on the PersistentVolumeClaim",
                    path.display()
                );
                assert_eq!(
                    workload["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"],
                    "Retain",
                    "{variant}: deleting the StatefulSet must keep the records"
                );
            }
            Database::Postgres(options) => {
                let password = options
                    .password_file
                    .as_ref()
                    .unwrap_or_else(|| panic!("{variant}: no passwordFile"));
                assert!(!options.url_has_password(), "{variant}");
                let volume = mounted_volume(pod, password.to_str().unwrap(), variant);
                assert!(
                    volume["secret"]["secretName"].is_string(),
                    "{variant}: passwordFile is not from a Secret"
                );
                assert!(
                    pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                        [0]["topologyKey"]
                        == "kubernetes.io/hostname",
                    "{variant}: replicas spread across nodes"
                );
                let budget = one(objects, "PodDisruptionBudget", variant);
                assert_eq!(
                    budget["spec"]["selector"]["matchLabels"],
                    workload["spec"]["selector"]["matchLabels"],
                    "{variant}"
                );
            }
        }
    }
}

#[test]
fn the_prometheus_rules_pass_promtool() {
    let Some(variants) = rendered() else { return };
    if Command::new("promtool").arg("--version").output().is_err() {
        return skip("no promtool: scripts/test installs Debian's prometheus");
    }
    let dir = tempfile::tempdir().unwrap();
    for (variant, objects) in variants {
        let rule = one(objects, "PrometheusRule", variant);
        let file = dir.path().join(format!("{variant}.rules.json"));
        std::fs::write(&file, rule["spec"].to_string()).unwrap();
        let output = run(Command::new("promtool").args(["check", "rules"]).arg(&file));
        assert!(
            output.status.success(),
            "{variant}: {}{}",
            text(&output.stdout),
            text(&output.stderr)
        );
        let rules: usize = rule["spec"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|group| group["rules"].as_array().unwrap().len())
            .sum();
        assert!(
            text(&output.stdout).contains(&format!("SUCCESS: {rules} rules found")),
            "{variant}: {}",
            text(&output.stdout)
        );
    }
}
