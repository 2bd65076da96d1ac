//! The plugin's own threads: GPM sampling at collection time and the Xid event wait.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

/// A thread of the plugin's own, told to stop when dropped, and joined unless it was started
/// [`Background::detached`].
pub(crate) struct Background {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) thread: Option<JoinHandle<()>>,
}

impl Background {
    pub(crate) fn spawn(
        name: &str,
        dispatch: tracing::Dispatch,
        body: impl FnOnce(&AtomicBool) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || body(&thread_stop));
            })
            .map_err(|e| tracing::warn!("cannot start the {name} thread: {e}"))
            .ok();
        Self { stop, thread }
    }
}

impl Background {
    /// Not joined when dropped: for a thread blocked in a call that cannot be interrupted (an
    /// NVML event wait), which sees the stop flag when the call returns and ends then. Its code
    /// stays mapped: the host never unloads a plugin library.
    pub(crate) fn detached(mut self) -> Self {
        self.thread = None;
        self
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // The GPM thread is woken by its watcher's drop before this.
            let _ = t.join();
        }
    }
}

/// GPM metrics this plugin asks for, with their metric names.
pub(crate) const GPM_METRICS: [(nvml_wrapper::enums::gpm::GpmMetricId, &str, &str); 8] = {
    use nvml_wrapper::enums::gpm::GpmMetricId as M;
    [
        (
            M::GraphicsUtil,
            "gpu_graphics_engine_active_ratio",
            "Fraction of time any warp was active on an SM (graphics engine active).",
        ),
        (
            M::SmUtil,
            "gpu_sm_active_ratio",
            "Fraction of time each SM had at least one warp assigned, averaged over SMs.",
        ),
        (
            M::SmOccupancy,
            "gpu_sm_occupancy_ratio",
            "Warps active against the theoretical maximum, averaged over SMs.",
        ),
        (
            M::AnyTensorUtil,
            "gpu_tensor_active_ratio",
            "Fraction of time the tensor pipes were active.",
        ),
        (
            M::DramBwUtil,
            "gpu_dram_active_ratio",
            "Fraction of peak DRAM bandwidth used.",
        ),
        (
            M::Fp64Util,
            "gpu_fp64_active_ratio",
            "Fraction of time the FP64 pipes were active.",
        ),
        (
            M::Fp32Util,
            "gpu_fp32_active_ratio",
            "Fraction of time the FP32 pipes were active.",
        ),
        (
            M::Fp16Util,
            "gpu_fp16_active_ratio",
            "Fraction of time the FP16 pipes were active.",
        ),
    ]
};

/// What the GPM thread and the collections share: how many computations were asked for and
/// done, and the latest values (GPU index → one value per `GPM_METRICS` entry, as ratios).
#[derive(Default)]
pub(crate) struct GpmState {
    pub(crate) asked: u64,
    pub(crate) done: u64,
    /// The thread has ended (no GPU supports GPM, or it was stopped): nothing to wait for.
    pub(crate) ended: bool,
    /// The watcher is going away: the thread ends.
    pub(crate) stopping: bool,
    pub(crate) values: BTreeMap<u32, Vec<Option<f64>>>,
}

#[derive(Default)]
pub(crate) struct GpmShared {
    pub(crate) state: Mutex<GpmState>,
    /// Signalled when `asked` or `done` moves.
    pub(crate) changed: Condvar,
}

/// Samples younger than this are not compared: a ratio over a few milliseconds says little
/// (`metricsd once` gets no GPM values rather than noise).
pub(crate) const GPM_MIN_SPAN: Duration = Duration::from_millis(100);

/// How long a collection waits for the GPM thread (a sample and a computation take a few ms per
/// GPU; a GPM call that hangs costs a collection its GPM values, not its other metrics).
pub(crate) const GPM_WAIT: Duration = Duration::from_millis(500);

pub(crate) fn gpm_sample<'nvml>(
    device: &Device<'nvml>,
    index: u32,
) -> Option<(Instant, nvml_wrapper::gpm::GpmSample<'nvml>)> {
    match device.gpm_sample() {
        Ok(s) => Some((Instant::now(), s)),
        Err(e) => {
            tracing::debug!(gpu = index, "GPM sample failed: {e}");
            None
        }
    }
}

/// One GPM sample per GPU each time a collection asks, compared with the previous one: the
/// values are averages over the collection interval. (On an H200 a sample and a computation
/// cost about 2.7 ms of CPU, so they are made once per collection, not on a timer of their own.)
pub(crate) fn gpm_loop(nvml: &Nvml, shared: &GpmShared, stop: &AtomicBool) {
    let count = nvml.device_count().unwrap_or(0);
    let devices: Vec<(u32, Device)> = (0..count)
        .filter_map(|i| nvml.device_by_index(i).ok().map(|d| (i, d)))
        .filter(|(_, d)| d.gpm_support().unwrap_or(false))
        .collect();
    if devices.is_empty() {
        tracing::debug!("no GPU supports GPM: the GPM thread ends");
        return;
    }
    let ids: Vec<_> = GPM_METRICS.iter().map(|(id, _, _)| *id).collect();
    let mut previous: Vec<_> = devices.iter().map(|(i, d)| gpm_sample(d, *i)).collect();
    loop {
        let target = {
            let Ok(mut state) = shared.state.lock() else {
                return;
            };
            // Asleep until a collection asks or the watcher goes away: no wake-ups between
            // collections.
            while state.asked == state.done {
                if state.stopping || stop.load(Ordering::Relaxed) {
                    return;
                }
                state = match shared.changed.wait(state) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
            state.asked
        };
        let mut values = BTreeMap::new();
        for (slot, (index, device)) in devices.iter().enumerate() {
            let Some((at, current)) = gpm_sample(device, *index) else {
                previous[slot] = None;
                continue;
            };
            match &previous[slot] {
                Some((before_at, _)) if at.duration_since(*before_at) < GPM_MIN_SPAN => continue,
                Some((_, before)) => {
                    match nvml_wrapper::gpm::gpm_metrics_get(nvml, before, &current, &ids) {
                        Ok(results) => {
                            let got = results
                                .into_iter()
                                .map(|r| r.ok().map(|m| m.value / 100.0))
                                .collect();
                            values.insert(*index, got);
                        }
                        Err(e) => tracing::debug!(gpu = index, "GPM metrics failed: {e}"),
                    }
                }
                None => {}
            }
            previous[slot] = Some((at, current));
        }
        let Ok(mut state) = shared.state.lock() else {
            return;
        };
        state.values = values;
        state.done = target;
        shared.changed.notify_all();
    }
}

/// Xid errors seen by the event thread.
#[derive(Default)]
pub(crate) struct XidBook {
    /// (GPU index, Xid) → count since the watcher started.
    pub(crate) counts: BTreeMap<(u32, u64), u64>,
    /// GPU index → (last Xid, when, seconds since the epoch).
    pub(crate) last: BTreeMap<u32, (u64, f64)>,
}

/// The thread that waits on an NVML event set for critical Xid errors, and what it saw.
pub(crate) struct XidWatcher {
    pub(crate) book: Arc<Mutex<XidBook>>,
    pub(crate) _thread: Background,
}

impl XidWatcher {
    pub(crate) fn start(nvml: Arc<Nvml>, dispatch: tracing::Dispatch) -> Self {
        let book = Arc::new(Mutex::new(XidBook::default()));
        let thread_book = Arc::clone(&book);
        let thread = Background::spawn("nvml-xid", dispatch, move |stop| {
            xid_loop(&nvml, &thread_book, stop)
        })
        .detached();
        Self {
            book,
            _thread: thread,
        }
    }
}

/// The thread that computes GPM metrics when a collection asks, and what it computed.
pub(crate) struct GpmWatcher {
    pub(crate) shared: Arc<GpmShared>,
    pub(crate) _thread: Background,
}

impl GpmWatcher {
    pub(crate) fn start(nvml: Arc<Nvml>, dispatch: tracing::Dispatch) -> Self {
        let shared = Arc::new(GpmShared::default());
        let thread_shared = Arc::clone(&shared);
        let thread = Background::spawn("nvml-gpm", dispatch, move |stop| {
            gpm_loop(&nvml, &thread_shared, stop);
            if let Ok(mut state) = thread_shared.state.lock() {
                state.ended = true;
                thread_shared.changed.notify_all();
            }
        });
        if thread.thread.is_none() {
            if let Ok(mut state) = shared.state.lock() {
                state.ended = true;
            }
        }
        Self {
            shared,
            _thread: thread,
        }
    }

    /// Asks for the GPM values since the previous ask; [`Self::values`] gives them.
    pub(crate) fn ask(&self) -> Option<u64> {
        let mut state = self.shared.state.lock().ok()?;
        if state.ended {
            return None;
        }
        state.asked += 1;
        self.shared.changed.notify_all();
        Some(state.asked)
    }

    /// The values computed for `ask` (waiting up to [`GPM_WAIT`] for them), or none.
    pub(crate) fn values(&self, ask: u64) -> BTreeMap<u32, Vec<Option<f64>>> {
        let Ok(state) = self.shared.state.lock() else {
            return BTreeMap::new();
        };
        match self
            .shared
            .changed
            .wait_timeout_while(state, GPM_WAIT, |s| s.done < ask && !s.ended)
        {
            Ok((state, _)) if state.done >= ask => state.values.clone(),
            _ => BTreeMap::new(),
        }
    }
}

impl Drop for GpmWatcher {
    /// Wakes the thread so that it sees it must end (then `Background` joins it).
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.stopping = true;
        }
        self.shared.changed.notify_all();
    }
}

/// How long one wait for an Xid event lasts: the thread wakes this often without events (6
/// times a minute; it was 120 at 500 ms).
pub(crate) const XID_WAIT_MS: u32 = 10_000;

pub(crate) fn xid_loop(nvml: &Nvml, book: &Mutex<XidBook>, stop: &AtomicBool) {
    use nvml_wrapper::bitmasks::event::EventTypes;
    use nvml_wrapper::enums::event::XidError;
    let mut set = match nvml.create_event_set() {
        Ok(set) => set,
        Err(e) => {
            tracing::warn!("Xid errors are not counted: cannot create an NVML event set: {e}");
            return;
        }
    };
    let count = nvml.device_count().unwrap_or(0);
    for index in 0..count {
        let Ok(device) = nvml.device_by_index(index) else {
            continue;
        };
        set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(set) => set,
            Err(e) => {
                tracing::warn!(
                    gpu = index,
                    "Xid errors are not counted: cannot register for events: {}",
                    e.error
                );
                return;
            }
        };
    }
    while !stop.load(Ordering::Relaxed) {
        // Blocked in the driver until an event comes; the timeout only bounds how long the
        // thread outlives its collector (it is not joined: see `Background::detached`).
        match set.wait(XID_WAIT_MS) {
            Ok(event) => {
                let xid = match event.event_data {
                    Some(XidError::Value(v)) => v,
                    Some(XidError::Unknown) => 999,
                    None => continue,
                };
                let Ok(index) = event.device.index() else {
                    continue;
                };
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                tracing::warn!(gpu = index, xid, "GPU reported critical Xid error {xid}");
                if let Ok(mut b) = book.lock() {
                    *b.counts.entry((index, xid)).or_insert(0) += 1;
                    b.last.insert(index, (xid, now));
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                tracing::warn!("waiting for NVML events failed: {e}; retrying in 1 s");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}
