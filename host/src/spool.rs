//! A sink's disk spool: batches not yet delivered, in order, in a directory of segment files,
//! so that what waits for a sink survives an agent restart.
//!
//! The queue decides what goes to disk ([`crate::config::SpoolMode`]): everything before the
//! sink sees it (`always`), or only what the memory queue cannot hold and what waits while the
//! sink fails (`overflow`). A batch is removed (acknowledged) once the sink has written or
//! refused it; a batch in flight when the agent stops is delivered again at the next start (at
//! least once).
//!
//! Segment `NNNNNNNNNNNNNNNNNNNN.seg` starts with the 8 bytes [`MAGIC`], then records
//! `[length u32][samples u32][CRC-32 of the payload u32][CRC-32 of the first 12 bytes u32]`
//! (little-endian) followed by the payload, a `postcard`-encoded [`Batch`]. A segment is closed
//! at `segment_bytes` and the next begun. The file `cursor` holds `SEQ OFFSET`, the first
//! record not yet acknowledged.
//!
//! Durability: a failed or short append is cut back to the end of the last good record (or,
//! if even that fails, the segment is sealed and a new one begun), so one full disk never
//! shifts later records. Every `sync` interval the open segments are `fdatasync`ed, the
//! directory after segments were created, and the cursor rewritten durably (write, fsync,
//! rename, fsync of the directory); with a zero interval every append and acknowledgement is.
//! A power cut loses at most the batches appended since the last sync; acknowledgements since
//! then are delivered again.
//!
//! On open, segments are scanned from the cursor. A record whose header checksum is good but
//! whose payload is cut short (torn) or wrong (corrupt) is skipped and its samples are counted
//! as lost; after a damaged header the scan looks for the next good record. Segments written
//! before the header carried a sample count (no [`MAGIC`]) are still read.
//! When the spool would exceed `max_bytes`, the oldest batches are dropped (and counted).

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metricsd_plugin_api::Batch;

/// The first bytes of every segment in the current format.
pub const MAGIC: [u8; 8] = *b"mdspool2";
const MAGIC_LEN: u64 = MAGIC.len() as u64;
const HEADER: u64 = 16;
/// The header of segments without [`MAGIC`]: `[length u32][CRC-32 of the payload u32]`.
const LEGACY_HEADER: u64 = 8;

/// Where a record is: (segment, offset).
pub type RecordId = (u64, u64);

/// Samples of a batch that are data, not staleness markers: what delivery counts.
pub fn data_samples(batch: &Batch) -> usize {
    batch
        .samples
        .iter()
        .filter(|s| !metricsd_plugin_api::is_stale_marker(s.value))
        .count()
}

#[derive(Debug, Clone, Copy)]
struct Record {
    seq: u64,
    offset: u64,
    /// All samples (the queue depth).
    samples: usize,
    /// Data samples (what is counted when the record is lost).
    data: usize,
    /// The queue's order of the batch, to interleave with batches waiting in memory.
    order: u64,
}

impl Record {
    fn id(&self) -> RecordId {
        (self.seq, self.offset)
    }
}

struct Writer {
    seq: u64,
    file: Arc<File>,
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
    /// Segments with appends not yet synced (the open one, and ones closed since).
    unsynced: Vec<Arc<File>>,
    /// A segment was created or removed since the directory was synced.
    dir_unsynced: bool,
    /// The first record not acknowledged, and what the cursor file holds durably.
    cursor: RecordId,
    cursor_synced: RecordId,
}

/// What opening an existing spool found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Batches found, to be delivered first (their orders are `0..batches`).
    pub batches: usize,
    /// Their samples.
    pub samples: usize,
    /// Bytes skipped as torn or corrupt.
    pub corrupt_bytes: u64,
    /// Data samples in the records skipped, where their header said (see `unknown`).
    pub lost_samples: usize,
    /// Per damaged place: bytes skipped and what is wrong, for the log.
    pub problems: Vec<(u64, String)>,
}

/// How a spool is opened.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Most bytes on disk; the oldest batches are dropped beyond it.
    pub max_bytes: u64,
    /// Samples of the newest batches also kept in memory.
    pub cache_limit: usize,
    /// How often appends and acknowledgements are made durable (zero: each one).
    pub sync: Duration,
}

/// The spool of one sink.
pub struct Spool {
    /// An exclusive lock on `dir/lock` for as long as the spool is open: two agents (or two
    /// sinks by one name) never share a spool.
    _lock: nix::fcntl::Flock<File>,
    dir: PathBuf,
    options: Options,
    segment_bytes: u64,
    state: Mutex<State>,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.seg"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A record read back.
struct Found {
    /// Bytes from its offset to the next record.
    bytes: u64,
    batch: Batch,
}

/// What is wrong with a record.
struct Bad {
    why: String,
    /// Data samples of the bad record, when its header is intact.
    samples: Option<usize>,
    /// Where reading can go on: the next record when the header is intact, `None` when the
    /// rest of the segment is unusable as it stands.
    next: Option<u64>,
}

fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads one record at `offset` of a segment of `size` bytes in the current (`legacy` false)
/// or the old format: `Ok(None)` at a clean end of file.
fn read_record(
    file: &mut File,
    offset: u64,
    size: u64,
    legacy: bool,
) -> Result<Option<Found>, Bad> {
    let bad = |why: &str, samples: Option<usize>, next: Option<u64>| Bad {
        why: why.to_string(),
        samples,
        next,
    };
    let header_len = if legacy { LEGACY_HEADER } else { HEADER };
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| bad(&format!("seek: {e}"), None, None))?;
    let mut header = [0u8; HEADER as usize];
    let header = &mut header[..header_len as usize];
    let got = read_full(file, header).map_err(|e| bad(&format!("read: {e}"), None, None))?;
    if got == 0 {
        return Ok(None);
    }
    if got < header.len() {
        return Err(bad("a record header is cut short (torn write)", None, None));
    }
    let len = le32(&header[0..4]);
    let (samples, crc) = if legacy {
        (None, le32(&header[4..8]))
    } else {
        if crc32fast::hash(&header[..12]) != le32(&header[12..16]) {
            return Err(bad(
                "a record header's checksum does not match (corrupt)",
                None,
                None,
            ));
        }
        (Some(le32(&header[4..8]) as usize), le32(&header[8..12]))
    };
    let end = offset + header_len + u64::from(len);
    // A length beyond the end of the file is a torn record: never allocate it.
    if end > size {
        return Err(bad("a record is cut short (torn write)", samples, None));
    }
    let next = samples.map(|_| end);
    let mut payload = vec![0u8; len as usize];
    file.read_exact(&mut payload)
        .map_err(|_| bad("a record is cut short (torn write)", samples, None))?;
    if crc32fast::hash(&payload) != crc {
        return Err(bad(
            "a record's checksum does not match (corrupt)",
            samples,
            next,
        ));
    }
    let batch: Batch = postcard::from_bytes(&payload)
        .map_err(|e| bad(&format!("a record does not decode ({e})"), samples, next))?;
    Ok(Some(Found {
        bytes: end - offset,
        batch,
    }))
}

/// After a damaged header at `from`: the offset of the next record whose header and payload
/// checksums both match, if any.
fn resync(file: &mut File, from: u64, size: u64) -> Option<u64> {
    let mut rest = Vec::new();
    file.seek(SeekFrom::Start(from)).ok()?;
    file.take(size.saturating_sub(from))
        .read_to_end(&mut rest)
        .ok()?;
    let h = HEADER as usize;
    (1..rest.len().saturating_sub(h - 1)).find_map(|p| {
        let header = &rest[p..p + h];
        if crc32fast::hash(&header[..12]) != le32(&header[12..16]) {
            return None;
        }
        let payload = rest.get(p + h..p + h + le32(&header[0..4]) as usize)?;
        (crc32fast::hash(payload) == le32(&header[8..12])).then_some(from + p as u64)
    })
}

/// Takes the spool's lock, waiting up to 5 s for a previous holder (the pipeline of a config
/// reload that is still winding down) to let go.
fn lock(dir: &Path) -> io::Result<nix::fcntl::Flock<File>> {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
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
                std::thread::sleep(Duration::from_millis(50));
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

/// Scans one segment from `offset`, adding its good records to `pending` and what it had to
/// skip to `recovered`.
fn scan_segment(
    path: &Path,
    seq: u64,
    offset: u64,
    pending: &mut VecDeque<Record>,
    recovered: &mut Recovered,
) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut magic = [0u8; MAGIC.len()];
    let legacy = !(read_full(&mut file, &mut magic)? == magic.len() && magic == MAGIC);
    let mut offset = if legacy {
        offset.min(size)
    } else {
        offset.clamp(MAGIC_LEN, size.max(MAGIC_LEN))
    };
    loop {
        match read_record(&mut file, offset, size, legacy) {
            Ok(Some(found)) => {
                let samples = found.batch.samples.len();
                pending.push_back(Record {
                    seq,
                    offset,
                    samples,
                    data: data_samples(&found.batch),
                    order: pending.len() as u64,
                });
                recovered.batches += 1;
                recovered.samples += samples;
                offset += found.bytes;
            }
            Ok(None) => break,
            Err(bad) => {
                let next = bad.next.or_else(|| {
                    // A damaged header (not one cut short at the end): look for the next
                    // good record.
                    (!legacy && bad.samples.is_none() && offset + HEADER <= size)
                        .then(|| resync(&mut file, offset, size))
                        .flatten()
                });
                let skipped = next.unwrap_or(size).saturating_sub(offset);
                recovered.corrupt_bytes += skipped;
                recovered.lost_samples += bad.samples.unwrap_or(0);
                let lost = match bad.samples {
                    Some(n) => format!("{n} samples lost"),
                    None => "the samples in them are lost, how many is not known".to_string(),
                };
                recovered.problems.push((
                    skipped,
                    format!(
                        "{}: {} at byte {offset}; {skipped} bytes skipped ({lost})",
                        path.display(),
                        bad.why
                    ),
                ));
                match next {
                    Some(next) => offset = next,
                    None => break,
                }
            }
        }
    }
    Ok(size)
}

impl Spool {
    /// Opens (creating) the spool in `dir`, recovering what a previous run left there.
    pub fn open(dir: &Path, options: Options) -> io::Result<(Self, Recovered)> {
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
            let from = if seq == cursor.0 { cursor.1 } else { 0 };
            let size = scan_segment(&path, seq, from, &mut pending, &mut recovered)?;
            segments.insert(seq, size);
        }
        let samples = recovered.samples;
        let next_seq = seqs.last().map_or(cursor.0, |s| s + 1).max(cursor.0);
        let segment_bytes = (options.max_bytes / 8).clamp(64 * 1024, 16 * 1024 * 1024);
        let spool = Self {
            _lock: lock,
            dir: dir.to_path_buf(),
            options,
            segment_bytes,
            state: Mutex::new(State {
                pending,
                cache: VecDeque::new(),
                cache_samples: 0,
                writer: None,
                segments,
                next_seq,
                samples,
                unsynced: Vec::new(),
                dir_unsynced: false,
                cursor,
                cursor_synced: cursor,
            }),
        };
        Ok((spool, recovered))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How often [`Self::sync`] is to run (zero: each append and acknowledgement syncs).
    pub fn sync_interval(&self) -> Duration {
        self.options.sync
    }

    /// Samples waiting.
    pub fn samples(&self) -> usize {
        self.lock().samples
    }

    /// The order of the oldest batch waiting.
    pub fn front_order(&self) -> Option<u64> {
        self.lock().pending.front().map(|r| r.order)
    }

    /// The order of the newest batch waiting.
    pub fn back_order(&self) -> Option<u64> {
        self.lock().pending.back().map(|r| r.order)
    }

    /// Begins a new segment (its magic written).
    fn rotate(&self, st: &mut State) -> io::Result<()> {
        // The segment closed here stays in `unsynced` if it has appends to sync.
        st.writer = None;
        let seq = st.next_seq;
        let path = segment_path(&self.dir, seq);
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        if let Err(e) = file.write_all(&MAGIC) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        st.next_seq += 1;
        st.segments.insert(seq, MAGIC_LEN);
        st.dir_unsynced = true;
        st.writer = Some(Writer {
            seq,
            file: Arc::new(file),
            size: MAGIC_LEN,
        });
        Ok(())
    }

    /// Appends a batch with the queue's `order`; returns the data samples of older batches
    /// dropped to stay within `max_bytes`. On an error nothing of the batch stays on disk.
    pub fn append(&self, batch: &Arc<Batch>, order: u64) -> io::Result<usize> {
        let payload = postcard::to_allocvec(batch.as_ref())
            .map_err(|e| io::Error::other(format!("encode: {e}")))?;
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::other("a batch larger than 4 GiB cannot be spooled"))?;
        let data = data_samples(batch);
        let mut header = [0u8; HEADER as usize];
        header[0..4].copy_from_slice(&len.to_le_bytes());
        header[4..8].copy_from_slice(&u32::try_from(data).unwrap_or(u32::MAX).to_le_bytes());
        header[8..12].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        let header_crc = crc32fast::hash(&header[..12]);
        header[12..16].copy_from_slice(&header_crc.to_le_bytes());
        let record_bytes = HEADER + u64::from(len);
        let mut st = self.lock();
        let dropped = self.make_room(&mut st, record_bytes);
        if st
            .writer
            .as_ref()
            .is_none_or(|w| w.size > MAGIC_LEN && w.size + record_bytes > self.segment_bytes)
        {
            self.rotate(&mut st)?;
        }
        let Some(w) = st.writer.as_mut() else {
            return Err(io::Error::other("no spool segment open"));
        };
        let mut record = Vec::with_capacity(payload.len() + HEADER as usize);
        record.extend_from_slice(&header);
        record.extend_from_slice(&payload);
        let mut written = (&*w.file).write_all(&record);
        if written.is_ok() && self.options.sync.is_zero() {
            written = w.file.sync_data();
        }
        if let Err(e) = written {
            // A full disk may have taken part of the record: cut it back, so that the next
            // record starts where the spool thinks it does. If even that fails, seal the
            // segment (its records are all known) and begin the next one at the next append.
            let (seq, size) = (w.seq, w.size);
            if let Err(cut) = w.file.set_len(size) {
                tracing::warn!(
                    "spool {}: cannot cut segment {seq} back to {size} bytes after a failed append ({cut}); it is sealed",
                    self.dir.display()
                );
                if let Some(w) = st.writer.take() {
                    st.unsynced.push(w.file);
                }
            }
            return Err(e);
        }
        let r = Record {
            seq: w.seq,
            offset: w.size,
            samples: batch.samples.len(),
            data,
            order,
        };
        w.size += record_bytes;
        let (seq, size, file) = (w.seq, w.size, Arc::clone(&w.file));
        st.segments.insert(seq, size);
        if self.options.sync.is_zero() {
            if std::mem::take(&mut st.dir_unsynced) {
                sync_dir(&self.dir)?;
            }
        } else if !st.unsynced.iter().any(|f| Arc::ptr_eq(f, &file)) {
            st.unsynced.push(file);
        }
        st.pending.push_back(r);
        st.samples += r.samples;
        st.cache.push_back((r.id(), Arc::clone(batch)));
        st.cache_samples += r.samples;
        while st.cache_samples > self.options.cache_limit && st.cache.len() > 1 {
            if let Some((_, old)) = st.cache.pop_front() {
                st.cache_samples -= old.samples.len();
            }
        }
        Ok(dropped)
    }

    /// Drops the oldest batches until `incoming` more bytes fit; returns their data samples.
    fn make_room(&self, st: &mut State, incoming: u64) -> usize {
        let mut dropped = 0;
        loop {
            let total: u64 = st.segments.values().sum();
            if total + incoming <= self.options.max_bytes || st.pending.is_empty() {
                break;
            }
            // Drop the whole oldest segment's batches, so its file can go.
            let oldest = st.pending.front().map(|r| r.seq);
            while st.pending.front().map(|r| r.seq) == oldest {
                if let Some(r) = st.pending.pop_front() {
                    dropped += r.data;
                    st.samples -= r.samples;
                }
            }
            if oldest == st.writer.as_ref().map(|w| w.seq) {
                // The current segment itself was dropped: the next append begins a new one.
                if let Some(w) = st.writer.take() {
                    st.unsynced.retain(|f| !Arc::ptr_eq(f, &w.file));
                }
            }
            self.remove_delivered_segments(st);
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
            st.dir_unsynced = true;
        }
    }

    /// The oldest batches not yet acknowledged whose order is below `before`, as many as fit
    /// in `max_samples` (at least one). A record that cannot be read back is dropped and its
    /// data samples returned as the second value.
    pub fn front_group(
        &self,
        max_samples: usize,
        before: u64,
    ) -> (Vec<(RecordId, Arc<Batch>)>, usize) {
        let mut st = self.lock();
        let mut lost = 0;
        let mut group: Vec<(RecordId, Arc<Batch>)> = Vec::new();
        let mut samples = 0;
        let mut at = 0;
        // The segment being read back, opened once for all its records in this group.
        let mut segment: Option<(u64, File, u64)> = None;
        while let Some(r) = st.pending.get(at).copied() {
            if r.order >= before || (!group.is_empty() && samples + r.samples > max_samples) {
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
                Some((_, file, size)) => read_record(file, r.offset, *size, false)
                    .or_else(|_| read_record(file, r.offset, *size, true))
                    .map_err(|bad| bad.why),
                None => Err("the segment file cannot be opened".to_string()),
            };
            match read {
                Ok(Some(found)) => {
                    group.push((r.id(), Arc::new(found.batch)));
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
                        r.data
                    );
                    st.pending.pop_front();
                    st.samples -= r.samples;
                    lost += r.data;
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
        self.record_progress(st);
    }

    /// Moves the cursor to the first record not acknowledged: written at once (a crash of the
    /// agent repeats nothing), made durable at the next sync (or now with a zero interval).
    fn record_progress(&self, mut st: std::sync::MutexGuard<'_, State>) {
        st.cursor = match st.pending.front() {
            Some(r) => r.id(),
            None => match &st.writer {
                Some(w) => (w.seq, w.size),
                None => (st.next_seq, 0),
            },
        };
        let cursor = st.cursor;
        let durable = self.options.sync.is_zero();
        drop(st);
        match self.write_cursor(cursor, durable) {
            Ok(()) if durable => self.lock().cursor_synced = cursor,
            Ok(()) => {}
            Err(e) => tracing::warn!(
                "spool {}: cannot record progress ({e}); delivered batches may be sent again after a restart",
                self.dir.display()
            ),
        }
    }

    fn write_cursor(&self, (seq, offset): RecordId, durable: bool) -> io::Result<()> {
        let tmp = self.dir.join("cursor.tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(format!("{seq} {offset}\n").as_bytes())?;
        if durable {
            file.sync_data()?;
        }
        drop(file);
        fs::rename(&tmp, self.dir.join("cursor"))?;
        if durable {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Drops everything waiting; returns the data samples.
    pub fn clear(&self) -> usize {
        let mut st = self.lock();
        let data = st.pending.iter().map(|r| r.data).sum();
        st.pending.clear();
        st.cache.clear();
        st.cache_samples = 0;
        st.samples = 0;
        self.remove_delivered_segments(&mut st);
        self.record_progress(st);
        data
    }

    /// Makes what was appended and acknowledged so far durable: the segments written since
    /// the last sync, the directory, the cursor. Runs every `sync` interval and at shutdown.
    pub fn sync(&self) -> io::Result<()> {
        let (files, dir, cursor) = {
            let mut st = self.lock();
            let files = std::mem::take(&mut st.unsynced);
            let dir = std::mem::take(&mut st.dir_unsynced);
            let cursor = (st.cursor != st.cursor_synced).then_some(st.cursor);
            (files, dir, cursor)
        };
        for file in &files {
            file.sync_data()?;
        }
        if let Some(cursor) = cursor {
            self.write_cursor(cursor, true)?;
            self.lock().cursor_synced = cursor;
        } else if dir {
            sync_dir(&self.dir)?;
        }
        Ok(())
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

    fn options(max_bytes: u64, cache_limit: usize) -> Options {
        Options {
            max_bytes,
            cache_limit,
            sync: Duration::from_secs(1),
        }
    }

    fn open(dir: &Path) -> (Spool, Recovered) {
        Spool::open(dir, options(1 << 20, 1000)).expect("open")
    }

    fn append_all(spool: &Spool, values: impl IntoIterator<Item = (usize, f64)>) {
        for (order, (n, v)) in values.into_iter().enumerate() {
            spool.append(&batch(n, v), order as u64).expect("append");
        }
    }

    fn values(spool: &Spool) -> Vec<f64> {
        let mut out = Vec::new();
        while let Some((id, b)) = spool.front_group(1, u64::MAX).0.pop() {
            out.push(b.samples[0].value);
            spool.ack(id);
        }
        out
    }

    fn only_segment(dir: &Path) -> PathBuf {
        let segs: Vec<PathBuf> = fs::read_dir(dir)
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        assert_eq!(segs.len(), 1, "{segs:?}");
        segs[0].clone()
    }

    /// The offsets of the records of a segment in the current format.
    fn record_offsets(seg: &Path) -> Vec<usize> {
        let bytes = fs::read(seg).expect("read");
        assert_eq!(bytes[..8], MAGIC);
        let mut at = 8;
        let mut out = Vec::new();
        while at < bytes.len() {
            out.push(at);
            at += 16 + le32(&bytes[at..at + 4]) as usize;
        }
        out
    }

    #[test]
    fn batches_survive_a_reopen_in_order_and_acknowledged_ones_stay_delivered() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let (spool, rec) = open(dir.path());
            assert_eq!(rec.batches, 0);
            append_all(&spool, (1..=5).map(|v| (3, f64::from(v))));
            let Some((id, b)) = spool.front_group(1, u64::MAX).0.pop() else {
                panic!("front")
            };
            assert_eq!(b.samples[0].value, 1.0);
            spool.ack(id);
        }
        let (spool, rec) = open(dir.path());
        assert_eq!((rec.batches, rec.samples, rec.corrupt_bytes), (4, 12, 0));
        assert_eq!(spool.front_order(), Some(0), "recovered orders start at 0");
        assert_eq!(spool.back_order(), Some(3));
        spool.append(&batch(1, 6.0), 4).expect("append");
        assert_eq!(values(&spool), vec![2.0, 3.0, 4.0, 5.0, 6.0]);
        spool.sync().expect("sync");
        drop(spool);
        let (_, rec) = open(dir.path());
        assert_eq!(rec.batches, 0, "all acknowledged");
    }

    #[test]
    fn a_spool_in_use_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().expect("tmp");
        let (first, _) = open(dir.path());
        let Err(e) = Spool::open(dir.path(), options(1 << 20, 10)) else {
            panic!("a second open succeeded")
        };
        assert!(e.to_string().contains("in use by another metricsd"), "{e}");
        drop(first);
        assert!(
            Spool::open(dir.path(), options(1 << 20, 10)).is_ok(),
            "free again"
        );
    }

    #[test]
    fn groups_take_consecutive_batches_up_to_a_sample_budget_and_an_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, _) = Spool::open(dir.path(), options(1 << 20, 4)).expect("open");
        append_all(&spool, (1..=5).map(|v| (3, f64::from(v))));
        // Batches 1 and 2 were evicted from the memory cache (4 samples): read from disk.
        let (group, lost) = spool.front_group(7, u64::MAX);
        assert_eq!(lost, 0);
        let values: Vec<f64> = group.iter().map(|(_, b)| b.samples[0].value).collect();
        assert_eq!(values, vec![1.0, 2.0]);
        spool.ack(group[1].0);
        // A batch waiting in memory with order 3 comes before the spool's order 3 and 4.
        let (group, _) = spool.front_group(100, 3);
        assert_eq!(group.len(), 1);
        let (group, _) = spool.front_group(100, u64::MAX);
        assert_eq!(group.len(), 3);
        assert_eq!(group[0].1.samples[0].value, 3.0);
        // A single batch larger than the budget still goes alone.
        let (group, _) = spool.front_group(1, u64::MAX);
        assert_eq!(group.len(), 1);
    }

    #[test]
    fn a_torn_tail_is_skipped_and_its_samples_counted() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let (spool, _) = open(dir.path());
            append_all(&spool, [(2, 1.0), (2, 2.0), (3, 3.0)]);
        }
        let seg = only_segment(dir.path());
        // Power loss in the middle of the third append.
        let len = fs::metadata(&seg).expect("meta").len();
        let f = OpenOptions::new().write(true).open(&seg).expect("open");
        f.set_len(len - 5).expect("truncate");
        let (spool, rec) = open(dir.path());
        assert_eq!(rec.batches, 2);
        assert!(rec.corrupt_bytes > 0);
        assert_eq!(rec.lost_samples, 3, "the torn record's samples");
        assert!(rec.problems[0].1.contains("torn"), "{:?}", rec.problems);
        assert!(
            rec.problems[0].1.contains("3 samples lost"),
            "{:?}",
            rec.problems
        );
        assert_eq!(values(&spool), vec![1.0, 2.0]);
    }

    #[test]
    fn a_flipped_bit_loses_that_record_alone() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let (spool, _) = open(dir.path());
            append_all(&spool, [(2, 1.0), (4, 2.0), (2, 3.0)]);
        }
        let seg = only_segment(dir.path());
        let at = record_offsets(&seg);
        let mut bytes = fs::read(&seg).expect("read");
        bytes[at[2] - 3] ^= 0x40; // in the second record's payload
        fs::write(&seg, bytes).expect("write");
        let (spool, rec) = open(dir.path());
        assert!(rec.problems[0].1.contains("checksum"), "{:?}", rec.problems);
        assert_eq!(rec.lost_samples, 4);
        assert_eq!(rec.corrupt_bytes, (at[2] - at[1]) as u64);
        assert_eq!(
            values(&spool),
            vec![1.0, 3.0],
            "the record after it is read"
        );
    }

    #[test]
    fn after_a_damaged_header_the_next_good_record_is_found() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let (spool, _) = open(dir.path());
            append_all(&spool, [(2, 1.0), (4, 2.0), (2, 3.0), (2, 4.0)]);
        }
        let seg = only_segment(dir.path());
        let at = record_offsets(&seg);
        let mut bytes = fs::read(&seg).expect("read");
        bytes[at[1]] ^= 0x01; // the second record's length
        fs::write(&seg, bytes).expect("write");
        let (spool, rec) = open(dir.path());
        assert!(rec.problems[0].1.contains("header"), "{:?}", rec.problems);
        assert!(
            rec.problems[0].1.contains("not known"),
            "{:?}",
            rec.problems
        );
        assert_eq!(rec.corrupt_bytes, (at[2] - at[1]) as u64);
        assert_eq!(values(&spool), vec![1.0, 3.0, 4.0]);
    }

    #[test]
    fn segments_of_the_old_format_are_still_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut old = Vec::new();
        for v in [1.0, 2.0] {
            let payload = postcard::to_allocvec(batch(2, v).as_ref()).expect("encode");
            old.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            old.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            old.extend_from_slice(&payload);
        }
        fs::write(segment_path(dir.path(), 0), old).expect("write");
        let (spool, rec) = open(dir.path());
        assert_eq!((rec.batches, rec.corrupt_bytes), (2, 0));
        spool.append(&batch(1, 3.0), 2).expect("append");
        assert_eq!(values(&spool), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn a_full_spool_drops_the_oldest_batches_and_counts_them() {
        let dir = tempfile::tempdir().expect("tmp");
        // 64 KiB budget; each batch is ~1 KiB+.
        let (spool, _) = Spool::open(dir.path(), options(64 * 1024, 10)).expect("open");
        let mut dropped = 0;
        for v in 0..400u32 {
            dropped += spool
                .append(&batch(50, f64::from(v)), u64::from(v))
                .expect("append");
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

    #[test]
    fn staleness_markers_are_carried_but_not_counted_as_data() {
        let mut b = BatchBuilder::new();
        let f = b.gauge("x", "", "");
        b.sample(f, &[("i", "0")], 1.0);
        b.sample(
            f,
            &[("i", "1")],
            f64::from_bits(metricsd_plugin_api::STALE_NAN_BITS),
        );
        assert_eq!(data_samples(&b.finish()), 1);
    }

    #[test]
    fn with_a_zero_sync_interval_the_cursor_is_durable_at_each_acknowledgement() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, _) = Spool::open(
            dir.path(),
            Options {
                sync: Duration::ZERO,
                ..options(1 << 20, 10)
            },
        )
        .expect("open");
        append_all(&spool, [(1, 1.0), (1, 2.0)]);
        let (group, _) = spool.front_group(1, u64::MAX);
        spool.ack(group[0].0);
        let st = spool.lock();
        assert_eq!(st.cursor, st.cursor_synced);
        assert!(st.unsynced.is_empty() && !st.dir_unsynced);
    }
}
