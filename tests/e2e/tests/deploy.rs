//! The deployment files under deploy/: Prometheus config and alert rules through Debian's
//! `promtool` (check and unit tests), every metric the rules and dashboards use checked against
//! what metricsd really emits (NVML simulator, system and discovery collectors, the agent's own
//! metrics), and the Kubernetes, compose and Docker files checked against each other and the
//! agent's config.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use metricsd_e2e::{build, free_port, http_get, require_tool, root, wait_for, Agent, Workdir};
use yaml_rust2::{Yaml, YamlLoader};

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn yaml(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn promtool(dir: &Path, args: &[&str]) {
    let out = Command::new(require_tool("promtool", "prometheus"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool_and_its_unit_tests() {
    let dir = deploy().join("prometheus");
    promtool(&dir, &["check", "config", "prometheus.yml"]);
    promtool(&dir, &["check", "rules", "rules/gpu-alerts.yml"]);
    promtool(
        &dir.join("rules"),
        &["test", "rules", "gpu-alerts.test.yml"],
    );
}

/// The alerting rules: (name, rule).
fn alerts() -> Vec<(String, Yaml)> {
    let docs = yaml(&deploy().join("prometheus/rules/gpu-alerts.yml"));
    let mut out = Vec::new();
    for group in docs[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            if let Some(name) = rule["alert"].as_str() {
                out.push((name.to_string(), rule.clone()));
            }
        }
    }
    out
}

#[test]
fn every_alert_has_for_severity_text_and_a_firing_and_a_quiet_unit_test() {
    let alerts = alerts();
    let names: BTreeSet<&str> = alerts.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "MetricsdAgentDown",
        "GpuLost",
        "GpuTemperatureNearSlowdown",
        "GpuThermalThrottling",
        "GpuPowerThrottling",
        "GpuEccUncorrectedErrors",
        "GpuRetirementPending",
        "GpuMemoryNearlyFull",
        "GpuIdleWithMemoryHeld",
        "GpuPowerAtLimit",
        "GpuPcieLinkDegraded",
        "GpuDiscoveryDown",
        "MetricsdSinkDroppingSamples",
    ] {
        assert!(names.contains(expected), "no alert {expected}");
    }
    for (name, rule) in &alerts {
        assert!(rule["for"].as_str().is_some(), "{name}: no `for`");
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name}: no {key}"
            );
        }
    }
    let tests = yaml(&deploy().join("prometheus/rules/gpu-alerts.test.yml"));
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for group in tests[0]["tests"].as_vec().expect("tests") {
        for case in group["alert_rule_test"].as_vec().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            match case["exp_alerts"].as_vec() {
                Some(v) if !v.is_empty() => firing.insert(name),
                _ => quiet.insert(name),
            };
        }
    }
    for name in &names {
        assert!(firing.contains(*name), "{name}: no case where it fires");
        assert!(
            quiet.contains(*name),
            "{name}: no case where it stays quiet"
        );
    }
}

/// PromQL modifiers followed by a list of label names.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// PromQL words that are not metric names.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "avg",
    "max",
    "min",
    "count",
    "rate",
    "irate",
    "increase",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "and",
    "or",
    "unless",
    "vector",
    "bool",
    "offset",
    "topk",
    "bottomk",
    "abs",
    "time",
    "label_values",
];

/// The metric names a PromQL expression refers to.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // label_values(metric, label) of Grafana variables: the metric.
    let expr = match expr.strip_prefix("label_values(") {
        Some(rest) => rest.split(',').next().unwrap_or("").to_string(),
        None => expr.to_string(),
    };
    // Drop strings, label matchers and ranges.
    let mut flat = String::with_capacity(expr.len());
    let (mut braces, mut brackets, mut in_string) = (0, 0, false);
    for c in expr.chars() {
        match c {
            '"' => in_string = !in_string,
            _ if in_string => {}
            '{' => braces += 1,
            '}' => braces -= 1,
            '[' => brackets += 1,
            ']' => brackets -= 1,
            _ if braces > 0 || brackets > 0 => {}
            c => flat.push(c),
        }
        if matches!(c, '}' | ']' | '"') {
            flat.push(' ');
        }
    }
    // Words, with the label lists of `by (…)` and friends left out.
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '.';
    let chars: Vec<char> = flat.chars().collect();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        if !is_word(chars[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_word(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        if GROUPING.contains(&word.as_str()) {
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            if chars.get(j) == Some(&'(') {
                while j < chars.len() && chars[j] != ')' {
                    j += 1;
                }
                i = j + 1;
            }
            continue;
        }
        let first = word.chars().next().unwrap_or('0');
        if !first.is_ascii_digit() && !PROMQL_WORDS.contains(&word.as_str()) {
            out.insert(word);
        }
    }
    out
}

/// The metric names used by the alert rules and both dashboards.
fn used_names() -> BTreeSet<String> {
    let mut exprs: Vec<String> = alerts()
        .iter()
        .filter_map(|(_, r)| r["expr"].as_str().map(str::to_string))
        .collect();
    for d in ["gpu-fleet.json", "node.json"] {
        let dash = json(&deploy().join("grafana/dashboards").join(d));
        for p in dash["panels"].as_array().expect("panels") {
            for t in p["targets"].as_array().expect("targets") {
                exprs.push(t["expr"].as_str().expect("expr").to_string());
            }
        }
        for v in dash["templating"]["list"].as_array().expect("templating") {
            if let Some(q) = v["query"]["query"].as_str() {
                exprs.push(q.to_string());
            }
        }
    }
    exprs.iter().flat_map(|e| metric_names(e)).collect()
}

#[test]
fn promql_names_are_extracted_without_labels_functions_or_numbers() {
    let names = metric_names(
        "max_over_time(gpu_utilization_ratio{instance=~\"$i\"}[30m]) == 0 and on (instance, uuid) sum by (instance, uuid) (gpu_process_memory_used_bytes) > 79e9",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["gpu_process_memory_used_bytes", "gpu_utilization_ratio"]
    );
    assert_eq!(
        metric_names("label_values(gpu_count, instance)")
            .into_iter()
            .collect::<Vec<_>>(),
        ["gpu_count"]
    );
}

/// The metric names in a `/metrics` body.
fn names_in(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

fn scrape(agent: &Agent) -> String {
    http_get(agent.metrics_port, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

#[test]
fn alert_rules_and_dashboards_use_only_metrics_metricsd_emits() {
    let dir = build();
    let sim = dir.join("libnvml_sim.so");
    let scenarios = root().join("tests/nvml-sim/scenarios");
    // Agent A: 8 simulated H100s, the system collector, discovery with no service (its up
    // gauge), and a sink whose server is away with a tiny queue (the drop counter).
    let work_a = Workdir::new();
    let config_a = format!(
        "[agent]\ninterval = \"300ms\"\n[http]\nhealth_listen = \"127.0.0.1:{{health}}\"\nmetrics_listen = \"127.0.0.1:{{metrics}}\"\n[[collectors]]\nname = \"gpu\"\nplugin = \"nvml\"\n[collectors.config]\nlibrary_path = \"{}\"\n[[collectors]]\nname = \"system\"\nplugin = \"system\"\n[[collectors]]\nname = \"discovery\"\nplugin = \"discovery\"\n[collectors.config]\nendpoint = \"127.0.0.1:{}\"\n[[sinks]]\nname = \"prom\"\nplugin = \"prometheus\"\n[[sinks]]\nname = \"away\"\nplugin = \"remote_write\"\nqueue_capacity = 100\n[sinks.config]\nurl = \"http://127.0.0.1:{}/api/v1/write\"\n",
        sim.display(),
        free_port(),
        free_port()
    );
    let h100 = scenarios.join("h100-sxm-8.toml").display().to_string();
    let mut a =
        Agent::start(&work_a, &config_a, &[("NVML_SIM_SCENARIO", h100.as_str())]).expect("agent a");
    a.wait_ready().expect("ready");
    // Agent B: the Xid scenario (events 1 to 2.5 s after start).
    let work_b = Workdir::new();
    let config_b = format!(
        "[agent]\ninterval = \"300ms\"\n[http]\nhealth_listen = \"127.0.0.1:{{health}}\"\nmetrics_listen = \"127.0.0.1:{{metrics}}\"\n[[collectors]]\nname = \"gpu\"\nplugin = \"nvml\"\n[collectors.config]\nlibrary_path = \"{}\"\n[[sinks]]\nname = \"prom\"\nplugin = \"prometheus\"\n",
        sim.display()
    );
    let xid = scenarios.join("xid.toml").display().to_string();
    let mut b =
        Agent::start(&work_b, &config_b, &[("NVML_SIM_SCENARIO", xid.as_str())]).expect("agent b");
    b.wait_ready().expect("ready");
    let body_a = wait_for("agent a's series", Duration::from_secs(30), || {
        let body = scrape(&a);
        (body.contains("metricsd_sink_dropped_samples_total{")
            && body.contains("gpu_discovery_up")
            && body.contains("node_cpu_seconds_total"))
        .then_some(body)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.stderr()));
    let body_b = wait_for("agent b's Xid series", Duration::from_secs(30), || {
        let body = scrape(&b);
        body.contains("gpu_xid_errors_total{").then_some(body)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", b.stderr()));
    let mut emitted = names_in(&body_a);
    emitted.extend(names_in(&body_b));
    // `up` is Prometheus' own series for each scrape target.
    emitted.insert("up".to_string());
    let used = used_names();
    assert!(used.len() > 30, "{used:?}");
    let missing: Vec<&String> = used.iter().filter(|n| !emitted.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "used in deploy/ but not emitted by metricsd: {missing:?}"
    );
}

/// The value of an instruction in the Dockerfile (`EXPOSE`, `USER`, …), all occurrences.
fn dockerfile(instruction: &str) -> Vec<String> {
    let text = std::fs::read_to_string(deploy().join("docker/Dockerfile")).expect("Dockerfile");
    let joined = text.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{instruction} ")))
        .map(|v| v.trim().to_string())
        .collect()
}

/// `metricsd check` of a config file (plugins from the debug build).
fn metricsd_check(config: &Path) {
    let out = Command::new(build().join("metricsd"))
        .arg("-c")
        .arg(config)
        .arg("check")
        .env("METRICSD_PLUGIN_PATH", build())
        .output()
        .expect("metricsd check");
    assert!(
        out.status.success(),
        "{}: {}{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `http.<key>` of a TOML config: its port.
fn listen_port(config: &str, key: &str) -> u16 {
    let value: toml::Value = toml::from_str(config).expect("toml");
    value["http"][key]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("http.{key}"))
}

/// A mapping with its YAML merge key (`<<: *anchor`) applied, as compose applies it.
fn with_merge_keys(map: &Yaml) -> Yaml {
    let Some(own) = map.as_hash() else {
        return map.clone();
    };
    let mut out = map["<<"].as_hash().cloned().unwrap_or_default();
    for (k, v) in own {
        if k.as_str() != Some("<<") {
            out.insert(k.clone(), v.clone());
        }
    }
    Yaml::Hash(out)
}

#[test]
fn the_image_compose_file_and_configs_agree() {
    build();
    // The image: plugins where the loader looks, a non-root user, a health check, the ports
    // of its default config.
    let env = dockerfile("ENV").join(" ");
    assert!(
        env.contains("METRICSD_CONFIG=/etc/metricsd/metricsd.toml"),
        "{env}"
    );
    let user = dockerfile("USER");
    assert!(
        user.iter()
            .all(|u| !u.starts_with('0') && !u.starts_with("root"))
            && !user.is_empty(),
        "{user:?}"
    );
    assert!(dockerfile("HEALTHCHECK")
        .iter()
        .any(|h| h.contains("metricsd\", \"health\"")));
    // The image installs the tree that scripts/release.sh stages (usr/bin, usr/lib/metricsd/
    // plugins), so the release script's plugin list is the image's.
    let run = dockerfile("RUN").join("\n");
    assert!(run.contains("bash scripts/release.sh"), "{run}");
    assert!(run.contains("package-root"), "{run}");
    let release = std::fs::read_to_string(root().join("scripts/release.sh")).expect("release.sh");
    let shipped: Vec<&str> = release
        .lines()
        .find_map(|l| l.strip_prefix("PLUGINS=("))
        .and_then(|l| l.strip_suffix(')'))
        .expect("PLUGINS=(...) in scripts/release.sh")
        .split_whitespace()
        .collect();
    for plugin in [
        "system",
        "nvml",
        "discovery",
        "prometheus",
        "influxdb",
        "remote_write",
        "stdout",
    ] {
        assert!(shipped.contains(&plugin), "{plugin} is not shipped");
    }
    for plugin in &shipped {
        assert!(
            build().join(format!("libmetricsd_{plugin}.so")).exists(),
            "scripts/release.sh ships libmetricsd_{plugin}.so, which the build does not make"
        );
    }
    let exposed: BTreeSet<u16> = dockerfile("EXPOSE")
        .iter()
        .flat_map(|e| {
            e.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u16>>()
        })
        .collect();
    let image_config =
        std::fs::read_to_string(deploy().join("docker/metricsd.toml")).expect("config");
    let ports: BTreeSet<u16> = [
        listen_port(&image_config, "metrics_listen"),
        listen_port(&image_config, "health_listen"),
    ]
    .into();
    assert_eq!(exposed, ports, "EXPOSE and the image's config");
    metricsd_check(&deploy().join("docker/metricsd.toml"));
    metricsd_check(&deploy().join("docker/compose.toml"));
    let volume = dockerfile("VOLUME").join(" ");
    assert!(volume.contains("/var/lib/metricsd"), "{volume}");

    // The compose file: the same image and ports, its config where the image reads it, the
    // spool volume where the image keeps it, GPUs reserved, the stack's services.
    let compose = yaml(&deploy().join("docker/docker-compose.yml"));
    let services = &compose[0]["services"];
    for s in [
        "metricsd",
        "metricsd-sim",
        "discovery",
        "prometheus",
        "alertmanager",
        "grafana",
        "influxdb",
    ] {
        assert!(!services[s].is_badvalue(), "no service {s}");
    }
    let compose_config =
        std::fs::read_to_string(deploy().join("docker/compose.toml")).expect("compose.toml");
    for s in ["metricsd", "metricsd-sim"] {
        let svc = &with_merge_keys(&services[s]);
        assert_eq!(svc["image"].as_str(), Some("metricsd:latest"));
        assert_eq!(
            svc["build"]["dockerfile"].as_str(),
            Some("deploy/docker/Dockerfile")
        );
        // The node's view: host PID and network namespaces (the agent's listeners are the
        // host's ports, nothing to publish), the host's `/` read-only for `rootfs`.
        assert_eq!(svc["pid"].as_str(), Some("host"), "{s}");
        assert_eq!(svc["network_mode"].as_str(), Some("host"), "{s}");
        assert!(
            svc["ports"].is_badvalue(),
            "{s}: ports with host networking"
        );
        let volumes: Vec<&str> = svc["volumes"]
            .as_vec()
            .expect("volumes")
            .iter()
            .filter_map(Yaml::as_str)
            .collect();
        assert!(
            volumes.contains(&"./compose.toml:/etc/metricsd/metricsd.toml:ro"),
            "{volumes:?}"
        );
        assert!(
            volumes.iter().any(|v| v.ends_with(":/var/lib/metricsd")),
            "{volumes:?}"
        );
        assert!(volumes.contains(&"/:/host/root:ro,rslave"), "{volumes:?}");
    }
    assert!(compose_config.contains("rootfs = \"/host/root\""));
    assert_eq!(
        [
            listen_port(&compose_config, "metrics_listen"),
            listen_port(&compose_config, "health_listen")
        ]
        .into_iter()
        .collect::<BTreeSet<u16>>(),
        exposed
    );
    assert!(compose_config.contains("spool_dir = \"/var/lib/metricsd/spool\""));
    let devices = &with_merge_keys(&services["metricsd"])["deploy"]["resources"]["reservations"]
        ["devices"][0];
    assert_eq!(devices["driver"].as_str(), Some("nvidia"));
    let sim_env = &services["metricsd-sim"]["environment"];
    let scenario = sim_env["NVML_SIM_SCENARIO"].as_str().expect("scenario");
    let scenario_file = scenario.rsplit('/').next().expect("file");
    assert!(root()
        .join("tests/nvml-sim/scenarios")
        .join(scenario_file)
        .exists());
    // Every file or directory the compose file mounts exists.
    for (name, svc) in services.as_hash().expect("services") {
        let svc = with_merge_keys(svc);
        for v in svc["volumes"]
            .as_vec()
            .into_iter()
            .flatten()
            .filter_map(Yaml::as_str)
        {
            let source = v.split(':').next().expect("source");
            if source.starts_with('.') {
                let path = deploy().join("docker").join(source);
                assert!(path.exists(), "{name:?}: {} missing", path.display());
            }
        }
    }
}

#[test]
fn the_kubernetes_manifests_parse_and_see_the_node_with_least_privilege_on_gpu_nodes() {
    build();
    let docs = yaml(&deploy().join("kubernetes/metricsd.yaml"));
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "DaemonSet",
        "Service",
        "ServiceMonitor",
    ] {
        assert!(kinds.contains(&kind), "no {kind}: {kinds:?}");
    }
    let by_kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(k))
            .expect(k)
    };
    let ds = by_kind("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["nodeSelector"]["nvidia.com/gpu.present"].as_str(),
        Some("true")
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    // The node's view, as node_exporter's chart has it: host PID and network namespaces and
    // the node's `/` read-only at /host/root, which the config reads as `rootfs`.
    assert_eq!(pod["hostPID"].as_bool(), Some(true));
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(pod["dnsPolicy"].as_str(), Some("ClusterFirstWithHostNet"));
    let root_volume = pod["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .find(|v| v["hostPath"]["path"].as_str() == Some("/"))
        .expect("the node's / as a hostPath volume");
    let root_mount = pod["containers"][0]["volumeMounts"]
        .as_vec()
        .expect("mounts")
        .iter()
        .find(|m| m["name"] == root_volume["name"])
        .expect("the root volume is mounted");
    assert_eq!(root_mount["mountPath"].as_str(), Some("/host/root"));
    assert_eq!(root_mount["readOnly"].as_bool(), Some(true));
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert!(c["resources"]["limits"]["memory"].as_str().is_some());
    assert!(c["resources"]["limits"]["cpu"].as_str().is_some());
    // The ConfigMap's config is valid, listens where the container ports and probes say, and
    // keeps its spool on the writable volume.
    let config_text = by_kind("ConfigMap")["data"]["metricsd.toml"]
        .as_str()
        .expect("config");
    let work = Workdir::new();
    metricsd_check(&work.write("k8s.toml", config_text));
    let ports: Vec<i64> = c["ports"]
        .as_vec()
        .expect("ports")
        .iter()
        .filter_map(|p| p["containerPort"].as_i64())
        .collect();
    assert_eq!(
        ports,
        [
            i64::from(listen_port(config_text, "metrics_listen")),
            i64::from(listen_port(config_text, "health_listen"))
        ]
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/health")
    );
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_vec()
        .expect("mounts")
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert!(mounts.contains(&"/etc/metricsd") && mounts.contains(&"/var/lib/metricsd"));
    assert!(config_text.contains("spool_dir = \"/var/lib/metricsd/spool\""));
    assert!(config_text.contains("rootfs = \"/host/root\""));
    // The ServiceMonitor scrapes the Service's metrics port.
    let sm = by_kind("ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"].as_str(), Some("metrics"));
    let svc_ports: Vec<&str> = by_kind("Service")["spec"]["ports"]
        .as_vec()
        .expect("ports")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(svc_ports.contains(&"metrics"));
    // Grafana provisioning parses and points at the dashboards' directory.
    for f in [
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/metricsd.yml",
        "alertmanager/alertmanager.yml",
    ] {
        assert!(!yaml(&deploy().join(f)).is_empty(), "{f}");
    }
}

#[test]
fn the_health_subcommand_of_the_image_health_check_follows_the_agent() {
    build();
    let work = Workdir::new();
    let config = "[http]\nhealth_listen = \"0.0.0.0:{health}\"\nmetrics_listen = \"\"\n[[collectors]]\nname = \"tk\"\nplugin = \"testkit\"\n[[sinks]]\nname = \"out\"\nplugin = \"stdout\"\n";
    let mut agent = Agent::start(&work, config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    let config_path = work.path("metricsd.toml");
    let check = || {
        Command::new(build().join("metricsd"))
            .arg("-c")
            .arg(&config_path)
            .arg("health")
            .output()
            .expect("metricsd health")
    };
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"status\""));
    assert!(agent.terminate().expect("stop").success());
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the health listener"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
