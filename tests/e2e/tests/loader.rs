//! The plugin loader against real `.so` files: good ones, broken ones, incompatible ones,
//! files and directories other users can write, and the SHA-256 allow-list.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use metricsd_e2e::{fixture, json_lines, plugin, wait_for, Agent, Workdir};
use std::time::Duration;

fn plugins_json(
    work: &Workdir,
    env: &[(&str, &str)],
    config: Option<&str>,
) -> Vec<serde_json::Value> {
    let mut args = Vec::new();
    let config_path;
    if let Some(text) = config {
        config_path = work.write("plugins.toml", text);
        args.push("-c");
        args.push(config_path.to_str().expect("utf-8 path"));
    }
    args.extend(["plugins", "--json"]);
    let out = work.metricsd(&args, env);
    assert!(
        out.status.success(),
        "metricsd plugins failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).expect("JSON list")
}

fn row<'a>(rows: &'a [serde_json::Value], file: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["path"].as_str().is_some_and(|p| p.ends_with(file)))
        .unwrap_or_else(|| panic!("no row for {file} in {rows:#?}"))
}

/// A plugin directory that only its owner can write.
fn plugin_dir(work: &Workdir) -> std::path::PathBuf {
    let dir = work.path("plugins");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

#[test]
fn two_plugin_files_load_as_two_different_plugins() {
    let work = Workdir::new();
    let rows = plugins_json(&work, &[], None);
    let hello = row(&rows, "libmetricsd_hello.so");
    let testkit = row(&rows, "libmetricsd_testkit.so");
    assert_eq!(hello["verdict"], "loaded");
    assert_eq!(testkit["verdict"], "loaded");
    assert_eq!(hello["name"], "hello");
    assert_eq!(testkit["name"], "testkit");
    assert_eq!(row(&rows, "libmetricsd_stdout.so")["kind"], "sink");

    // And each one's code runs: their metrics differ.
    let config = work.write(
        "once.toml",
        "[[collectors]]\nname = \"a\"\nplugin = \"hello\"\n[[collectors]]\nname = \"b\"\nplugin = \"testkit\"\n",
    );
    let out = work.metricsd(
        &[
            "-c",
            config.to_str().expect("path"),
            "once",
            "--format",
            "json",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<String> = json_lines(&String::from_utf8_lossy(&out.stdout))
        .iter()
        .filter_map(|r| r["name"].as_str().map(String::from))
        .collect();
    assert!(
        names.iter().any(|n| n == "hello_collections_total"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n == "testkit_calls_total"),
        "{names:?}"
    );
    assert!(names
        .iter()
        .all(|n| n.starts_with("hello_") || n.starts_with("testkit_")));
}

#[test]
fn bad_files_are_refused_with_one_line_each_and_the_host_runs_on() {
    let work = Workdir::new();
    let dir = plugin_dir(&work);
    fs::write(dir.join("empty.so"), b"").expect("write");
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(dir.join("random.so"), noise).expect("write");
    fs::copy(fixture("no-root-module"), dir.join("not-a-plugin.so")).expect("copy");
    fs::copy(fixture("api-v2"), dir.join("api-v2.so")).expect("copy");
    fs::copy(fixture("changed-layout"), dir.join("changed-layout.so")).expect("copy");
    fs::write(dir.join("README.txt"), "not a .so: ignored").expect("write");
    let dir_text = dir.to_str().expect("utf-8");
    let env = [("METRICSD_PLUGIN_PATH", dir_text)];

    let rows = plugins_json(&work, &env, None);
    let expect = [
        ("empty.so", "cannot be opened as a shared library"),
        ("random.so", "cannot be opened as a shared library"),
        ("not-a-plugin.so", "not a metricsd plugin"),
        (
            "api-v2.so",
            "built for plugin API 2.0.0, this host has 1.0.0",
        ),
        ("changed-layout.so", "plugin interface layout differs"),
    ];
    for (file, message) in expect {
        let r = row(&rows, file);
        assert_eq!(r["verdict"], "refused", "{r}");
        let reason = r["reason"].as_str().expect("reason");
        assert!(reason.contains(message), "{file}: {reason}");
        assert!(
            reason.contains(file),
            "the message names the file: {reason}"
        );
        assert!(!reason.contains('\n'), "one line: {reason}");
    }
    assert!(!rows.iter().any(|r| r["path"]
        .as_str()
        .is_some_and(|p| p.ends_with("README.txt"))));
    assert_eq!(row(&rows, "libmetricsd_hello.so")["verdict"], "loaded");

    // The agent runs with the good plugins and reports the refusals. A plugin the config names
    // is found nowhere, so every file is opened (not only the one named for each plugin).
    let mut agent = Agent::start(
        &work,
        "[agent]\ninterval = \"200ms\"\n[http]\nhealth_listen = \"127.0.0.1:{health}\"\nmetrics_listen = \"\"\n[[collectors]]\nname = \"hi\"\nplugin = \"hello\"\n[[collectors]]\nname = \"gone\"\nplugin = \"gone\"\n",
        &env,
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    agent
        .wait_stat(
            "metricsd_collector_collections_total{collector=\"hi\"}",
            1.0,
            Duration::from_secs(10),
        )
        .expect("hello collects");
    let (status, body) = agent.get_health("/plugins").expect("/plugins");
    assert_eq!(status, 200);
    assert!(body.contains("built for plugin API 2.0.0"), "{body}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).expect("json");
    let refused = |under: &str| {
        rows.iter()
            .filter(|r| r["verdict"] == "refused")
            .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with(under)))
            .count()
    };
    assert_eq!(refused(dir_text), 5, "{body}");
    // The gauge counts every refused file, including non-plugin libraries next to the binary
    // (the NVML simulator in target/debug).
    assert_eq!(
        agent.stat("metricsd_plugin_files{verdict=\"refused\"}"),
        Some(refused("/") as f64)
    );
    assert!(
        agent.stderr().contains("not a metricsd plugin"),
        "refusals are logged"
    );
    assert!(agent.is_running());
}

/// The libraries a running process has mapped whose file name contains `name`.
fn mapped(pid: u32, name: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("maps")
        .lines()
        .any(|l| l.contains(name))
}

#[test]
fn only_the_plugins_the_config_names_are_opened_and_a_reload_opens_more() {
    let work = Workdir::new();
    let dir = plugin_dir(&work);
    fs::copy(fixture("no-root-module"), dir.join("libmetricsd_broken.so")).expect("copy");
    let dir_text = dir.to_str().expect("utf-8");
    let env = [("METRICSD_PLUGIN_PATH", dir_text)];
    let base = "[agent]\ninterval = \"200ms\"\n[http]\nhealth_listen = \"127.0.0.1:{health}\"\nmetrics_listen = \"\"\n[[collectors]]\nname = \"hi\"\nplugin = \"hello\"\n";
    let mut agent = Agent::start(&work, base, &env).expect("start");
    agent.wait_ready().expect("ready");
    let collected = |agent: &Agent, instance: &str| {
        agent
            .stat(&format!(
                "metricsd_collector_collections_total{{collector=\"{instance}\"}}"
            ))
            .filter(|v| *v >= 1.0)
    };
    wait_for("a collection", Duration::from_secs(10), || {
        collected(&agent, "hi")
    })
    .expect("hello collects");

    let (_, body) = agent.get_health("/plugins").expect("/plugins");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).expect("json");
    assert_eq!(row(&rows, "libmetricsd_hello.so")["verdict"], "loaded");
    for unused in [
        "libmetricsd_testkit.so",
        "libmetricsd_stdout.so",
        "libmetricsd_broken.so",
    ] {
        let r = row(&rows, unused);
        assert_eq!(r["verdict"], "unused", "{r}");
        assert!(
            r["reason"]
                .as_str()
                .is_some_and(|t| t.contains("not opened")),
            "{r}"
        );
    }
    let pid = agent.pid();
    assert!(mapped(pid, "libmetricsd_hello.so"));
    assert!(!mapped(pid, "libmetricsd_testkit.so"), "testkit was opened");
    assert!(
        !mapped(pid, "libmetricsd_broken.so"),
        "an unused file was opened"
    );
    assert!(
        !agent.stderr().contains("plugin refused"),
        "{}",
        agent.stderr()
    );
    assert!(agent
        .stat("metricsd_plugin_files{verdict=\"unused\"}")
        .is_some_and(|n| n >= 3.0));

    // A reload that names another plugin opens its file.
    let config_path = work.path("metricsd.toml");
    let running = fs::read_to_string(&config_path).expect("config");
    fs::write(
        &config_path,
        format!("{running}[[collectors]]\nname = \"tk\"\nplugin = \"testkit\"\n"),
    )
    .expect("write");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    wait_for(
        "the reloaded testkit collector",
        Duration::from_secs(15),
        || collected(&agent, "tk"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert!(mapped(pid, "libmetricsd_testkit.so"));
    assert!(!mapped(pid, "libmetricsd_broken.so"));
}

#[test]
fn files_and_directories_others_can_write_are_refused() {
    let work = Workdir::new();
    let dir = plugin_dir(&work);
    let copy = dir.join("hello-copy.so");
    fs::copy(plugin("hello"), &copy).expect("copy");
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o666)).expect("chmod");
    let env = [("METRICSD_PLUGIN_PATH", dir.to_str().expect("utf-8"))];
    let rows = plugins_json(&work, &env, None);
    let r = row(&rows, "hello-copy.so");
    assert_eq!(r["verdict"], "refused");
    assert!(
        r["reason"]
            .as_str()
            .expect("reason")
            .contains("writable by every user"),
        "{r}"
    );

    let open_dir = work.path("open");
    fs::create_dir_all(&open_dir).expect("mkdir");
    fs::copy(plugin("hello"), open_dir.join("hello-open.so")).expect("copy");
    fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o777)).expect("chmod");
    let env = [("METRICSD_PLUGIN_PATH", open_dir.to_str().expect("utf-8"))];
    let rows = plugins_json(&work, &env, None);
    assert!(
        !rows.iter().any(|r| r["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("hello-open.so"))),
        "nothing is loaded from a world-writable directory"
    );
    let out = work.metricsd(&["plugins"], &env);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("REFUSED DIR") && text.contains("writable by every user"),
        "{text}"
    );
}

#[test]
fn sha256_allow_list_pins_the_files_that_may_load() {
    let work = Workdir::new();
    let rows = plugins_json(&work, &[], None);
    let hello_digest = row(&rows, "libmetricsd_hello.so")["sha256"]
        .as_str()
        .expect("digest")
        .to_string();
    assert_eq!(hello_digest.len(), 64);
    let config = format!("[agent]\nplugin_sha256 = [\"{hello_digest}\"]\n");
    let rows = plugins_json(&work, &[], Some(&config));
    assert_eq!(row(&rows, "libmetricsd_hello.so")["verdict"], "loaded");
    let testkit = row(&rows, "libmetricsd_testkit.so");
    assert_eq!(testkit["verdict"], "refused");
    assert!(testkit["reason"]
        .as_str()
        .expect("reason")
        .contains("not in agent.plugin_sha256"));
}

#[test]
fn a_required_plugin_that_cannot_load_stops_start_up_with_exit_code_2() {
    let work = Workdir::new();
    let dir = plugin_dir(&work);
    fs::copy(fixture("api-v2"), dir.join("future.so")).expect("copy");
    let config = work.write(
        "c.toml",
        "[http]\nhealth_listen = \"\"\nmetrics_listen = \"\"\n[[collectors]]\nname = \"gpu\"\nplugin = \"future\"\nrequired = true\n",
    );
    let out = work.metricsd(
        &["-c", config.to_str().expect("path"), "run"],
        &[("METRICSD_PLUGIN_PATH", dir.to_str().expect("utf-8"))],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("required collector `gpu`"), "{err}");
    assert!(err.contains("no plugin named `future`"), "{err}");
    // The refused file that would have provided it is named, with why.
    assert!(
        err.contains(&format!(
            "{} was refused: ",
            dir.join("future.so").display()
        )) && err.contains("built for plugin API 2.0.0"),
        "points at the refused file: {err}"
    );

    // Not required: the same problem is reported and the agent runs.
    let text = fs::read_to_string(&config)
        .expect("read")
        .replace("required = true", "required = false");
    let mut agent = Agent::start(
        &work,
        &text.replace(
            "health_listen = \"\"",
            "health_listen = \"127.0.0.1:{health}\"",
        ),
        &[("METRICSD_PLUGIN_PATH", dir.to_str().expect("utf-8"))],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    let (status, body) = agent.get_health("/health").expect("health");
    assert_eq!(
        status, 200,
        "a non-required instance does not fail the agent: {body}"
    );
    let health: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["instances"]["gpu"]["state"], "disabled");
}

#[test]
fn a_plugin_file_overwritten_while_the_agent_runs_does_no_harm() {
    let work = Workdir::new();
    let dir = plugin_dir(&work);
    let file = dir.join("libmetricsd_testkit.so");
    fs::copy(plugin("testkit"), &file).expect("copy");
    let config = format!(
        "[agent]\ninterval = \"100ms\"\nplugin_path = [\"{}\"]\ninternal_metrics = false\n[http]\nhealth_listen = \"127.0.0.1:{{health}}\"\nmetrics_listen = \"\"\n[[collectors]]\nname = \"tk\"\nplugin = \"testkit\"\n[[sinks]]\nname = \"out\"\nplugin = \"stdout\"\n",
        dir.display()
    );
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    let series = "metricsd_collector_collections_total{collector=\"tk\"}";
    let before = agent
        .wait_stat(series, 3.0, Duration::from_secs(10))
        .expect("collections");
    // What `cp other.so plugin.so` does: the same file (inode) truncated and rewritten. The
    // agent runs an in-memory copy of what it checked, so its code is untouched.
    fs::copy(plugin("hello"), &file).expect("overwrite");
    fs::write(&file, b"not a library any more").expect("overwrite again");
    agent
        .wait_stat(series, before + 10.0, Duration::from_secs(10))
        .expect("collections go on");
    assert!(agent.is_running(), "{}", agent.stderr());
    assert!(mapped(agent.pid(), "/memfd:libmetricsd_testkit.so"));
}

#[test]
fn group_writable_files_other_owners_and_links_into_open_directories_are_refused() {
    let work = Workdir::new();
    let dir = plugin_dir(&work);
    let group = dir.join("hello-group.so");
    fs::copy(plugin("hello"), &group).expect("copy");
    fs::set_permissions(&group, fs::Permissions::from_mode(0o664)).expect("chmod");
    let other = dir.join("hello-other.so");
    fs::copy(plugin("hello"), &other).expect("copy");
    std::os::unix::fs::chown(&other, Some(65534), None).expect("chown (the tests run as root)");
    // A link in a safe directory to a file in a directory every user can write.
    let open = work.path("open");
    fs::create_dir_all(&open).expect("mkdir");
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
    fs::copy(plugin("hello"), open.join("hello.so")).expect("copy");
    std::os::unix::fs::symlink(open.join("hello.so"), dir.join("hello-link.so")).expect("link");
    let env = [("METRICSD_PLUGIN_PATH", dir.to_str().expect("utf-8"))];
    let rows = plugins_json(&work, &env, None);
    for (file, why) in [
        ("hello-group.so", "writable by its group"),
        ("hello-other.so", "is owned by user 65534"),
        ("hello-link.so", "writable by every user"),
    ] {
        let r = row(&rows, file);
        assert_eq!(r["verdict"], "refused", "{r}");
        assert!(r["reason"].as_str().expect("reason").contains(why), "{r}");
    }
    assert!(row(&rows, "hello-link.so")["reason"]
        .as_str()
        .expect("reason")
        .contains("resolves to"));
}

#[test]
fn a_link_swapped_during_the_checks_never_loads_an_unlisted_file() {
    let work = Workdir::new();
    let dir = plugin_dir(&work);
    let targets = work.path("targets");
    fs::create_dir_all(&targets).expect("mkdir");
    fs::copy(plugin("hello"), targets.join("good.so")).expect("copy");
    fs::copy(plugin("testkit"), targets.join("bad.so")).expect("copy");
    let rows = plugins_json(&work, &[], None);
    let good = row(&rows, "libmetricsd_hello.so")["sha256"]
        .as_str()
        .expect("digest")
        .to_string();
    let link = dir.join("p.so");
    std::os::unix::fs::symlink(targets.join("good.so"), &link).expect("link");
    // Another process swaps the link between the listed file and an unlisted one, as fast as
    // it can, while the agent checks and loads.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, dir, targets) = (stop.clone(), dir.clone(), targets.clone());
        std::thread::spawn(move || {
            let tmp = dir.join(".p.so.tmp");
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let target = if swaps.is_multiple_of(2) {
                    "bad.so"
                } else {
                    "good.so"
                };
                let _ = fs::remove_file(&tmp);
                if std::os::unix::fs::symlink(targets.join(target), &tmp).is_ok()
                    && fs::rename(&tmp, dir.join("p.so")).is_ok()
                {
                    swaps += 1;
                }
            }
            swaps
        })
    };
    let config = format!("[agent]\nplugin_sha256 = [\"{good}\"]\n");
    let env = [("METRICSD_PLUGIN_PATH", dir.to_str().expect("utf-8"))];
    let mut verdicts = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..40 {
        let rows = plugins_json(&work, &env, Some(&config));
        let r = row(&rows, "p.so");
        let verdict = format!("{} {}", r["verdict"], r["name"]);
        assert!(
            !(r["verdict"] == "loaded" && r["name"] == "testkit"),
            "an unlisted file was loaded: {r}"
        );
        *verdicts.entry(verdict).or_default() += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().expect("swapper");
    assert!(swaps > 100, "the link was swapped {swaps} times");
    // Both sides of the race were seen: the listed file loaded, the other refused.
    assert_eq!(verdicts.len(), 2, "{verdicts:?}");
}

/// The distinct in-memory copies of `name` mapped by process `pid`.
fn memory_copies(pid: u32, name: &str) -> std::collections::BTreeSet<String> {
    fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("maps")
        .lines()
        .filter(|l| l.contains(&format!("/memfd:{name}")))
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .collect()
}

#[test]
fn a_changed_plugin_file_is_loaded_anew_at_a_reload() {
    let work = Workdir::new();
    let dir = plugin_dir(&work);
    let file = dir.join("libmetricsd_testkit.so");
    fs::copy(plugin("testkit"), &file).expect("copy");
    let config = format!(
        "[agent]\ninterval = \"100ms\"\nplugin_path = [\"{}\"]\ninternal_metrics = false\n[http]\nhealth_listen = \"127.0.0.1:{{health}}\"\nmetrics_listen = \"\"\n[[collectors]]\nname = \"tk\"\nplugin = \"testkit\"\n",
        dir.display()
    );
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    let series = "metricsd_collector_collections_total{collector=\"tk\"}";
    agent
        .wait_stat(series, 3.0, Duration::from_secs(10))
        .expect("collections");
    let pid = agent.pid();
    let first = memory_copies(pid, "libmetricsd_testkit.so");
    assert_eq!(first.len(), 1, "{first:?}");
    let digest = |agent: &Agent| -> String {
        let (_, body) = agent.get_health("/plugins").expect("/plugins");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&body).expect("json");
        row(&rows, "libmetricsd_testkit.so")["sha256"]
            .as_str()
            .expect("digest")
            .to_string()
    };
    let old = digest(&agent);
    // A new build installed the way package managers do: written aside, renamed over.
    let mut bytes = fs::read(plugin("testkit")).expect("read");
    bytes.extend_from_slice(b"\0a new build");
    let aside = dir.join(".libmetricsd_testkit.so.new");
    fs::write(&aside, &bytes).expect("write");
    fs::rename(&aside, &file).expect("install");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    let new = wait_for("the new file's digest", Duration::from_secs(15), || {
        let d = digest(&agent);
        (d != old).then_some(d)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(new.len(), 64);
    // The new copy is mapped beside the old one (which stays: libraries are never unloaded),
    // and the collector, re-created on it, collects.
    let copies = memory_copies(pid, "libmetricsd_testkit.so");
    assert_eq!(copies.len(), 2, "{copies:?}");
    assert!(copies.is_superset(&first));
    let after = agent.stat(series).unwrap_or(0.0);
    agent
        .wait_stat(series, after + 5.0, Duration::from_secs(10))
        .expect("collections after the upgrade");
}

#[test]
fn an_upgraded_plugin_runs_its_new_version_after_sighup() {
    let v1 = metricsd_e2e::fixture_lib("upgrade", "fixture_upgrade_v1");
    let v2 = metricsd_e2e::fixture_lib("upgrade", "fixture_upgrade_v2");
    let work = Workdir::new();
    let dir = plugin_dir(&work);
    let file = dir.join("libmetricsd_upgrade.so");
    fs::copy(&v1, &file).expect("install 1.0.0");
    let config = format!(
        "[agent]\ninterval = \"100ms\"\nplugin_path = [\"{}\"]\n[http]\nhealth_listen = \"127.0.0.1:{{health}}\"\nmetrics_listen = \"127.0.0.1:{{metrics}}\"\n[[collectors]]\nname = \"up\"\nplugin = \"upgrade\"\n[[sinks]]\nname = \"prom\"\nplugin = \"prometheus\"\n",
        dir.display()
    );
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    let running = |agent: &Agent| -> (String, String) {
        let (_, body) = agent.get_health("/plugins").expect("/plugins");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&body).expect("json");
        let r = row(&rows, "libmetricsd_upgrade.so");
        (
            r["version"].as_str().unwrap_or_default().to_string(),
            r["description"].as_str().unwrap_or_default().to_string(),
        )
    };
    let serves = |agent: &Agent, version: &str| -> bool {
        metricsd_e2e::http_get(agent.metrics_port, "/metrics")
            .map(|(_, body)| body.contains(&format!("upgrade_build_info{{version=\"{version}\"")))
            .unwrap_or(false)
    };
    wait_for("1.0.0 served", Duration::from_secs(15), || {
        serves(&agent, "1.0.0").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(
        running(&agent),
        (
            "1.0.0".to_string(),
            "Says which build runs (1.0.0)".to_string()
        )
    );

    // The upgrade as a package manager does it: the new file written aside, renamed over.
    let aside = dir.join(".libmetricsd_upgrade.so.new");
    fs::copy(&v2, &aside).expect("write 2.0.0");
    fs::rename(&aside, &file).expect("install 2.0.0");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    // The new code runs: its samples say 2.0.0 and those of 1.0.0 are gone from /metrics.
    wait_for("only 2.0.0 served", Duration::from_secs(20), || {
        (serves(&agent, "2.0.0") && !serves(&agent, "1.0.0")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(
        running(&agent),
        (
            "2.0.0".to_string(),
            "Says which build runs (2.0.0)".to_string()
        )
    );
    // And `metricsd plugins` names the version and what it is.
    let out = work.metricsd(
        &["plugins"],
        &[("METRICSD_PLUGIN_PATH", dir.to_str().expect("dir"))],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("loaded") && l.contains("upgrade") && l.contains("v2.0.0"))
            && text.contains("Says which build runs (2.0.0)"),
        "{text}"
    );
    agent.terminate().expect("stop");
}

#[test]
fn a_plugin_built_to_abort_on_panic_does_not_compile() {
    // The example collector, compiled (this crate only) with `-C panic=abort`.
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(metricsd_e2e::root())
        .args([
            "rustc",
            "-p",
            "metricsd-hello-collector",
            "--lib",
            "--",
            "-C",
            "panic=abort",
        ])
        .output()
        .expect("cargo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it compiled: {stderr}");
    assert!(
        stderr.contains("metricsd plugins must be built with panic = \"unwind\""),
        "{stderr}"
    );
}
