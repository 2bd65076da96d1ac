//! A sink's disk spool: the batches not yet delivered, in order, in a directory of segment
//! files, so that what was collected during an outage survives an agent restart.
//!
//! Every batch routed to a spooled sink is appended to the current segment before the sink
//! sees it, and removed (acknowledged) once the sink has written or refused it; a batch in
//! flight when the agent stops is delivered again at the next start (at least once).
//!
//! Segment `NNNNNNNNNNNNNNNNNNNN.seg` is a sequence of records `[length u32 LE][CRC-32 of the
//! payload u32 LE][payload]`, the payload a `postcard`-encoded [`Batch`]. A segment is closed at
//! `segment_bytes` and the next begun. The file `cursor` holds `SEQ OFFSET`, the first record
//! not yet acknowledged. On open, segments are scanned from the cursor: a torn record (power
//! loss in the middle of an append) or one whose checksum or encoding is wrong ends that
//! segment's scan, and the bytes skipped are reported; new batches go to a new segment.
//! When the spool would exceed `max_bytes`, the oldest batches are dropped (and counted).

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use metricsd_plugin_api::Batch;

const HEADER: u64 = 8;

/// Where a record is: (segment, offset).
pub type RecordId = (u64, u64);

#[derive(Debug, Clone, Copy)]
struct Record {
    seq: u64,
    offset: u64,
    samples: usize,
}

impl Record {
    fn id(&self) -> RecordId {
        (self.seq, self.offset)
    }
}

struct Writer {
    seq: u64,
    file: File,
    size: u64,
}

struct State {
    pending: VecDeque<Record>,
    /// Batches of the newest pending records, kept so that a healthy sink never reads back.
    cache: VecDeque<(RecordId, Arc<Batch>)>,
    cache_samples: usize,
    writer: Option<Writer>,
    /// Segment files on disk and their sizes.
    segments: BTreeMap<u64, u64>,
    next_seq: u64,
    samples: usize,
}

/// What opening an existing spool found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Batches found, to be delivered first.
    pub batches: usize,
    /// Their samples.
    pub samples: usize,
    /// Bytes skipped as torn or corrupt.
    pub corrupt_bytes: u64,
    /// Per damaged segment: bytes skipped and what is wrong, for the log.
    pub problems: Vec<(u64, String)>,
}

/// The spool of one sink.
pub struct Spool {
    /// An exclusive lock on `dir/lock` for as long as the spool is open: two agents (or two
    /// sinks by one name) never share a spool.
    _lock: nix::fcntl::Flock<File>,
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    cache_limit: usize,
    state: Mutex<State>,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.seg"))
}

/// Reads one record at `offset` of a segment file of `size` bytes: `Ok(None)` at a clean end
/// of file, `Err` with what is wrong when the record is torn or corrupt.
fn read_record(file: &mut File, offset: u64, size: u64) -> Result<Option<(u32, Batch)>, String> {
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| format!("seek: {e}"))?;
    let mut header = [0u8; HEADER as usize];
    let mut got = 0;
    while got < header.len() {
        match file.read(&mut header[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    if got == 0 {
        return Ok(None);
    }
    if got < header.len() {
        return Err("a record header is cut short (torn write)".to_string());
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    // A length beyond the end of the file is a torn (or garbage) header: never allocate it.
    if offset + HEADER + u64::from(len) > size {
        return Err("a record is cut short (torn write)".to_string());
    }
    let mut payload = vec![0u8; len as usize];
    file.read_exact(&mut payload)
        .map_err(|_| "a record is cut short (torn write)".to_string())?;
    if crc32fast::hash(&payload) != crc {
        return Err("a record's checksum does not match (corrupt)".to_string());
    }
    let batch: Batch =
        postcard::from_bytes(&payload).map_err(|e| format!("a record does not decode ({e})"))?;
    Ok(Some((len, batch)))
}

/// Takes the spool's lock, waiting up to 5 s for a previous holder (the pipeline of a config
/// reload that is still winding down) to let go.
fn lock(dir: &Path) -> io::Result<nix::fcntl::Flock<File>> {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => return Ok(locked),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                file = back;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(io::Error::other(format!(
                    "{} is in use by another metricsd process (or another sink of the same name)",
                    dir.display()
                )))
            }
            Err((_, e)) => return Err(io::Error::other(format!("lock: {e}"))),
        }
    }
}

impl Spool {
    /// Opens (creating) the spool in `dir`, recovering what a previous run left there.
    pub fn open(dir: &Path, max_bytes: u64, cache_limit: usize) -> io::Result<(Self, Recovered)> {
        fs::create_dir_all(dir)?;
        let lock = lock(dir)?;
        let mut seqs: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        seqs.sort_unstable();
        let cursor = fs::read_to_string(dir.join("cursor"))
            .ok()
            .and_then(|text| {
                let mut parts = text.split_whitespace();
                Some((
                    parts.next()?.parse::<u64>().ok()?,
                    parts.next()?.parse::<u64>().ok()?,
                ))
            })
            .unwrap_or((0, 0));
        let mut recovered = Recovered::default();
        let mut pending = VecDeque::new();
        let mut segments = BTreeMap::new();
        for &seq in &seqs {
            let path = segment_path(dir, seq);
            if seq < cursor.0 {
                // Delivered before the last stop.
                let _ = fs::remove_file(&path);
                continue;
            }
            let mut file = File::open(&path)?;
            let size = file.metadata()?.len();
            let mut offset = if seq == cursor.0 {
                cursor.1.min(size)
            } else {
                0
            };
            loop {
                match read_record(&mut file, offset, size) {
                    Ok(Some((len, batch))) => {
                        pending.push_back(Record {
                            seq,
                            offset,
                            samples: batch.samples.len(),
                        });
                        recovered.batches += 1;
                        recovered.samples += batch.samples.len();
                        offset += HEADER + u64::from(len);
                    }
                    Ok(None) => break,
                    Err(why) => {
                        let skipped = size.saturating_sub(offset);
                        recovered.corrupt_bytes += skipped;
                        recovered.problems.push((
                            skipped,
                            format!(
                                "{}: {why} at byte {offset}; the {skipped} bytes from there are skipped",
                                path.display()
                            ),
                        ));
                        break;
                    }
                }
            }
            segments.insert(seq, size);
        }
        let samples = recovered.samples;
        let next_seq = seqs.last().map_or(cursor.0, |s| s + 1).max(cursor.0);
        let segment_bytes = (max_bytes / 8).clamp(64 * 1024, 16 * 1024 * 1024);
        let spool = Self {
            _lock: lock,
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes,
            cache_limit,
            state: Mutex::new(State {
                pending,
                cache: VecDeque::new(),
                cache_samples: 0,
                writer: None,
                segments,
                next_seq,
                samples,
            }),
        };
        Ok((spool, recovered))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Samples waiting.
    pub fn samples(&self) -> usize {
        self.lock().samples
    }

    /// Appends a batch; returns the samples of older batches dropped to stay within
    /// `max_bytes`.
    pub fn append(&self, batch: &Arc<Batch>) -> io::Result<usize> {
        let payload = postcard::to_allocvec(batch.as_ref())
            .map_err(|e| io::Error::other(format!("encode: {e}")))?;
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::other("a batch larger than 4 GiB cannot be spooled"))?;
        let record_bytes = HEADER + u64::from(len);
        let mut st = self.lock();
        let dropped = self.make_room(&mut st, record_bytes);
        let rotate = st
            .writer
            .as_ref()
            .is_none_or(|w| w.size > 0 && w.size + record_bytes > self.segment_bytes);
        if rotate {
            let seq = st.next_seq;
            st.next_seq += 1;
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(segment_path(&self.dir, seq))?;
            st.segments.insert(seq, 0);
            st.writer = Some(Writer { seq, file, size: 0 });
        }
        let Some(w) = st.writer.as_mut() else {
            return Err(io::Error::other("no spool segment open"));
        };
        let mut record = Vec::with_capacity(payload.len() + HEADER as usize);
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        record.extend_from_slice(&payload);
        w.file.write_all(&record)?;
        let r = Record {
            seq: w.seq,
            offset: w.size,
            samples: batch.samples.len(),
        };
        w.size += record_bytes;
        let (seq, size) = (w.seq, w.size);
        st.segments.insert(seq, size);
        st.pending.push_back(r);
        st.samples += r.samples;
        st.cache.push_back((r.id(), Arc::clone(batch)));
        st.cache_samples += r.samples;
        while st.cache_samples > self.cache_limit && st.cache.len() > 1 {
            if let Some((_, old)) = st.cache.pop_front() {
                st.cache_samples -= old.samples.len();
            }
        }
        Ok(dropped)
    }

    /// Drops the oldest batches until `incoming` more bytes fit; returns their samples.
    fn make_room(&self, st: &mut State, incoming: u64) -> usize {
        let mut dropped = 0;
        loop {
            let total: u64 = st.segments.values().sum();
            if total + incoming <= self.max_bytes || st.pending.is_empty() {
                break;
            }
            // Drop the whole oldest segment's batches, so its file can go.
            let oldest = st.pending.front().map(|r| r.seq);
            while st.pending.front().map(|r| r.seq) == oldest {
                if let Some(r) = st.pending.pop_front() {
                    dropped += r.samples;
                    st.samples -= r.samples;
                }
            }
            self.remove_delivered_segments(st);
            if oldest == st.writer.as_ref().map(|w| w.seq) {
                // The current segment itself was dropped: start a fresh one.
                if let Some(w) = st.writer.take() {
                    let _ = fs::remove_file(segment_path(&self.dir, w.seq));
                    st.segments.remove(&w.seq);
                }
            }
        }
        let front = st.pending.front().map(|r| r.id());
        st.cache.retain(|(id, _)| front.is_some_and(|f| *id >= f));
        st.cache_samples = st.cache.iter().map(|(_, b)| b.samples.len()).sum();
        dropped
    }

    /// Deletes segment files before the first pending record (never the open one).
    fn remove_delivered_segments(&self, st: &mut State) {
        let keep_from = st
            .pending
            .front()
            .map(|r| r.seq)
            .or(st.writer.as_ref().map(|w| w.seq))
            .unwrap_or(u64::MAX);
        let done: Vec<u64> = st
            .segments
            .keys()
            .copied()
            .filter(|s| *s < keep_from)
            .collect();
        for seq in done {
            let _ = fs::remove_file(segment_path(&self.dir, seq));
            st.segments.remove(&seq);
        }
    }

    /// The oldest batches not yet acknowledged, as many as fit in `max_samples` (at least
    /// one). A record that cannot be read back is dropped and its samples returned as the
    /// second value.
    pub fn front_group(&self, max_samples: usize) -> (Vec<(RecordId, Arc<Batch>)>, usize) {
        let mut st = self.lock();
        let mut lost = 0;
        let mut group: Vec<(RecordId, Arc<Batch>)> = Vec::new();
        let mut samples = 0;
        let mut at = 0;
        // The segment being read back, opened once for all its records in this group.
        let mut segment: Option<(u64, File, u64)> = None;
        while let Some(r) = st.pending.get(at).copied() {
            if !group.is_empty() && samples + r.samples > max_samples {
                break;
            }
            // The cache holds the newest pending records, in id order.
            if let Ok(i) = st.cache.binary_search_by_key(&r.id(), |(id, _)| *id) {
                group.push((r.id(), Arc::clone(&st.cache[i].1)));
                samples += r.samples;
                at += 1;
                continue;
            }
            if segment.as_ref().is_none_or(|(seq, ..)| *seq != r.seq) {
                segment = File::open(segment_path(&self.dir, r.seq))
                    .and_then(|f| {
                        let size = f.metadata()?.len();
                        Ok((r.seq, f, size))
                    })
                    .ok();
            }
            let read = match segment.as_mut() {
                Some((_, file, size)) => read_record(file, r.offset, *size),
                None => Err("the segment file cannot be opened".to_string()),
            };
            match read {
                Ok(Some((_, batch))) => {
                    group.push((r.id(), Arc::new(batch)));
                    samples += r.samples;
                    at += 1;
                }
                Ok(None) | Err(_) if !group.is_empty() => {
                    // Deliver what was read first; the bad record is dealt with next time.
                    break;
                }
                Ok(None) | Err(_) => {
                    tracing::error!(
                        "spool {}: the batch at segment {} byte {} cannot be read back; its {} samples are lost",
                        self.dir.display(),
                        r.seq,
                        r.offset,
                        r.samples
                    );
                    st.pending.pop_front();
                    st.samples -= r.samples;
                    lost += r.samples;
                }
            }
        }
        (group, lost)
    }

    /// Acknowledges delivered (or refused) batches up to and including `id`: they will not
    /// be sent again. Batches dropped meanwhile to make room are already gone.
    pub fn ack(&self, id: RecordId) {
        let mut st = self.lock();
        while st.pending.front().is_some_and(|r| r.id() <= id) {
            if let Some(r) = st.pending.pop_front() {
                st.samples -= r.samples;
            }
        }
        while st.cache.front().is_some_and(|(i, _)| *i <= id) {
            if let Some((_, b)) = st.cache.pop_front() {
                st.cache_samples -= b.samples.len();
            }
        }
        self.remove_delivered_segments(&mut st);
        let cursor = match st.pending.front() {
            Some(r) => (r.seq, r.offset),
            None => match &st.writer {
                Some(w) => (w.seq, w.size),
                None => (st.next_seq, 0),
            },
        };
        drop(st);
        self.write_cursor(cursor);
    }

    fn write_cursor(&self, (seq, offset): (u64, u64)) {
        let tmp = self.dir.join("cursor.tmp");
        let written = fs::write(&tmp, format!("{seq} {offset}\n"))
            .and_then(|()| fs::rename(&tmp, self.dir.join("cursor")));
        if let Err(e) = written {
            tracing::warn!(
                "spool {}: cannot record progress ({e}); delivered batches may be sent again after a restart",
                self.dir.display()
            );
        }
    }

    /// Drops everything waiting; returns the samples.
    pub fn clear(&self) -> usize {
        let mut st = self.lock();
        let samples = st.samples;
        st.pending.clear();
        st.cache.clear();
        st.cache_samples = 0;
        st.samples = 0;
        self.remove_delivered_segments(&mut st);
        let cursor = st
            .writer
            .as_ref()
            .map_or((st.next_seq, 0), |w| (w.seq, w.size));
        drop(st);
        self.write_cursor(cursor);
        samples
    }

    /// Forces the open segment to disk (shutdown).
    pub fn sync(&self) {
        if let Some(w) = self.lock().writer.as_ref() {
            let _ = w.file.sync_data();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metricsd_plugin_api::BatchBuilder;

    fn batch(n: usize, value: f64) -> Arc<Batch> {
        let mut b = BatchBuilder::new();
        let f = b.gauge("x", "", "");
        for i in 0..n {
            let s = i.to_string();
            b.sample(f, &[("i", s.as_str())], value);
        }
        Arc::new(b.finish())
    }

    fn values(spool: &Spool) -> Vec<f64> {
        let mut out = Vec::new();
        while let Some((id, b)) = spool.front_group(1).0.pop() {
            out.push(b.samples[0].value);
            spool.ack(id);
        }
        out
    }

    #[test]
    fn batches_survive_a_reopen_in_order_and_acknowledged_ones_stay_delivered() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let (spool, rec) = Spool::open(dir.path(), 1 << 20, 1000).expect("open");
            assert_eq!(rec.batches, 0);
            for v in 1..=5 {
                spool.append(&batch(3, f64::from(v))).expect("append");
            }
            let Some((id, b)) = spool.front_group(1).0.pop() else {
                panic!("front")
            };
            assert_eq!(b.samples[0].value, 1.0);
            spool.ack(id);
        }
        let (spool, rec) = Spool::open(dir.path(), 1 << 20, 1000).expect("reopen");
        assert_eq!((rec.batches, rec.samples, rec.corrupt_bytes), (4, 12, 0));
        spool.append(&batch(1, 6.0)).expect("append");
        assert_eq!(values(&spool), vec![2.0, 3.0, 4.0, 5.0, 6.0]);
        drop(spool);
        let (_, rec) = Spool::open(dir.path(), 1 << 20, 1000).expect("reopen");
        assert_eq!(rec.batches, 0, "all acknowledged");
    }

    #[test]
    fn a_spool_in_use_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().expect("tmp");
        let (first, _) = Spool::open(dir.path(), 1 << 20, 10).expect("open");
        let Err(e) = Spool::open(dir.path(), 1 << 20, 10) else {
            panic!("a second open succeeded")
        };
        assert!(e.to_string().contains("in use by another metricsd"), "{e}");
        drop(first);
        assert!(Spool::open(dir.path(), 1 << 20, 10).is_ok(), "free again");
    }

    #[test]
    fn groups_take_consecutive_batches_up_to_a_sample_budget() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, _) = Spool::open(dir.path(), 1 << 20, 4).expect("open");
        for v in 1..=5 {
            spool.append(&batch(3, f64::from(v))).expect("append");
        }
        // Batches 1 and 2 were evicted from the memory cache (4 samples): read from disk.
        let (group, lost) = spool.front_group(7);
        assert_eq!(lost, 0);
        let values: Vec<f64> = group.iter().map(|(_, b)| b.samples[0].value).collect();
        assert_eq!(values, vec![1.0, 2.0]);
        spool.ack(group[1].0);
        let (group, _) = spool.front_group(100);
        assert_eq!(group.len(), 3);
        assert_eq!(group[0].1.samples[0].value, 3.0);
        // A single batch larger than the budget still goes alone.
        let (group, _) = spool.front_group(1);
        assert_eq!(group.len(), 1);
    }

    #[test]
    fn a_torn_tail_is_skipped_and_reported_and_the_rest_delivered() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let (spool, _) = Spool::open(dir.path(), 1 << 20, 1000).expect("open");
            for v in 1..=3 {
                spool.append(&batch(2, f64::from(v))).expect("append");
            }
        }
        let seg = fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "seg"))
            .expect("segment");
        // Power loss in the middle of the third append.
        let len = fs::metadata(&seg).expect("meta").len();
        let f = OpenOptions::new().write(true).open(&seg).expect("open");
        f.set_len(len - 5).expect("truncate");
        let (spool, rec) = Spool::open(dir.path(), 1 << 20, 1000).expect("reopen");
        assert_eq!(rec.batches, 2);
        assert!(rec.corrupt_bytes > 0);
        assert!(rec.problems[0].1.contains("torn"), "{:?}", rec.problems);
        assert_eq!(values(&spool), vec![1.0, 2.0]);
    }

    #[test]
    fn a_flipped_bit_is_caught_by_the_checksum() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let (spool, _) = Spool::open(dir.path(), 1 << 20, 1000).expect("open");
            spool.append(&batch(2, 1.0)).expect("append");
            spool.append(&batch(2, 2.0)).expect("append");
        }
        let seg = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&seg).expect("read");
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        fs::write(&seg, bytes).expect("write");
        let (spool, rec) = Spool::open(dir.path(), 1 << 20, 1000).expect("reopen");
        assert!(rec.problems[0].1.contains("checksum"), "{:?}", rec.problems);
        assert_eq!(values(&spool), vec![1.0]);
    }

    #[test]
    fn a_full_spool_drops_the_oldest_batches_and_counts_them() {
        let dir = tempfile::tempdir().expect("tmp");
        // 64 KiB budget; each batch is ~1 KiB+.
        let (spool, _) = Spool::open(dir.path(), 64 * 1024, 10).expect("open");
        let mut dropped = 0;
        for v in 0..400 {
            dropped += spool.append(&batch(50, f64::from(v))).expect("append");
        }
        assert!(dropped > 0);
        let on_disk: u64 = fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(on_disk <= 64 * 1024, "{on_disk} bytes on disk");
        let kept = values(&spool);
        assert_eq!(
            kept.len() * 50 + dropped,
            400 * 50,
            "every sample kept or counted"
        );
        assert_eq!(kept.last(), Some(&399.0), "the newest are kept");
        assert!(kept.windows(2).all(|w| w[1] == w[0] + 1.0), "in order");
    }
}
