//! Hostile and careless input against the listeners, the reload and the web config: floods of
//! half-sent requests and of scrapes, reloads that cannot bind or load, bad TLS material,
//! certificate rotation, login timing, HTTP details and `metricsd health` behind TLS and basic
//! auth.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metricsd_e2e::{http_get, rss_kib, series_value, wait_for, Agent, Workdir};

/// The two floods use most of a 2-core machine: one at a time.
static FLOOD: Mutex<()> = Mutex::new(());

fn flood_lock() -> std::sync::MutexGuard<'static, ()> {
    FLOOD.lock().unwrap_or_else(|p| p.into_inner())
}

fn config(interval: &str, extra_http: &str) -> String {
    format!(
        r#"
[agent]
interval = "{interval}"
[http]
health_listen = "127.0.0.1:{{health}}"
metrics_listen = "127.0.0.1:{{metrics}}"
{extra_http}
[[collectors]]
name = "system"
plugin = "system"
[[sinks]]
name = "prom"
plugin = "prometheus"
"#
    )
}

/// The soft limit on open files of this process raised to its hard limit (the floods open
/// thousands of sockets); returns the hard limit.
fn raise_own_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    hard
}

/// `Max open files` of a process: (soft, hard).
fn fd_limits(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let mut n = line.split_whitespace().filter_map(|w| {
        w.parse::<u64>()
            .ok()
            .or((w == "unlimited").then_some(u64::MAX))
    });
    (n.next().expect("soft"), n.next().expect("hard"))
}

/// A GET that must be answered within `deadline` (a functional deadline: the answer takes
/// milliseconds when the listener works, and never comes when it is locked out).
fn get_within(port: u16, path: &str, deadline: Duration) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), deadline)
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(deadline)).ok();
    s.set_write_timeout(Some(deadline)).ok();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let answer = String::from_utf8_lossy(&answer).to_string();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not HTTP: {answer:?}"))?;
    Ok((status, answer))
}

/// Sends `request` as it is and returns the whole answer (the server closes: HTTP/1.0 or
/// `Connection: close`).
fn raw(port: u16, request: &[u8]) -> String {
    try_raw(port, request).expect("connect")
}

/// [`raw`], with the connection's error returned (the listener may not be up yet).
fn try_raw(port: u16, request: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request)?;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    Ok(String::from_utf8_lossy(&answer).to_string())
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

#[test]
fn half_sent_requests_neither_lock_out_scrapes_nor_exhaust_descriptors() {
    let _flood = flood_lock();
    let hard = raise_own_fd_limit();
    assert!(
        hard >= 8192,
        "this test starts the agent at the usual soft limit of 1,024 open files with a hard limit \
         above the 3,000 connections it opens; the hard limit here is {hard}"
    );
    let work = Workdir::new();
    let mut agent = Agent::start_wrapped(
        &work,
        &config("1s", ""),
        &[],
        &[
            "prlimit".to_string(),
            format!("--nofile=1024:{hard}"),
            "--".to_string(),
        ],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    let pid = agent.pid();
    let (soft, agent_hard) = fd_limits(pid);
    assert_eq!(
        soft, agent_hard,
        "the agent raises its soft open-file limit to the hard one"
    );
    wait_for(
        "a first scrape with samples",
        Duration::from_secs(20),
        || {
            let (_, body) = http_get(agent.metrics_port, "/metrics").ok()?;
            body.contains("node_memory_MemTotal_bytes").then_some(())
        },
    )
    .expect("samples");
    let collections = "metricsd_collector_collections_total{collector=\"system\"}";
    let before = agent.stat(collections).expect("collections");
    let rss_before = rss_kib(pid);

    // 1,500 half requests on each listener: the request line and one header, then nothing.
    let mut held = Vec::new();
    for port in [agent.metrics_port, agent.health_port] {
        for _ in 0..1500 {
            let Ok(mut s) =
                TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))
            else {
                continue;
            };
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
            held.push(s);
        }
    }
    assert!(held.len() >= 2000, "opened {} connections", held.len());
    // Within the 10 s header deadline: each listener holds its cap of 512, the older ones were
    // closed to admit newer ones.
    let (_, stats) = get_within(agent.health_port, "/metrics/stats", Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("/metrics/stats during the flood: {e}\n{}", agent.stderr()));
    let open = series_value(&stats, "metricsd_http_connections{listener=\"metrics\"}")
        .expect("connection gauge");
    assert_eq!(open, 512.0, "connections open at the cap of 512");

    // Scrapes and health checks answer at once, three times over.
    for _ in 0..3 {
        let (status, body) = get_within(agent.metrics_port, "/metrics", Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("/metrics during the flood: {e}\n{}", agent.stderr()));
        assert_eq!(status, 200, "{body}");
        for name in ["node_memory_MemTotal_bytes", "node_cpu_seconds_total"] {
            assert!(body.contains(name), "{name} missing during the flood");
        }
        let (status, _) = get_within(agent.health_port, "/health", Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("/health during the flood: {e}\n{}", agent.stderr()));
        assert_eq!(status, 200);
    }
    // Collections keep their 1 s cadence.
    agent
        .wait_stat(collections, before + 3.0, Duration::from_secs(8))
        .expect("collections go on during the flood");
    let stats = agent.stats().expect("stats");
    let evicted = series_value(
        &stats,
        "metricsd_http_connections_closed_total{listener=\"metrics\",reason=\"evicted\"}",
    )
    .unwrap_or(0.0);
    assert!(
        evicted > 0.0,
        "the oldest idle connections were closed:\n{stats}"
    );
    let rss = rss_kib(pid);
    eprintln!(
        "half-sent flood: {} connections held, RSS {rss_before} KiB before, {rss} KiB during, {open} connections open, {evicted} evicted",
        held.len()
    );
    assert!(
        rss < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss} KiB during the flood"
    );
    // The half requests left open are closed at the header deadline.
    agent
        .wait_stat(
            "metricsd_http_connections_closed_total{listener=\"health\",reason=\"header_timeout\"}",
            1.0,
            Duration::from_secs(20),
        )
        .expect("header timeouts");
    let logs = agent.stderr();
    assert!(!logs.contains("Too many open files"), "{logs}");
    drop(held);
    let status = agent.terminate().expect("terminate");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn kept_alive_connections_are_closed_after_the_idle_timeout() {
    let work = Workdir::new();
    let mut agent =
        Agent::start(&work, &config("1s", "idle_timeout = \"1s\""), &[]).expect("start");
    agent.wait_ready().expect("ready");
    let mut s = TcpStream::connect(("127.0.0.1", agent.health_port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut buf = [0u8; 65536];
    let n = s.read(&mut buf).expect("answer");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive, then closed by the agent once idle for 1 s: the read ends with EOF.
    let started = Instant::now();
    let mut rest = Vec::new();
    let eof = s.read_to_end(&mut rest);
    assert!(eof.is_ok(), "closed by the agent, not timed out: {eof:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed after {:?}",
        started.elapsed()
    );
    agent
        .wait_stat(
            "metricsd_http_connections_closed_total{listener=\"health\",reason=\"idle_timeout\"}",
            1.0,
            Duration::from_secs(5),
        )
        .expect("counted");
}

/// 2,048 connections scraping `/metrics` as fast as they can, like `wrk -c2048`.
fn scrape_flood(port: u16, connections: usize, length: Duration) -> (u64, u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let end = tokio::time::Instant::now() + length;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..connections {
            tasks.spawn(async move {
                let (mut ok, mut busy) = (0u64, 0u64);
                let mut buf = vec![0u8; 256 * 1024];
                'connect: while tokio::time::Instant::now() < end {
                    let Ok(Ok(mut s)) = tokio::time::timeout_at(
                        end,
                        tokio::net::TcpStream::connect(("127.0.0.1", port)),
                    )
                    .await
                    else {
                        continue;
                    };
                    while tokio::time::Instant::now() < end {
                        if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                            .await
                            .is_err()
                        {
                            continue 'connect;
                        }
                        // Read one answer: its head, then Content-Length bytes.
                        let mut have = 0;
                        let (head_end, length, status) = loop {
                            let read = tokio::time::timeout_at(end, s.read(&mut buf[have..])).await;
                            match read {
                                Ok(Ok(n)) if n > 0 => have += n,
                                _ => continue 'connect,
                            }
                            let text = &buf[..have];
                            if let Some(i) = text.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = String::from_utf8_lossy(&text[..i]).to_lowercase();
                                let length = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length:"))
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                                    .unwrap_or(0);
                                let status = head.get(9..12).unwrap_or("").to_string();
                                break (i + 4, length, status);
                            }
                            if have == buf.len() {
                                continue 'connect;
                            }
                        };
                        let mut left = (head_end + length).saturating_sub(have);
                        while left > 0 {
                            let chunk = left.min(buf.len());
                            match tokio::time::timeout_at(end, s.read(&mut buf[..chunk])).await {
                                Ok(Ok(n)) if n > 0 => left -= n,
                                _ => continue 'connect,
                            }
                        }
                        match status.as_str() {
                            "200" => ok += 1,
                            "503" => busy += 1,
                            _ => {}
                        }
                    }
                }
                (ok, busy)
            });
        }
        let (mut ok, mut busy) = (0, 0);
        while let Some(r) = tasks.join_next().await {
            if let Ok((o, b)) = r {
                ok += o;
                busy += b;
            }
        }
        (ok, busy)
    })
}

#[test]
fn a_scrape_flood_shares_one_body_and_memory_comes_back() {
    let _flood = flood_lock();
    raise_own_fd_limit();
    let work = Workdir::new();
    let mut agent = Agent::start(&work, &config("1s", ""), &[]).expect("start");
    agent.wait_ready().expect("ready");
    let pid = agent.pid();
    wait_for(
        "a first scrape with samples",
        Duration::from_secs(20),
        || {
            let (_, body) = http_get(agent.metrics_port, "/metrics").ok()?;
            body.contains("node_memory_MemTotal_bytes").then_some(())
        },
    )
    .expect("samples");
    let baseline = rss_kib(pid);
    let peak = Arc::new(Mutex::new(baseline));
    let health_failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (peak, failures, done) = (
            Arc::clone(&peak),
            Arc::clone(&health_failures),
            Arc::clone(&done),
        );
        let port = agent.health_port;
        std::thread::spawn(move || {
            let mut checks = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let rss = rss_kib(pid);
                let mut p = peak.lock().expect("peak");
                *p = (*p).max(rss);
                drop(p);
                match get_within(port, "/health", Duration::from_secs(2)) {
                    Ok((200, _)) => {}
                    Ok((status, _)) => failures.lock().expect("f").push(format!("{status}")),
                    Err(e) => failures.lock().expect("f").push(e),
                }
                checks += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            checks
        })
    };
    let (ok, busy) = scrape_flood(agent.metrics_port, 2048, Duration::from_secs(15));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let checks = watcher.join().expect("watcher");
    let peak = *peak.lock().expect("peak");
    let failures = health_failures.lock().expect("f").clone();
    eprintln!(
        "scrape flood: RSS {baseline} KiB idle, {peak} KiB at most; {ok} answers 200, {busy} answers 503"
    );
    assert!(ok > 100, "{ok} scrapes answered 200 ({busy} answered 503)");
    assert!(
        checks > 10 && failures.is_empty(),
        "/health during the flood: {failures:?}"
    );
    // The documented bound (docs/operating.md, "Security"): 128 MiB above the idle agent.
    assert!(
        peak < baseline + 128 * 1024,
        "RSS peaked at {peak} KiB from {baseline} KiB"
    );
    let stats = agent.stats().expect("stats");
    let rejected = series_value(
        &stats,
        "metricsd_http_requests_rejected_total{listener=\"metrics\"}",
    )
    .unwrap_or(0.0);
    // Every 503 a client read is counted (and those sent as the clients stopped reading).
    assert!(
        busy > 0 && rejected as u64 >= busy,
        "{busy} answers 503, {rejected} counted"
    );
    // Memory comes back near the baseline once the flood is over.
    wait_for(
        "RSS back near its baseline",
        Duration::from_secs(30),
        || {
            let rss = rss_kib(pid);
            (rss < baseline + 32 * 1024).then_some(())
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {} KiB, baseline {baseline} KiB, peak {peak} KiB",
            rss_kib(pid)
        )
    });
    eprintln!("scrape flood: RSS {} KiB once it was over", rss_kib(pid));
    let status = agent.terminate().expect("terminate");
    assert_eq!(status.code(), Some(0));
}

fn hup(agent: &Agent) {
    let pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
}

#[test]
fn a_reload_that_cannot_load_its_web_config_or_bind_keeps_the_running_pipeline() {
    let work = Workdir::new();
    let mut agent = Agent::start(&work, &config("250ms", ""), &[]).expect("start");
    agent.wait_ready().expect("ready");
    let config_path = work.path("metricsd.toml");
    let running = std::fs::read_to_string(&config_path).expect("config");
    let scrape_ok = |agent: &Agent| {
        http_get(agent.metrics_port, "/metrics")
            .is_ok_and(|(status, body)| status == 200 && body.contains("node_load1"))
    };
    wait_for("a scrape", Duration::from_secs(20), || {
        scrape_ok(&agent).then_some(())
    })
    .expect("scrape");

    // A web config that does not load.
    let web = work.write(
        "web.yml",
        "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n",
    );
    std::fs::write(
        &config_path,
        running.replace(
            "[http]\n",
            &format!("[http]\nweb_config_file = \"{}\"\n", web.display()),
        ),
    )
    .expect("write");
    hup(&agent);
    wait_for("the reload error", Duration::from_secs(10), || {
        let logs = agent.stderr();
        (logs.contains("config reload failed, keeping the running config")
            && logs.contains("nope.crt"))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert!(agent.is_running(), "{}", agent.stderr());
    assert!(scrape_ok(&agent), "the old pipeline still serves");

    // A listen address that another process holds.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_port = busy.local_addr().expect("addr").port();
    std::fs::write(
        &config_path,
        running.replace(
            &format!("127.0.0.1:{}", agent.metrics_port),
            &format!("127.0.0.1:{busy_port}"),
        ),
    )
    .expect("write");
    hup(&agent);
    wait_for("the bind error", Duration::from_secs(10), || {
        agent
            .stderr()
            .contains(&format!(
                "cannot listen on 127.0.0.1:{busy_port} (http.metrics_listen)"
            ))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert!(agent.is_running(), "{}", agent.stderr());
    assert!(scrape_ok(&agent), "the old pipeline still serves");
    let collections = "metricsd_collector_collections_total{collector=\"system\"}";
    let now = agent.stat(collections).expect("collections");
    agent
        .wait_stat(collections, now + 2.0, Duration::from_secs(10))
        .expect("and still collects");

    // A valid reload on the same ports keeps them.
    std::fs::write(&config_path, running.replace("250ms", "300ms")).expect("write");
    hup(&agent);
    wait_for("the new pipeline", Duration::from_secs(15), || {
        agent
            .stderr()
            .contains("configuration reloaded")
            .then_some(())
    })
    .expect("reloaded");
    wait_for("a scrape after the reload", Duration::from_secs(20), || {
        scrape_ok(&agent).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let status = agent.terminate().expect("terminate");
    assert_eq!(status.code(), Some(0));
}

/// A self-signed certificate and key for 127.0.0.1, written as `{name}.crt` / `{name}.key`.
fn certificate(work: &Workdir, name: &str) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("certificate");
    let crt = work.write(&format!("tls/{name}.crt"), cert.pem());
    let key = work.write(&format!("tls/{name}.key"), key_pair.serialize_pem());
    (crt, key, cert.der().to_vec())
}

#[test]
fn bad_tls_material_and_malformed_hashes_are_refused_by_check_and_at_start() {
    let work = Workdir::new();
    let (crt_a, _key_a, _) = certificate(&work, "a");
    let (_crt_b, key_b, _) = certificate(&work, "b");
    let garbage = work.write(
        "tls/garbage.crt",
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    let hash = bcrypt::hash("pw", 4).expect("hash");
    let cases = [
        (
            format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
                crt_a.display(),
                key_b.display()
            ),
            vec![
                "b.key".to_string(),
                "does not belong to the certificate".to_string(),
            ],
        ),
        (
            format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
                garbage.display(),
                key_b.display()
            ),
            vec!["garbage.crt".to_string()],
        ),
        (
            format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
                crt_a.display(),
                crt_a.display()
            ),
            vec!["a.crt".to_string(), "private key".to_string()],
        ),
        (
            "basic_auth_users:\n  prom: $2y$10$short\n".to_string(),
            vec!["prom".to_string(), "bcrypt".to_string()],
        ),
        (
            format!(
                "basic_auth_users:\n  prom: '{}'\n",
                hash.replacen("$04$", "$4$", 1)
            ),
            vec!["prom".to_string(), "two digits".to_string()],
        ),
    ];
    for (i, (web, expected)) in cases.iter().enumerate() {
        let path = work.write(&format!("web{i}.yml"), web);
        let cfg = work.write(
            &format!("c{i}.toml"),
            format!("[http]\nweb_config_file = \"{}\"\nhealth_listen = \"127.0.0.1:0\"\nmetrics_listen = \"\"\n[[collectors]]\nname = \"hi\"\nplugin = \"hello\"\n[[sinks]]\nname = \"out\"\nplugin = \"stdout\"\n", path.display()),
        );
        let cfg = cfg.to_str().expect("path");
        for command in ["check", "run"] {
            let out = work.metricsd(&["-c", cfg, command], &[]);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(out.status.code(), Some(2), "case {i} {command}: {text}");
            for e in expected {
                assert!(
                    text.contains(e.as_str()),
                    "case {i} {command}: `{e}` not in {text}"
                );
            }
            assert!(!text.contains(&hash[7..]), "no hash in messages");
        }
    }
}

/// The DER of the certificate a TLS listener presents.
fn served_certificate(port: u16) -> Option<Vec<u8>> {
    use rustls::pki_types::ServerName;
    #[derive(Debug)]
    struct Any(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Any(provider)))
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").ok()?)
            .ok()?;
    let mut sock = TcpStream::connect(("127.0.0.1", port)).ok()?;
    sock.set_read_timeout(Some(Duration::from_secs(5))).ok();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).ok()?;
    }
    let der = conn.peer_certificates()?.first()?.to_vec();
    let _ = sock.shutdown(Shutdown::Both);
    Some(der)
}

#[test]
fn certificates_rotate_without_a_restart_and_a_bad_rotation_keeps_the_old_one() {
    let work = Workdir::new();
    let (crt_a, key_a, der_a) = certificate(&work, "a");
    let (crt_b, key_b, der_b) = certificate(&work, "b");
    let crt = work.path("tls/server.crt");
    let key = work.path("tls/server.key");
    std::fs::copy(&crt_a, &crt).expect("copy");
    std::fs::copy(&key_a, &key).expect("copy");
    let web = work.write(
        "web.yml",
        "tls_server_config:\n  cert_file: tls/server.crt\n  key_file: tls/server.key\n",
    );
    let mut agent = Agent::start(
        &work,
        &config("1s", &format!("web_config_file = \"{}\"", web.display())),
        &[],
    )
    .expect("start");
    let ready = wait_for("the TLS listener", Duration::from_secs(30), || {
        served_certificate(agent.health_port)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(ready, der_a);

    // Rotation as cert-manager or certbot does it: new files renamed over the old ones.
    let rotate = |from_crt: &std::path::Path, from_key: &std::path::Path| {
        std::fs::copy(from_key, work.path("tls/new.key")).expect("copy");
        std::fs::copy(from_crt, work.path("tls/new.crt")).expect("copy");
        std::fs::rename(work.path("tls/new.key"), &key).expect("rename");
        std::fs::rename(work.path("tls/new.crt"), &crt).expect("rename");
    };
    rotate(&crt_b, &key_b);
    wait_for("the rotated certificate", Duration::from_secs(15), || {
        (served_certificate(agent.health_port)? == der_b).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert!(
        agent.stderr().contains("web config"),
        "the switch is logged"
    );

    // A rotation whose key does not match: reported, and the last good pair stays.
    rotate(&crt_a, &key_b);
    wait_for("the rejected rotation", Duration::from_secs(15), || {
        // The web config is looked at again as connections come (at most once a second).
        served_certificate(agent.health_port);
        agent
            .stderr()
            .contains("does not belong to the certificate")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(served_certificate(agent.health_port), Some(der_b));
    assert!(agent.is_running());
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn median_ms(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..9)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

#[test]
fn unknown_users_take_as_long_as_wrong_passwords() {
    let work = Workdir::new();
    let hash = bcrypt::hash("right", 8).expect("hash");
    let web = work.write("web.yml", format!("basic_auth_users:\n  prom: '{hash}'\n"));
    let mut agent = Agent::start(
        &work,
        &config("1s", &format!("web_config_file = \"{}\"", web.display())),
        &[],
    )
    .expect("start");
    let port = agent.health_port;
    wait_for("the listener", Duration::from_secs(30), || {
        get_within(port, "/health", Duration::from_secs(5)).ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let attempt = |user: &str, password: &str| {
        let answer = raw(
            port,
            format!(
                "GET /health HTTP/1.0\r\nAuthorization: {}\r\n\r\n",
                basic(user, password)
            )
            .as_bytes(),
        );
        assert!(answer.starts_with("HTTP/1.0 401"), "{answer}");
    };
    attempt("nobody", "x"); // the dummy hash is made on the first unknown user
    let wrong = median_ms(|| attempt("prom", "wrong"));
    let unknown = median_ms(|| attempt("nobody", "wrong"));
    // Both cost one bcrypt verification at the same cost; without the dummy hash an unknown
    // user answers in well under a tenth of that.
    assert!(
        unknown > wrong * 0.5,
        "unknown user {unknown:.2} ms, wrong password {wrong:.2} ms"
    );
    assert!(agent.is_running());
}

#[test]
fn http_details_allow_head_and_non_text_authorization() {
    let work = Workdir::new();
    let hash = bcrypt::hash("right", 4).expect("hash");
    let web = work.write("web.yml", format!("basic_auth_users:\n  prom: '{hash}'\n"));
    let agent = Agent::start(
        &work,
        &config("1s", &format!("web_config_file = \"{}\"", web.display())),
        &[],
    )
    .expect("start");
    let auth = basic("prom", "right");
    wait_for("the listener", Duration::from_secs(30), || {
        let a = try_raw(
            agent.health_port,
            format!("GET /health HTTP/1.0\r\nAuthorization: {auth}\r\n\r\n").as_bytes(),
        )
        .ok()?;
        a.starts_with("HTTP/1.0 200").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    for port in [agent.health_port, agent.metrics_port] {
        let path = if port == agent.health_port {
            "/health"
        } else {
            "/metrics"
        };
        let a = raw(
            port,
            format!("POST {path} HTTP/1.0\r\nAuthorization: {auth}\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        );
        assert!(a.starts_with("HTTP/1.0 405"), "{a}");
        assert_eq!(header(&a, "allow"), Some("GET, HEAD"), "{a}");
        let a = raw(
            port,
            format!("HEAD {path} HTTP/1.0\r\nAuthorization: {auth}\r\n\r\n").as_bytes(),
        );
        assert!(a.starts_with("HTTP/1.0 200"), "HEAD {path}: {a}");
        assert!(a.ends_with("\r\n\r\n"), "HEAD has no body: {a}");
        let mut bytes = format!("GET {path} HTTP/1.0\r\nAuthorization: Basic ").into_bytes();
        bytes.extend_from_slice(&[0xff, 0xfe, 0x80]);
        bytes.extend_from_slice(b"\r\n\r\n");
        let a = raw(port, &bytes);
        assert!(
            a.starts_with("HTTP/1.0 401"),
            "non-UTF-8 Authorization: {a}"
        );
    }
}

#[test]
fn health_command_works_behind_tls_and_basic_auth() {
    let work = Workdir::new();
    let (crt, key, _) = certificate(&work, "server");
    let hash = bcrypt::hash("right", 4).expect("hash");
    let web = work.write(
        "web.yml",
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  prom: '{hash}'\n",
            crt.display(),
            key.display()
        ),
    );
    let mut agent = Agent::start(
        &work,
        &config("1s", &format!("web_config_file = \"{}\"", web.display())),
        &[],
    )
    .expect("start");
    wait_for("the TLS listener", Duration::from_secs(30), || {
        served_certificate(agent.health_port)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let cfg = work.path("metricsd.toml");
    let cfg = cfg.to_str().expect("path");
    let out = work.metricsd(&["-c", cfg, "health"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("401") && err.contains("--user"), "{err}");
    let password = work.write("password", "right\n");
    let out = work.metricsd(
        &[
            "-c",
            cfg,
            "health",
            "--user",
            "prom",
            "--password-file",
            password.to_str().expect("path"),
        ],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"status\""));
    assert!(agent.is_running());
}

/// One kept-alive HTTP/1.1 connection, for asking an agent that has no descriptor left for a
/// new one.
struct KeepAlive(TcpStream);

impl KeepAlive {
    fn connect(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        Self(s)
    }

    /// GET `path` on the connection: (status, body).
    fn get(&mut self, path: &str) -> (u16, String) {
        self.0
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .expect("write");
        let mut data = Vec::new();
        let mut buf = [0u8; 16384];
        let head_end = loop {
            if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = self.0.read(&mut buf).expect("read");
            assert!(n > 0, "the agent closed the kept-alive connection");
            data.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&data[..head_end]).to_string();
        let length: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no Content-Length: {head}"));
        while data.len() < head_end + length {
            let n = self.0.read(&mut buf).expect("read");
            assert!(n > 0, "the agent closed the kept-alive connection");
            data.extend_from_slice(&buf[..n]);
        }
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status");
        (
            status,
            String::from_utf8_lossy(&data[head_end..head_end + length]).to_string(),
        )
    }
}

#[test]
fn running_out_of_descriptors_shows_in_process_metrics_and_health() {
    let _flood = flood_lock();
    raise_own_fd_limit();
    let work = Workdir::new();
    // Soft and hard limit 128, which the agent cannot raise, and a connection cap above it:
    // half-sent requests take every descriptor the agent has.
    let mut agent = Agent::start_wrapped(
        &work,
        &config(
            "250ms",
            "max_connections = 4096\nheader_read_timeout = \"60s\"",
        ),
        &[],
        &[
            "prlimit".to_string(),
            "--nofile=128:128".to_string(),
            "--".to_string(),
        ],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    // Opened before the descriptors run out.
    let mut keep = KeepAlive::connect(agent.health_port);
    let ok = wait_for("the first collection", Duration::from_secs(20), || {
        let (status, body) = keep.get("/health");
        (status == 200 && body.contains("\"status\": \"ok\"")).then_some(body)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let (_, stats) = keep.get("/metrics/stats");
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "process_threads",
    ] {
        assert!(
            series_value(&stats, name).is_some_and(|v| v > 0.0),
            "{name} in {stats}"
        );
    }
    assert_eq!(series_value(&stats, "process_max_fds"), Some(128.0));
    let open_before = series_value(&stats, "process_open_fds").expect("open fds");

    let mut held = Vec::new();
    for _ in 0..200 {
        if let Ok(mut s) = TcpStream::connect_timeout(
            &([127, 0, 0, 1], agent.metrics_port).into(),
            Duration::from_secs(2),
        ) {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
            held.push(s);
        }
    }
    // The system collector cannot open what it had not kept open (directory listings such as
    // /sys/class/net, files beyond its share of the descriptors): /health says so.
    let degraded = wait_for("/health degraded", Duration::from_secs(20), || {
        let (status, body) = keep.get("/health");
        (status == 200 && body.contains("\"status\": \"degraded\"")).then_some(body)
    })
    .unwrap_or_else(|e| panic!("{e}\n{ok}\n{}", agent.stderr()));
    assert!(degraded.contains("cannot read /"), "{degraded}");
    assert!(degraded.contains("Too many open files"), "{degraded}");
    // The listener keeps taking connections from its backlog as descriptors free up (the
    // collector closes the files it opened for one read): the count reaches the limit.
    let stats = wait_for("descriptors exhausted", Duration::from_secs(20), || {
        let (_, stats) = keep.get("/metrics/stats");
        series_value(&stats, "process_open_fds")
            .is_some_and(|open| open > open_before && open >= 120.0)
            .then_some(stats)
    })
    .unwrap_or_else(|e| {
        let (_, stats) = keep.get("/metrics/stats");
        panic!("{e}: process_open_fds (was {open_before}) at process_max_fds 128\n{stats}")
    });
    assert!(
        series_value(
            &stats,
            "metricsd_http_accept_errors_total{listener=\"metrics\"}"
        )
        .is_some_and(|v| v > 0.0),
        "{stats}"
    );

    // Descriptors come back: so does the collector.
    drop(held);
    wait_for("/health ok again", Duration::from_secs(20), || {
        let (status, body) = keep.get("/health");
        (status == 200 && body.contains("\"status\": \"ok\"")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let logs = agent.stderr();
    assert!(logs.contains("can be read again"), "{logs}");
    assert_eq!(
        logs.matches("netclass: cannot read /sys/class/net").count(),
        1,
        "logged when it started, not per collection: {logs}"
    );
    let status = agent.terminate().expect("terminate");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn careless_intervals_durations_and_variables_are_refused_and_named() {
    let work = Workdir::new();
    let base = "[http]\nhealth_listen = \"127.0.0.1:0\"\nmetrics_listen = \"\"\n[[collectors]]\nname = \"hi\"\nplugin = \"hello\"\n[[sinks]]\nname = \"out\"\nplugin = \"stdout\"\n";
    let text = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    // In the file: refused by check and by run, naming the key.
    for (i, (agent_keys, expected)) in [
        (
            "interval = \"1ns\"",
            ["agent.interval", "shortest interval, 100ms"],
        ),
        (
            "timeout = \"300000000000years\"",
            ["agent.timeout", "longer than the longest duration"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = work.write(
            &format!("c{i}.toml"),
            format!("[agent]\n{agent_keys}\n{base}"),
        );
        let cfg = cfg.to_str().expect("path");
        for command in ["check", "run"] {
            let out = work.metricsd(&["-c", cfg, command], &[]);
            let t = text(&out);
            assert_eq!(out.status.code(), Some(2), "{agent_keys} {command}: {t}");
            for e in expected {
                assert!(t.contains(e), "{agent_keys} {command}: `{e}` not in {t}");
            }
            assert!(!t.contains("panicked"), "{t}");
        }
    }
    // With no file: the operator variables are named, not the keys they set.
    for (var, value) in [
        ("GPU_COLLECTION_INTERVAL", "0"),
        ("TIMESERIES_BACKEND", "a;b"),
        ("GPU_DISCOVERY_HOST", "host:99999"),
        ("TIMESERIES_BACKEND", "influx"),
    ] {
        let out = work.metricsd(&["check"], &[(var, value)]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {t}");
        assert!(t.contains(var), "{var}={value}: {t}");
    }
    // Valid but useless: a sink that no route reaches, two sinks on one path.
    let cfg = work.write(
        "routes.toml",
        format!("{base}[[sinks]]\nname = \"p1\"\nplugin = \"prometheus\"\n[[sinks]]\nname = \"p2\"\nplugin = \"prometheus\"\n[[routes]]\nfrom = [\"hi\"]\nto = [\"p1\", \"p2\"]\n"),
    );
    let out = work.metricsd(&["-c", cfg.to_str().expect("path"), "check"], &[]);
    let t = text(&out);
    assert!(t.contains("warning: sink `out` is in no [[routes]]"), "{t}");
    assert!(t.contains("`p1` and `p2` both serve /metrics"), "{t}");
}
