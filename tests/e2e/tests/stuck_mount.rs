//! A filesystem whose `statfs` never answers (what a mount of a dead NFS server does) must not
//! take the system collector down: the mount is reported with `node_filesystem_device_error` 1
//! after `mount_timeout`, skipped afterwards, and every other series keeps coming.
//!
//! The hanging filesystem is a FUSE mount served by this test, which answers the kernel's
//! `INIT` and never its `STATFS`. It is mounted in the host's mount table (the agent reads
//! `/proc/1/mounts`), under a temporary directory, and unmounted when the test ends.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use metricsd_e2e::{http_get, series_value, wait_for, Agent, Workdir};

const FUSE_INIT: u32 = 26;
const FUSE_STATFS: u32 = 17;
const FUSE_FORGET: u32 = 2;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_BATCH_FORGET: u32 = 42;

/// A FUSE filesystem that never answers `statfs`, mounted at `mount_point` until dropped.
struct HangingMount {
    mount_point: PathBuf,
    _device: File,
}

impl HangingMount {
    fn mount(mount_point: PathBuf) -> HangingMount {
        let device = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .expect("/dev/fuse (the test needs root and the fuse module)");
        let options = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0",
            device.as_raw_fd()
        );
        nix::mount::mount(
            Some("metricsd-hang"),
            &mount_point,
            Some("fuse"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .expect("mount the FUSE filesystem (the test needs root)");
        let mut server = device.try_clone().expect("clone /dev/fuse");
        std::thread::spawn(move || serve(&mut server));
        HangingMount {
            mount_point,
            _device: device,
        }
    }
}

impl HangingMount {
    /// Aborts the FUSE connection (`/sys/fs/fuse/connections/N/abort`): every pending call
    /// returns `ENOTCONN`. A call the kernel has passed to the server waits for its answer
    /// without regard to signals, so a process blocked in one cannot exit before this.
    fn abort(&self) {
        let connections = std::path::Path::new("/sys/fs/fuse/connections");
        if std::fs::read_dir(connections).is_ok_and(|mut d| d.next().is_none()) {
            let _ = nix::mount::mount(
                Some("fusectl"),
                connections,
                Some("fusectl"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            );
        }
        // The connection is named by the mount's device minor number (mountinfo's third field).
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let mp = self.mount_point.display().to_string();
        let minor = mountinfo
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| f.len() > 4 && f[4] == mp)
            .and_then(|f| f[2].split(':').nth(1).map(str::to_string))
            .expect("the FUSE mount in mountinfo");
        std::fs::write(connections.join(minor).join("abort"), "1").expect("abort the connection");
    }
}

impl Drop for HangingMount {
    fn drop(&mut self) {
        self.abort();
        let _ = nix::mount::umount2(&self.mount_point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Answers `INIT`, leaves `STATFS` unanswered, and refuses everything else with `ENOSYS`.
fn serve(device: &mut File) {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match device.read(&mut buf) {
            Ok(n) if n >= 40 => n,
            _ => return, // unmounted
        };
        let u32_at = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
        let opcode = u32_at(4);
        let unique = u64::from_ne_bytes(buf[8..16].try_into().expect("8 bytes"));
        let mut reply = Vec::new();
        let mut header = |len: u32, error: i32| {
            reply.extend_from_slice(&len.to_ne_bytes());
            reply.extend_from_slice(&error.to_ne_bytes());
            reply.extend_from_slice(&unique.to_ne_bytes());
        };
        match opcode {
            FUSE_INIT if n >= 48 => {
                let max_readahead = u32_at(48);
                header(16 + 64, 0);
                let mut init = [0u8; 64];
                init[0..4].copy_from_slice(&7u32.to_ne_bytes()); // major
                init[4..8].copy_from_slice(&31u32.to_ne_bytes()); // minor
                init[8..12].copy_from_slice(&max_readahead.to_ne_bytes());
                init[16..18].copy_from_slice(&16u16.to_ne_bytes()); // max_background
                init[18..20].copy_from_slice(&12u16.to_ne_bytes()); // congestion_threshold
                init[20..24].copy_from_slice(&4096u32.to_ne_bytes()); // max_write
                init[24..28].copy_from_slice(&1u32.to_ne_bytes()); // time_gran
                reply.extend_from_slice(&init);
            }
            FUSE_STATFS | FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => continue,
            _ => header(16, -38), // ENOSYS
        }
        if device.write_all(&reply).is_err() {
            return;
        }
    }
}

#[test]
fn a_filesystem_that_never_answers_does_not_stop_the_collection() {
    let work = Workdir::new();
    let mount_point = work.path("hang");
    std::fs::create_dir(&mount_point).expect("mkdir");
    let mount = HangingMount::mount(mount_point.clone());
    let mp = mount_point.display().to_string();
    // statvfs on it blocks (checked here so that the test fails loudly if it does not).
    let probe = mount_point.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(nix::sys::statvfs::statvfs(&probe).is_ok());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(1)).is_err(),
        "statvfs on the FUSE mount returned: the test's filesystem does not hang"
    );

    let config = r#"
[agent]
interval = "1s"
[http]
health_listen = "127.0.0.1:{health}"
metrics_listen = "127.0.0.1:{metrics}"
[[collectors]]
name = "system"
plugin = "system"
timeout = "20s"
[collectors.config]
mount_timeout = "500ms"
[[sinks]]
name = "prom"
plugin = "prometheus"
"#;
    let mut agent = Agent::start(&work, config, &[]).expect("start");
    // Dropped before the agent, also when an assertion fails: the agent cannot exit while one
    // of its threads waits on the mount, until the mount's connection is aborted.
    let mount = mount;
    agent.wait_ready().expect("ready");
    let stuck = format!("node_filesystem_device_error{{device=\"metricsd-hang\",fstype=\"fuse\",mountpoint=\"{mp}\"}}");
    let body = wait_for(
        "the stuck mount's device error",
        Duration::from_secs(20),
        || {
            http_get(agent.metrics_port, "/metrics")
                .ok()
                .map(|(_, b)| b)
                .filter(|b| series_value(b, &stuck) == Some(1.0))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    // The mount has no sizes; the other filesystems and sources do.
    assert!(!body.contains("node_filesystem_size_bytes{device=\"metricsd-hang\""));
    assert!(
        body.contains("node_filesystem_size_bytes{"),
        "other mounts are reported"
    );
    assert!(series_value(&body, "node_load1").is_some());
    // Later collections skip the mount without waiting on it again: the collections keep
    // coming at the interval, each well within the instance's 20 s timeout.
    let before = agent
        .stat("metricsd_collector_collections_total{collector=\"system\"}")
        .expect("collections counter");
    let after = agent
        .wait_stat(
            "metricsd_collector_collections_total{collector=\"system\"}",
            before + 3.0,
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert!(after >= before + 3.0);
    let body = http_get(agent.metrics_port, "/metrics").expect("scrape").1;
    assert_eq!(series_value(&body, &stuck), Some(1.0));
    let stderr = agent.stderr();
    assert_eq!(
        stderr.matches("did not return within").count(),
        1,
        "logged once, not asked again while stuck:\n{stderr}"
    );
    assert!(stderr.contains(&mp), "{stderr}");
    // The server goes away: the blocked call fails, and the mount is asked again.
    mount.abort();
    wait_for(
        "the mount to be asked again",
        Duration::from_secs(10),
        || {
            agent
                .stderr()
                .contains("the filesystem responds again")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    agent.terminate().expect("stop");
    drop(mount);
}
