//! The host owns delivery: one bounded queue per sink (drop-oldest, counted) and one worker
//! that hands batches to the sink's `write` on a blocking thread, never two at once, and acts
//! on the failure kind the sink reports.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use metricsd_plugin_api::abi::SinkBox;
use metricsd_plugin_api::{Batch, ErrorKind, PluginError};
use tokio::sync::Notify;

use crate::call_thread::CallThread;
use crate::config::SpoolMode;
use crate::events::{Event, Telemetry};
use crate::health::{Health, State};
use crate::spool::{RecordId, Spool};

struct QueueState {
    /// Batches in memory with their order, oldest first.
    batches: VecDeque<(u64, Arc<Batch>)>,
    samples: usize,
    /// Samples of the group taken from memory whose write has not finished (counted in the
    /// depth until it is acknowledged or back in the queue).
    in_flight: Vec<(u64, Arc<Batch>)>,
    closed: bool,
    /// The order the next batch gets: batches are delivered by it, wherever they wait.
    next_order: u64,
    /// The sink's last write failed (transiently): in `overflow` mode batches go to the spool.
    failing: bool,
}

/// A bounded queue of batches, measured in samples, with an optional disk spool. Without a
/// spool, when a new batch does not fit, the oldest batches are dropped (and counted) until it
/// does; a batch larger than the whole capacity is still accepted on its own. With a spool,
/// what does not fit goes to disk, and in [`SpoolMode::Always`] (or while the sink fails)
/// everything does; the oldest batch is delivered first wherever it waits.
pub struct SinkQueue {
    name: String,
    capacity: usize,
    state: Mutex<QueueState>,
    notify: Notify,
    telemetry: Arc<Telemetry>,
    spool: Option<(Spool, SpoolMode)>,
}

/// Where popped batches came from, to acknowledge or retry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// The memory queue, with the batches' orders (removed when popped).
    Memory(Vec<u64>),
    /// The spool, up to and including this record (removed when acknowledged).
    Spool(RecordId),
}

impl SinkQueue {
    /// An empty queue.
    pub fn new(name: &str, capacity: usize, telemetry: Arc<Telemetry>) -> Self {
        Self {
            name: name.to_string(),
            capacity,
            state: Mutex::new(QueueState {
                batches: VecDeque::new(),
                samples: 0,
                in_flight: Vec::new(),
                closed: false,
                next_order: 0,
                failing: false,
            }),
            notify: Notify::new(),
            telemetry,
            spool: None,
        }
    }

    /// A queue with a disk spool holding `recovered` batches from the last run.
    pub fn with_spool(
        name: &str,
        capacity: usize,
        telemetry: Arc<Telemetry>,
        spool: Spool,
        mode: SpoolMode,
        recovered: usize,
    ) -> Self {
        let queue = Self {
            spool: Some((spool, mode)),
            ..Self::new(name, capacity, telemetry)
        };
        queue.lock().next_order = recovered as u64;
        queue.report_depth();
        queue
    }

    /// Whether batches survive a restart.
    pub fn is_spooled(&self) -> bool {
        self.spool.is_some()
    }

    fn report_depth(&self) {
        self.telemetry.set_queue_depth(&self.name, self.depth());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends to the spool; on an error the batch is not there and the error is counted.
    fn to_spool(&self, spool: &Spool, batch: &Arc<Batch>, order: u64, dropped: &mut usize) -> bool {
        match spool.append(batch, order) {
            Ok(n) => {
                *dropped += n;
                true
            }
            Err(e) => {
                Event::SpoolFailed {
                    sink: &self.name,
                    message: &e.to_string(),
                }
                .emit(&self.telemetry);
                false
            }
        }
    }

    /// Moves one batch waiting in memory to the spool: the oldest that keeps the spool in
    /// order (older ones, a write being retried, stay in memory and are delivered first).
    /// `false` when none can go or the disk refuses it.
    fn spill_one(&self, st: &mut QueueState, spool: &Spool, dropped: &mut usize) -> bool {
        let back = spool.back_order();
        let Some(i) = st
            .batches
            .iter()
            .position(|(order, _)| back.is_none_or(|b| *order > b))
        else {
            return false;
        };
        let (order, batch) = (st.batches[i].0, Arc::clone(&st.batches[i].1));
        if !self.to_spool(spool, &batch, order, dropped) {
            return false;
        }
        st.samples -= batch.samples.len();
        st.batches.remove(i);
        true
    }

    /// Moves every batch waiting in memory that can go to the spool (see `spill_one`).
    fn spill(&self, st: &mut QueueState, spool: &Spool, dropped: &mut usize) {
        while self.spill_one(st, spool, dropped) {}
    }

    /// Enqueues a batch, spooling or dropping the oldest ones if needed.
    pub fn push(&self, batch: Arc<Batch>) {
        let n = batch.samples.len();
        if n == 0 {
            return;
        }
        let data = crate::spool::data_samples(&batch);
        self.telemetry.sink_received(&self.name, data);
        let mut st = self.lock();
        if st.closed {
            drop(st);
            self.dropped_at_shutdown(data);
            return;
        }
        let order = st.next_order;
        st.next_order += 1;
        let mut dropped = 0;
        st.samples += n;
        st.batches.push_back((order, batch));
        if let Some((spool, mode)) = &self.spool {
            if *mode == SpoolMode::Always || st.failing {
                // What waits in memory (a failed append) goes first, then this batch.
                self.spill(&mut st, spool, &mut dropped);
            }
        }
        while st.samples > self.capacity {
            let spilled = self
                .spool
                .as_ref()
                .is_some_and(|(spool, _)| self.spill_one(&mut st, spool, &mut dropped));
            if spilled {
                continue;
            }
            if st.batches.len() <= 1 {
                break;
            }
            if let Some((_, old)) = st.batches.pop_front() {
                st.samples -= old.samples.len();
                dropped += crate::spool::data_samples(&old);
            }
        }
        drop(st);
        self.overflowed(dropped);
        self.report_depth();
        self.notify.notify_one();
    }

    /// Counts (and logs) samples dropped because neither memory nor the spool could hold them.
    fn overflowed(&self, samples: usize) {
        if samples > 0 {
            Event::QueueOverflow {
                sink: &self.name,
                samples,
            }
            .emit(&self.telemetry);
        }
    }

    /// Counts a batch that arrived after the queue was closed.
    fn dropped_at_shutdown(&self, samples: usize) {
        Event::SinkDropped {
            sink: &self.name,
            reason: "shutdown",
            samples,
        }
        .emit(&self.telemetry);
    }

    /// The sink's writes fail (`true`, after a transient failure) or succeed again. While
    /// they fail, a spool in `overflow` mode takes every batch, those in memory first.
    pub fn set_failing(&self, failing: bool) {
        let mut st = self.lock();
        st.failing = failing;
        if let (true, Some((spool, _))) = (failing, &self.spool) {
            let mut dropped = 0;
            self.spill(&mut st, spool, &mut dropped);
            drop(st);
            self.overflowed(dropped);
            self.report_depth();
        }
    }

    /// Acknowledges a batch the sink wrote or refused: it is not sent again.
    pub fn ack(&self, taken: &Taken) {
        match (taken, &self.spool) {
            (Taken::Spool(id), Some((spool, _))) => spool.ack(*id),
            (Taken::Memory(_), _) => self.lock().in_flight.clear(),
            (Taken::Spool(_), None) => {}
        }
        self.report_depth();
    }

    /// Keeps batches whose write is to be retried at the head, in their order.
    pub fn retry(&self, taken: Taken, batches: Vec<Arc<Batch>>) {
        match taken {
            Taken::Memory(orders) => {
                {
                    let mut st = self.lock();
                    st.in_flight.clear();
                    for (order, batch) in orders.into_iter().zip(batches).rev() {
                        st.samples += batch.samples.len();
                        st.batches.push_front((order, batch));
                    }
                }
                self.report_depth();
            }
            // Still at the head of the spool until acknowledged.
            Taken::Spool(_) => {}
        }
    }

    /// Waits until a batch is queued; `false` once the queue is closed and empty.
    pub async fn ready(&self) -> bool {
        loop {
            let notified = self.notify.notified();
            if self.depth() > 0 {
                return true;
            }
            if self.is_closed() {
                return false;
            }
            notified.await;
        }
    }

    /// The oldest batches, as many as fit in `max_samples` (at least one), all from the spool
    /// or all from memory; `None` when nothing is queued.
    pub fn take_group(&self, max_samples: usize) -> Option<(Taken, Vec<Arc<Batch>>)> {
        if let Some((spool, _)) = &self.spool {
            let memory_front = self.lock().batches.front().map(|(o, _)| *o);
            let spool_first = spool
                .front_order()
                .is_some_and(|o| memory_front.is_none_or(|m| o < m));
            if spool_first {
                let (group, lost) =
                    spool.front_group(max_samples, memory_front.unwrap_or(u64::MAX));
                if lost > 0 {
                    Event::SinkDropped {
                        sink: &self.name,
                        reason: "spool_unreadable",
                        samples: lost,
                    }
                    .emit(&self.telemetry);
                    self.report_depth();
                }
                if let Some(&(last, _)) = group.last() {
                    return Some((
                        Taken::Spool(last),
                        group.into_iter().map(|(_, b)| b).collect(),
                    ));
                }
            }
        }
        let spool_front = self.spool.as_ref().and_then(|(s, _)| s.front_order());
        let mut st = self.lock();
        let mut orders = Vec::new();
        let mut group = Vec::new();
        let mut samples = 0;
        while let Some((order, front)) = st.batches.front() {
            let n = front.samples.len();
            if !group.is_empty()
                && (samples + n > max_samples || spool_front.is_some_and(|s| s < *order))
            {
                break;
            }
            samples += n;
            if let Some((order, b)) = st.batches.pop_front() {
                orders.push(order);
                group.push(b);
            }
        }
        st.samples -= samples;
        st.in_flight = orders.iter().copied().zip(group.iter().cloned()).collect();
        drop(st);
        self.report_depth();
        (!group.is_empty()).then_some((Taken::Memory(orders), group))
    }

    /// Stops accepting batches; `ready` is `false` once what is left is taken.
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// Empties the queue (and the spool), returning the data samples removed.
    pub fn clear(&self) -> usize {
        let spooled = self.spool.as_ref().map_or(0, |(s, _)| s.clear());
        let mut st = self.lock();
        let memory = st
            .batches
            .drain(..)
            .map(|(_, b)| crate::spool::data_samples(&b))
            .sum::<usize>();
        st.samples = 0;
        drop(st);
        self.report_depth();
        spooled + memory
    }

    /// How often the spool is synced by [`Self::sync_spool`] (`None`: no spool, or each
    /// append syncs itself).
    pub fn spool_sync(&self) -> Option<Duration> {
        self.spool
            .as_ref()
            .map(|(s, _)| s.sync_interval())
            .filter(|d| !d.is_zero())
    }

    /// Makes the spool durable (every `spool_sync`); an error is logged and counted.
    pub fn sync_spool(&self) {
        if let Some((spool, _)) = &self.spool {
            if let Err(e) = spool.sync() {
                Event::SpoolFailed {
                    sink: &self.name,
                    message: &format!("sync: {e}"),
                }
                .emit(&self.telemetry);
            }
        }
    }

    /// At shutdown, after the worker stopped: moves what is left in memory (and a write that
    /// was cut off by `agent.shutdown_timeout`) to the spool. Returns (samples kept in the
    /// spool for the next start, data samples lost).
    pub fn shutdown(&self) -> (usize, usize) {
        let left: Vec<(u64, Arc<Batch>)> = {
            let mut st = self.lock();
            st.samples = 0;
            let mut left = std::mem::take(&mut st.in_flight);
            left.extend(st.batches.drain(..));
            left
        };
        let mut lost = 0;
        match &self.spool {
            Some((spool, _)) => {
                // In order after a restart, whatever their order now: the next run reads
                // the spool front to back.
                for (order, b) in left {
                    if !self.to_spool(spool, &b, order, &mut lost) {
                        lost += crate::spool::data_samples(&b);
                    }
                }
                self.sync_spool();
                (spool.samples(), lost)
            }
            None => (
                0,
                left.iter()
                    .map(|(_, b)| crate::spool::data_samples(b))
                    .sum(),
            ),
        }
    }

    /// Samples waiting (in the spool and in memory) or being written.
    pub fn depth(&self) -> usize {
        let st = self.lock();
        let in_flight: usize = st.in_flight.iter().map(|(_, b)| b.samples.len()).sum();
        self.spool.as_ref().map_or(0, |(s, _)| s.samples()) + st.samples + in_flight
    }

    /// Whether `close` was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Takes every batch queued in memory (tests and `once`).
    pub fn drain_now(&self) -> Vec<Arc<Batch>> {
        let mut st = self.lock();
        st.samples = 0;
        st.batches.drain(..).map(|(_, b)| b).collect()
    }
}

/// One batch holding the samples of several, in order: families are listed once, each
/// batch's common labels are folded into its label sets, and every sample carries its
/// timestamp.
pub fn merge(batches: &[Arc<Batch>]) -> Batch {
    use abi_stable::std_types::{ROption, RVec};
    use metricsd_plugin_api::{Label, MetricFamily, Sample};
    let mut out = Batch::default();
    let mut family_index: std::collections::HashMap<(String, u8), u32> =
        std::collections::HashMap::new();
    for b in batches {
        let families: Vec<u32> = b
            .families
            .iter()
            .map(|f: &MetricFamily| {
                *family_index
                    .entry((f.name.to_string(), f.kind.0))
                    .or_insert_with(|| {
                        out.families.push(f.clone());
                        (out.families.len() - 1) as u32
                    })
            })
            .collect();
        let offset = out.label_sets.len() as u32;
        for own in b.label_sets.iter() {
            let mut set: RVec<Label> = own.clone();
            for c in b.common_labels.iter() {
                if !own.iter().any(|l| l.name == c.name) {
                    set.push(c.clone());
                }
            }
            out.label_sets.push(set);
        }
        let ts = b.timestamp_ms;
        for s in b.samples.iter() {
            let Some(&family) = families.get(s.family as usize) else {
                continue;
            };
            out.samples.push(Sample {
                family,
                labels: s.labels + offset,
                value: s.value,
                timestamp_ms: match s.timestamp_ms {
                    ROption::RSome(t) => ROption::RSome(t),
                    ROption::RNone => ts,
                },
            });
        }
    }
    out.timestamp_ms = batches.first().map_or(ROption::RNone, |b| b.timestamp_ms);
    out
}

/// The longest a sink's `Retry-After` can hold its queue back.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(600);

/// Between half and all of `backoff`, at random.
fn jitter(backoff: Duration) -> Duration {
    let half = backoff / 2;
    half + half.mul_f64(fastrand::f64())
}

/// A sink instance and what the worker needs to drive it.
pub struct SinkRuntime {
    /// Instance name.
    pub name: String,
    /// Most samples in one write when batches are waiting (several batches are merged).
    pub batch_max_samples: usize,
    /// How long to wait for more batches before a write (0: write what is there).
    pub batch_wait: Duration,
    /// Plugin name.
    pub plugin: String,
    /// Write timeout.
    pub timeout: Duration,
    /// Longest back-off between retries.
    pub max_backoff: Duration,
    /// The live instance (`None` while disabled); shared with the HTTP layer for `render`.
    pub instance: RwLock<Option<Arc<SinkBox>>>,
    /// Its queue.
    pub queue: Arc<SinkQueue>,
    /// Where its writes run.
    pub calls: CallThread,
    /// Shared telemetry.
    pub telemetry: Arc<Telemetry>,
    /// Shared health.
    pub health: Arc<Health>,
    /// The answers rendered last, for pull sinks.
    pub rendered: crate::http::RenderCache,
}

impl SinkRuntime {
    /// The live instance.
    pub fn current(&self) -> Option<Arc<SinkBox>> {
        self.instance
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn disable(&self, why: String) {
        *self.instance.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.health.failure(&self.name, State::Disabled, why);
    }

    /// Calls `write` on the sink's own thread; after the timeout the sink is reported stale
    /// and the worker keeps waiting for the call (a sink is never written to twice at once).
    async fn write(&self, instance: Arc<SinkBox>, batch: Arc<Batch>) -> Result<(), PluginError> {
        let mut call = self
            .calls
            .call(move || instance.write(&batch).into_result());
        let joined = match tokio::time::timeout(self.timeout, &mut call).await {
            Ok(joined) => joined,
            Err(_) => {
                let why = format!(
                    "write did not finish within {}",
                    humantime::format_duration(self.timeout)
                );
                Event::SinkWriteFailed {
                    sink: &self.name,
                    plugin: &self.plugin,
                    kind: "timeout",
                    message: &why,
                }
                .emit(&self.telemetry);
                self.health.stale(&self.name, why);
                call.await
            }
        };
        // Whatever the write did, answers rendered before it may be out of date.
        self.rendered.invalidate();
        joined.unwrap_or_else(|e| {
            Err(PluginError {
                kind: ErrorKind::PANIC,
                message: e.to_string().into(),
                retry_after_ms: abi_stable::std_types::ROption::RNone,
            })
        })
    }

    /// Writes queued batches until the queue is closed and drained.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Duration::ZERO;
        while self.queue.ready().await {
            if !self.batch_wait.is_zero()
                && !self.queue.is_closed()
                && self.queue.depth() < self.batch_max_samples
            {
                // Let more batches join this write; jittered so that a fleet spreads out.
                tokio::time::sleep(jitter(self.batch_wait)).await;
            }
            let Some((taken, group)) = self.queue.take_group(self.batch_max_samples) else {
                continue;
            };
            let batch = if group.len() == 1 {
                Arc::clone(&group[0])
            } else {
                Arc::new(merge(&group))
            };
            let data = crate::spool::data_samples(&batch);
            let Some(instance) = self.current() else {
                self.queue.ack(&taken);
                Event::SinkDropped {
                    sink: &self.name,
                    reason: "disabled",
                    samples: data,
                }
                .emit(&self.telemetry);
                continue;
            };
            let started = Instant::now();
            let reported_before = self.telemetry.reported_drops(&self.name);
            let result = self.write(instance, Arc::clone(&batch)).await;
            // Samples the sink reported as dropped during this write (refused by its server,
            // invalid for its protocol) are counted already; staleness markers end series and
            // are not samples.
            let reported = self
                .telemetry
                .reported_drops(&self.name)
                .saturating_sub(reported_before);
            let unreported = data.saturating_sub(usize::try_from(reported).unwrap_or(usize::MAX));
            match result {
                Ok(()) => {
                    let samples = unreported;
                    self.queue.ack(&taken);
                    self.queue.set_failing(false);
                    backoff = Duration::ZERO;
                    self.health.success(&self.name);
                    Event::SinkWritten {
                        sink: &self.name,
                        plugin: &self.plugin,
                        samples,
                        duration: started.elapsed(),
                    }
                    .emit(&self.telemetry);
                }
                Err(err) => {
                    let samples = unreported;
                    let message = err.message.to_string();
                    Event::SinkWriteFailed {
                        sink: &self.name,
                        plugin: &self.plugin,
                        kind: err.kind.as_str(),
                        message: &message,
                    }
                    .emit(&self.telemetry);
                    match err.kind {
                        ErrorKind::TRANSIENT => {
                            self.health.failure(&self.name, State::Failing, message);
                            backoff = (backoff * 2)
                                .max(Duration::from_millis(500))
                                .min(self.max_backoff);
                            // The server's Retry-After wins (up to RETRY_AFTER_CAP); else the
                            // back-off with equal jitter, so that a fleet does not retry in step.
                            let wait = match err.retry_after_ms.into_option() {
                                Some(ms) => Duration::from_millis(ms).min(RETRY_AFTER_CAP),
                                None => jitter(backoff),
                            };
                            self.queue.retry(taken, group);
                            self.queue.set_failing(true);
                            if self.queue.is_closed() && self.queue.is_spooled() {
                                // Shutting down: what is left waits in the spool.
                                return;
                            }
                            tokio::time::sleep(wait).await;
                        }
                        ErrorKind::REJECTED => {
                            self.queue.ack(&taken);
                            self.health.failure(&self.name, State::Failing, message);
                            Event::SinkDropped {
                                sink: &self.name,
                                reason: "rejected",
                                samples,
                            }
                            .emit(&self.telemetry);
                        }
                        _ => {
                            // Fatal, config or panic: the instance cannot be trusted with more
                            // data until the operator acts (or the config is reloaded).
                            self.queue.ack(&taken);
                            self.disable(format!("{}: {message}", err.kind.as_str()));
                            let queued = self.queue.clear();
                            Event::SinkDropped {
                                sink: &self.name,
                                reason: "disabled",
                                samples: samples + queued,
                            }
                            .emit(&self.telemetry);
                        }
                    }
                }
            }
        }
    }

    /// Flushes and closes the instance (shutdown), on a blocking thread with the timeout.
    pub async fn finish(&self) {
        let Some(instance) = self.current() else {
            return;
        };
        let name = self.name.clone();
        let call = tokio::task::spawn_blocking(move || {
            let flushed = instance.flush().into_result();
            instance.close();
            flushed
        });
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(Ok(()))) => tracing::debug!(sink = %name, "flushed"),
            Ok(Ok(Err(e))) => tracing::warn!(sink = %name, "flush failed: {}", e.message),
            Ok(Err(e)) => tracing::warn!(sink = %name, "flush task failed: {e}"),
            Err(_) => tracing::warn!(sink = %name, "flush did not finish within the timeout"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metricsd_plugin_api::BatchBuilder;

    fn batch(n: usize) -> Arc<Batch> {
        let mut b = BatchBuilder::new();
        let f = b.gauge("x", "", "");
        for _ in 0..n {
            b.sample(f, &[], 1.0);
        }
        Arc::new(b.finish())
    }

    #[test]
    fn full_queue_drops_oldest_and_counts() {
        let t = Arc::new(Telemetry::new());
        let q = SinkQueue::new("s", 10, Arc::clone(&t));
        q.push(batch(4));
        q.push(batch(4));
        q.push(batch(4));
        assert_eq!(q.depth(), 8);
        assert!(t
            .render_text()
            .contains("metricsd_sink_dropped_samples_total{reason=\"queue_full\",sink=\"s\"} 4"));
        q.push(batch(30));
        assert_eq!(q.depth(), 30, "an oversized batch is kept alone");
    }

    fn valued(n: usize, v: f64) -> Arc<Batch> {
        let mut b = BatchBuilder::new();
        let f = b.gauge("x", "", "");
        for _ in 0..n {
            b.sample(f, &[], v);
        }
        Arc::new(b.finish())
    }

    fn spooled(mode: SpoolMode, capacity: usize) -> (tempfile::TempDir, SinkQueue) {
        let dir = tempfile::tempdir().expect("tmp");
        let options = crate::spool::Options {
            max_bytes: 1 << 20,
            cache_limit: 100,
            sync: Duration::from_secs(1),
        };
        let (spool, _) = Spool::open(dir.path(), options).expect("open");
        let q = SinkQueue::with_spool("s", capacity, Arc::new(Telemetry::new()), spool, mode, 0);
        (dir, q)
    }

    fn segments_bytes(dir: &std::path::Path) -> u64 {
        std::fs::read_dir(dir)
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    /// Takes groups of one batch until the queue is empty: the first value of each.
    fn delivered(q: &SinkQueue) -> Vec<f64> {
        let mut out = Vec::new();
        while let Some((taken, group)) = q.take_group(1) {
            out.push(group[0].samples[0].value);
            q.ack(&taken);
        }
        out
    }

    #[test]
    fn overflow_mode_writes_to_disk_only_what_memory_cannot_hold() {
        let (dir, q) = spooled(SpoolMode::Overflow, 10);
        for v in 1..=2 {
            q.push(valued(4, f64::from(v)));
        }
        assert_eq!(
            segments_bytes(dir.path()),
            0,
            "a healthy sink writes nothing"
        );
        for v in 3..=5 {
            q.push(valued(4, f64::from(v)));
        }
        assert!(segments_bytes(dir.path()) > 0, "the overflow went to disk");
        assert_eq!(q.depth(), 20, "nothing dropped");
        assert_eq!(delivered(&q), vec![1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn while_the_sink_fails_everything_goes_to_disk_and_order_is_kept() {
        let (dir, q) = spooled(SpoolMode::Overflow, 8);
        q.push(valued(4, 1.0));
        q.push(valued(4, 2.0));
        // A write of batch 1 is in flight; batches 3 and 4 arrive and push 2 to disk.
        let Some((taken, group)) = q.take_group(4) else {
            panic!("a group")
        };
        q.push(valued(4, 3.0));
        q.push(valued(4, 4.0));
        // The write fails: batch 1 goes back to the head, and to disk with all in memory.
        q.retry(taken, group);
        q.set_failing(true);
        q.push(valued(4, 5.0));
        assert!(segments_bytes(dir.path()) > 0);
        assert_eq!(q.depth(), 20);
        q.set_failing(false);
        q.push(valued(4, 6.0));
        assert_eq!(delivered(&q), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn always_mode_spools_every_batch() {
        let (dir, q) = spooled(SpoolMode::Always, 100);
        q.push(valued(1, 1.0));
        assert!(segments_bytes(dir.path()) > 0);
        assert_eq!(delivered(&q), vec![1.0]);
    }

    #[test]
    fn jitter_stays_within_half_and_all_of_the_backoff() {
        let backoff = Duration::from_millis(1000);
        for _ in 0..100 {
            let w = jitter(backoff);
            assert!(w >= Duration::from_millis(500) && w <= backoff, "{w:?}");
        }
    }

    #[test]
    fn merged_batches_keep_every_sample_with_its_labels_and_time() {
        let mut a = BatchBuilder::new();
        let fa = a.gauge("x", "", "");
        a.sample(fa, &[("gpu", "0")], 1.0);
        a.common_label("node", "n1");
        a.timestamp_ms(1000);
        let mut b = BatchBuilder::new();
        let fb = b.counter("y_total", "", "");
        let fx = b.gauge("x", "", "");
        b.sample(fb, &[], 5.0);
        b.sample(fx, &[("gpu", "1"), ("node", "own")], 2.0);
        b.common_label("node", "n2");
        b.timestamp_ms(2000);
        let merged = merge(&[Arc::new(a.finish()), Arc::new(b.finish())]);
        assert_eq!(merged.families.len(), 2, "x listed once");
        let seen: Vec<(String, Vec<String>, f64, Option<i64>)> = merged
            .samples
            .iter()
            .map(|s| {
                let mut labels: Vec<String> = merged
                    .labels_of(s)
                    .map(|l| format!("{}={}", l.name, l.value))
                    .collect();
                labels.sort();
                (
                    merged
                        .family_of(s)
                        .map(|f| f.name.to_string())
                        .unwrap_or_default(),
                    labels,
                    s.value,
                    merged.timestamp_of(s),
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                (
                    "x".into(),
                    vec!["gpu=0".into(), "node=n1".into()],
                    1.0,
                    Some(1000)
                ),
                ("y_total".into(), vec!["node=n2".into()], 5.0, Some(2000)),
                (
                    "x".into(),
                    vec!["gpu=1".into(), "node=own".into()],
                    2.0,
                    Some(2000)
                ),
            ]
        );
    }

    #[tokio::test]
    async fn closed_queue_drains_then_ends() {
        let t = Arc::new(Telemetry::new());
        let q = SinkQueue::new("s", 10, t);
        q.push(batch(1));
        q.close();
        q.push(batch(1));
        assert!(q.ready().await);
        let Some((taken, group)) = q.take_group(1) else {
            panic!("a group")
        };
        assert!(matches!(&taken, Taken::Memory(_)) && group.len() == 1);
        assert_eq!(
            q.depth(),
            1,
            "the write in flight is counted until acknowledged"
        );
        q.ack(&taken);
        assert!(!q.ready().await);
    }
}
