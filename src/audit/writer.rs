//! The writer: one thread owns the trail files. Requests submit their facts
//! through a channel and wait; the thread takes every record waiting (group
//! commit), appends the batch, flushes and fsyncs once, then wakes each
//! submitter with its seq. A response is sent only after that.
//!
//! Seals: after `seal_every_records` records, every `seal_interval` while some
//! record is unsealed, before each rotation and at shutdown.
//!
//! Rotation: once a file reaches `max_file_bytes` it is sealed and a new file
//! named after the next seq is started; its first record chains from the last
//! record of the previous file, so the chain spans files.
//!
//! Fail closed: when a write or fsync fails, the partial batch is truncated
//! away, the trail is marked down with the reason, every waiting submitter gets
//! an error and new submissions are refused at once. Every [`RETRY_INTERVAL`]
//! the thread tries to write a `notice` record (`trail_recovered`, with how
//! many requests were refused and since when); when that succeeds the trail is
//! up again, without a restart.
//!
//! A lock file (`.lock`, an exclusive `flock`) keeps two processes from writing
//! one directory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::record::{
    self, Fields, GENESIS, RequestFacts, fields_of, file_name, parse_file_name, seal_fields,
    seal_message,
};
use super::{AuditError, AuditSettings, Sealer};
use crate::domain::journal::{ChangeJournal, ChangeRecord, JournalFuture};

/// How often a down trail tries to recover.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(500);
/// How long a request waits for its record to be durable before it gets 503.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most records in one batch.
const MAX_BATCH: usize = 1024;
/// Requests that may wait for the writer at once.
const QUEUE: usize = 4096;

/// Told about the writer's work (metrics).
pub trait AuditObserver: Send + Sync + std::fmt::Debug {
    /// A batch of `records` made durable; the write and fsync took `elapsed`.
    fn batch(&self, records: usize, elapsed: Duration);
    /// A seal was written (`true`) or could not be made (`false`).
    fn seal(&self, ok: bool);
    /// The trail went down (`true`) or came back (`false`).
    fn down(&self, down: bool);
    /// A request was refused because the trail is down.
    fn refused(&self);
}

/// An observer that does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAuditObserver;

impl AuditObserver for NoAuditObserver {
    fn batch(&self, _: usize, _: Duration) {}
    fn seal(&self, _: bool) {}
    fn down(&self, _: bool) {}
    fn refused(&self) {}
}

/// Where a submitter waits for its record's seq.
type Reply = tokio::sync::oneshot::Sender<Result<u64, AuditError>>;

/// A record to append: its fields and its kind.
type Entry = (Fields, &'static str);

enum Job {
    Record(Box<Entry>, Reply),
    Close(tokio::sync::oneshot::Sender<()>),
}

#[derive(Debug, Default)]
struct Health {
    down: AtomicBool,
    reason: Mutex<DownReason>,
    refused: AtomicU64,
}

/// The trail, as the HTTP layer sees it: submit a record and wait until it is
/// durable; ask whether it is down and why.
#[derive(Clone, Debug)]
pub struct Trail {
    jobs: SyncSender<Job>,
    health: Arc<Health>,
    observer: Arc<dyn AuditObserver>,
    directory: PathBuf,
    /// The writer thread, joined by [`Trail::close`].
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// A record the writer has in its queue.
#[derive(Debug)]
pub struct Queued(tokio::sync::oneshot::Receiver<Result<u64, AuditError>>);

/// Waits until a queued record is durable; returns its seq.
///
/// # Errors
/// `Down` when the write failed; `Timeout`; `Stopped`.
pub async fn durable(queued: Queued) -> Result<u64, AuditError> {
    match tokio::time::timeout(WRITE_TIMEOUT, queued.0).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(AuditError::Stopped),
        Err(_) => Err(AuditError::Timeout(WRITE_TIMEOUT)),
    }
}

/// The service's change records go into the trail's one chain, queued at once.
impl ChangeJournal for Trail {
    fn record(&self, record: ChangeRecord) -> JournalFuture {
        let queued = self.enqueue_change(&record);
        Box::pin(async move {
            durable(queued?)
                .await
                .map(|_| ())
                .map_err(|e| Box::new(e) as _)
        })
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Job::Record(..) => "Job::Record",
            Job::Close(_) => "Job::Close",
        })
    }
}

impl Trail {
    /// Opens (or creates) the trail directory, takes its lock, finds the chain
    /// head in the last file, writes a `trail_opened` notice and starts the
    /// writer thread. Blocking. If the notice cannot be written, the trail
    /// starts down and recovers by itself.
    ///
    /// # Errors
    /// `Locked`, `Io` (directory or lock), `Corrupt` (unreadable last record).
    pub fn open(
        settings: &AuditSettings,
        sealer: Arc<dyn Sealer>,
        observer: Arc<dyn AuditObserver>,
    ) -> Result<Trail, AuditError> {
        let dir = settings.directory.clone();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AuditError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let lock_path = dir.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(AuditError::Locked(dir)),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let (head, target) = find_head(&dir)?;
        let health = Arc::new(Health::default());
        let (jobs, queue) = mpsc::sync_channel(QUEUE);
        let mut writer = Writer {
            dir: dir.clone(),
            settings: settings.clone(),
            sealer,
            observer: Arc::clone(&observer),
            health: Arc::clone(&health),
            file: None,
            target,
            next_seq: head.0 + 1,
            prev: head.1,
            unsealed: 0,
            last_seal: Instant::now(),
            seal_backoff: None,
            down_since: None,
            _lock: lock,
        };
        writer.notice("trail_opened", Fields::new());
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(&queue))
            .map_err(io(&dir))?;
        Ok(Trail {
            jobs,
            health,
            observer,
            directory: dir,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// The trail's directory.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// Why the trail is down, or `None` while it is up.
    pub fn down_reason(&self) -> Option<DownReason> {
        self.health
            .down
            .load(Ordering::SeqCst)
            .then(|| *self.health.reason.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Counts a request refused before it ran because the trail is down (the
    /// count goes into the `trail_recovered` notice).
    pub fn refuse(&self) {
        self.health.refused.fetch_add(1, Ordering::SeqCst);
        self.observer.refused();
    }

    /// Appends a request's record and waits until it is durable; returns its seq.
    ///
    /// # Errors
    /// `Down` when the trail is down or the write failed; `Timeout`; `Stopped`.
    pub async fn append(&self, facts: RequestFacts) -> Result<u64, AuditError> {
        let queued = self.enqueue(fields_of(&facts), "request")?;
        durable(queued).await
    }

    /// Appends a change record (made before a store transaction may commit,
    /// or after one did not) and waits until it is durable; returns its seq.
    ///
    /// # Errors
    /// As [`Trail::append`].
    /// Queues a change record (made before a store transaction may commit, or
    /// after one did not) for the writer at once; wait for it with [`durable`].
    ///
    /// # Errors
    /// `Down` when the trail is down; `QueueFull`; `Stopped`.
    pub fn enqueue_change(&self, change: &ChangeRecord) -> Result<Queued, AuditError> {
        let mut fields = Fields::new();
        let mut put = |key: &str, value: Value| {
            fields.insert(key.to_owned(), value);
        };
        put("time", Value::from(record::time_text(change.time_ms)));
        put("request_id", Value::from(change.request_id.as_str()));
        put("client", Value::from(change.client.as_str()));
        put("operation", Value::from(change.operation));
        put("masked_pan", Value::from(change.masked_pan.clone()));
        put("programme", Value::from(change.programme.clone()));
        put("phase", Value::from(change.phase.as_str()));
        self.enqueue(fields, "change")
    }

    fn enqueue(&self, fields: Fields, kind: &'static str) -> Result<Queued, AuditError> {
        if let Some(reason) = self.down_reason() {
            return Err(AuditError::Down(reason));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .try_send(Job::Record(Box::new((fields, kind)), tx))
            .map_err(|e| match e {
                mpsc::TrySendError::Full(_) => AuditError::QueueFull,
                mpsc::TrySendError::Disconnected(_) => AuditError::Stopped,
            })?;
        Ok(Queued(rx))
    }

    /// Seals what is unsealed and stops the writer (after the drain).
    ///
    /// Once the writer has answered, its thread is joined: it holds the seal
    /// key's token handle, which must be gone before the token is finalized
    /// (a thread still releasing it while the process exits crashed SoftHSM).
    pub async fn close(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.jobs.send(Job::Close(tx)).is_err() {
            return;
        }
        if !matches!(tokio::time::timeout(WRITE_TIMEOUT, rx).await, Ok(Ok(()))) {
            return; // a writer stuck in a write is not waited for
        }
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The chain head `(seq, hash)` of the trail in `dir`, and the file to append to.
fn find_head(dir: &Path) -> Result<((u64, String), PathBuf), AuditError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AuditError::Io { path, source }
    };
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            parse_file_name(name.to_str()?).map(|seq| (seq, e.path()))
        })
        .collect();
    files.sort();
    let Some((last_first_seq, last_path)) = files.last().cloned() else {
        return Ok(((0, GENESIS.to_owned()), dir.join(file_name(1))));
    };
    for (first_seq, path) in files.iter().rev() {
        let Some(fields) = last_record(path)? else {
            continue;
        };
        let seq = fields.get("seq").and_then(Value::as_u64);
        let hash = fields
            .get("hash")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let (Some(seq), Some(hash)) = (seq, hash) else {
            return Err(AuditError::Corrupt(path.clone()));
        };
        if record::hash_of(&fields) != hash || seq < *first_seq {
            return Err(AuditError::Corrupt(path.clone()));
        }
        // Append to the last file when it continues this one (or is this one).
        let target = if *path == last_path || last_first_seq == seq + 1 {
            last_path
        } else {
            dir.join(file_name(seq + 1))
        };
        return Ok(((seq, hash), target));
    }
    // Only empty files: a fresh trail, whatever the empty file is called.
    if last_first_seq == 1 {
        Ok(((0, GENESIS.to_owned()), last_path))
    } else {
        Err(AuditError::Corrupt(last_path))
    }
}

/// The last complete record of a file; a partial last line (a write that never
/// completed, so was never acknowledged) is truncated away first.
fn last_record(path: &Path) -> Result<Option<Fields>, AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io)?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        tracing::warn!(file = %path.display(), bytes = bytes.len() - complete, "audit: truncating a partial last line (never acknowledged)");
        file.set_len(complete as u64).map_err(io)?;
        file.sync_all().map_err(io)?;
        bytes.truncate(complete);
    }
    let Some(line) = bytes[..complete.saturating_sub(1)]
        .rsplit(|&b| b == b'\n')
        .next()
        .filter(|l| !l.is_empty())
    else {
        return Ok(None);
    };
    serde_json::from_slice(line)
        .map(Some)
        .map_err(|_| AuditError::Corrupt(path.to_path_buf()))
}

struct Writer {
    dir: PathBuf,
    settings: AuditSettings,
    sealer: Arc<dyn Sealer>,
    observer: Arc<dyn AuditObserver>,
    health: Arc<Health>,
    file: Option<(File, u64)>,
    target: PathBuf,
    next_seq: u64,
    prev: String,
    unsealed: u64,
    last_seal: Instant,
    /// After a failed seal, no new attempt before this (the token may be slow
    /// to fail, and the writer must not stall every batch on it).
    seal_backoff: Option<Instant>,
    down_since: Option<u64>,
    _lock: File,
}

impl Writer {
    fn run(mut self, queue: &mpsc::Receiver<Job>) {
        loop {
            let wait = if self.down_since.is_some() {
                RETRY_INTERVAL
            } else {
                self.settings
                    .seal_interval
                    .saturating_sub(self.last_seal.elapsed())
                    .max(Duration::from_millis(10))
            };
            match queue.recv_timeout(wait) {
                Ok(Job::Record(facts, reply)) => {
                    let mut batch = vec![(facts, reply)];
                    let mut close = None;
                    while batch.len() < MAX_BATCH {
                        match queue.try_recv() {
                            Ok(Job::Record(f, r)) => batch.push((f, r)),
                            Ok(Job::Close(r)) => {
                                close = Some(r);
                                break;
                            }
                            Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                        }
                    }
                    self.commit(batch);
                    if let Some(reply) = close {
                        self.close(reply);
                        return;
                    }
                }
                Ok(Job::Close(reply)) => {
                    self.close(reply);
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.down_since.is_some() {
                        self.recover();
                    } else if self.unsealed > 0 {
                        self.seal();
                    } else {
                        self.last_seal = Instant::now();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    if self.down_since.is_none() && self.unsealed > 0 {
                        self.seal();
                    }
                    return;
                }
            }
        }
    }

    fn close(&mut self, reply: tokio::sync::oneshot::Sender<()>) {
        if self.down_since.is_none() && self.unsealed > 0 {
            self.seal();
        }
        *self.health.reason.lock().unwrap_or_else(|p| p.into_inner()) = DownReason::Closed;
        self.health.down.store(true, Ordering::SeqCst);
        let _ = reply.send(());
    }

    fn commit(&mut self, batch: Vec<(Box<Entry>, Reply)>) {
        if let Some(reason) = self.down_reason() {
            for (_, reply) in batch {
                self.health.refused.fetch_add(1, Ordering::SeqCst);
                let _ = reply.send(Err(AuditError::Down(reason)));
            }
            return;
        }
        let (records, replies): (Vec<Entry>, Vec<Reply>) = batch
            .into_iter()
            .map(|(entry, reply)| (*entry, reply))
            .unzip();
        match self.append(records) {
            Ok(first) => {
                for (i, reply) in replies.into_iter().enumerate() {
                    let _ = reply.send(Ok(first + i as u64));
                }
                // By count, or by time under steady load (when the queue never
                // falls idle long enough for the timer).
                if self.unsealed >= self.settings.seal_every_records
                    || self.last_seal.elapsed() >= self.settings.seal_interval
                {
                    self.seal();
                }
                if self
                    .file
                    .as_ref()
                    .is_some_and(|(_, len)| *len >= self.settings.max_file_bytes)
                {
                    self.rotate();
                }
            }
            Err(reason) => {
                for reply in replies {
                    let _ = reply.send(Err(AuditError::Down(reason)));
                }
            }
        }
    }

    fn down_reason(&self) -> Option<DownReason> {
        self.down_since
            .map(|_| *self.health.reason.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Appends records as one write and one fsync; on failure truncates back,
    /// marks the trail down and returns the reason. Returns the first seq.
    fn append(&mut self, records: Vec<(Fields, &'static str)>) -> Result<u64, DownReason> {
        let started = Instant::now();
        let count = records.len();
        let first = self.next_seq;
        let mut seq = first;
        let mut prev = self.prev.clone();
        let mut buffer = Vec::new();
        for (fields, kind) in records {
            let (line, hash) = seal_fields(fields, seq, &prev, kind);
            buffer.extend_from_slice(&line);
            prev = hash;
            seq += 1;
        }
        match self.write(&buffer) {
            Ok(()) => {
                self.next_seq = seq;
                self.prev = prev;
                self.unsealed += count as u64;
                self.observer.batch(count, started.elapsed());
                Ok(first)
            }
            Err(e) => {
                let reason = DownReason::of(&e);
                if self.down_since.is_none() {
                    tracing::error!(directory = %self.dir.display(), error = %e, "audit trail write failed; refusing requests until it recovers");
                }
                self.go_down(reason);
                Err(reason)
            }
        }
    }

    /// Writes and fsyncs `bytes` at the end of the target file; on failure
    /// truncates back to the length before and forgets the file handle.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() {
            let new = !self.target.exists();
            let mut options = OpenOptions::new();
            options.create(true).append(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
            let mut file = options.open(&self.target)?;
            let len = file.seek(SeekFrom::End(0))?;
            if new {
                File::open(&self.dir)?.sync_all()?;
            }
            self.file = Some((file, len));
        }
        let Some((file, len)) = self.file.as_mut() else {
            return Err(std::io::Error::other("no trail file"));
        };
        let before = *len;
        let written = file
            .write_all(bytes)
            .and_then(|()| file.flush())
            .and_then(|()| file.sync_data());
        match written {
            Ok(()) => {
                *len = before + bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Best effort: leave no partial line behind (a later start
                // truncates one anyway).
                if file
                    .set_len(before)
                    .and_then(|()| file.sync_data())
                    .is_err()
                {
                    tracing::warn!("audit: could not truncate a partial write");
                }
                self.file = None;
                Err(e)
            }
        }
    }

    fn go_down(&mut self, reason: DownReason) {
        *self.health.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        if self.down_since.is_none() {
            self.down_since = Some(record::now_ms());
            self.health.down.store(true, Ordering::SeqCst);
            self.observer.down(true);
        }
    }

    /// Writes a `notice` record; a failure marks the trail down.
    fn notice(&mut self, event: &str, mut fields: Fields) -> bool {
        fields.insert(
            "time".into(),
            Value::from(record::time_text(record::now_ms())),
        );
        fields.insert("event".into(), Value::from(event));
        self.append(vec![(fields, "notice")]).is_ok()
    }

    fn recover(&mut self) {
        let Some(since) = self.down_since else {
            return;
        };
        let refused = self.health.refused.load(Ordering::SeqCst);
        let mut fields = Fields::new();
        fields.insert("down_since".into(), Value::from(record::time_text(since)));
        fields.insert("refused_requests".into(), Value::from(refused));
        if self.notice("trail_recovered", fields) {
            self.down_since = None;
            self.health.refused.fetch_sub(refused, Ordering::SeqCst);
            self.health.down.store(false, Ordering::SeqCst);
            self.observer.down(false);
            tracing::info!(refused, "audit trail recovered");
        }
    }

    /// Appends a seal over the current head. A seal that cannot be made (token
    /// unavailable) is retried later; records stay chained meanwhile.
    fn seal(&mut self) {
        if self.seal_backoff.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.last_seal = Instant::now();
        let seq = self.next_seq;
        let message = seal_message(seq, &self.prev);
        let mac = match self.sealer.seal(&message) {
            Ok(mac) => mac,
            Err(e) => {
                tracing::warn!(error = %e, "audit: could not seal (retried later)");
                self.observer.seal(false);
                self.seal_backoff = Some(Instant::now() + RETRY_INTERVAL * 2);
                return;
            }
        };
        self.seal_backoff = None;
        let (label, kcv) = self.sealer.key();
        let mut fields = Fields::new();
        fields.insert(
            "time".into(),
            Value::from(record::time_text(record::now_ms())),
        );
        fields.insert("key_label".into(), Value::from(label.to_string()));
        fields.insert("key_kcv".into(), Value::from(kcv));
        fields.insert("mac".into(), Value::from(hex::encode(mac)));
        fields.insert("sealed_records".into(), Value::from(self.unsealed));
        let head = self.prev.clone();
        if self.append(vec![(fields, "seal")]).is_ok() {
            self.unsealed = 0;
            self.observer.seal(true);
            tracing::info!(seq, head = %head, "audit trail sealed");
        }
    }

    fn rotate(&mut self) {
        if self.unsealed > 0 {
            self.seal();
        }
        if self.down_since.is_some() {
            return;
        }
        self.file = None;
        self.target = self.dir.join(file_name(self.next_seq));
        tracing::info!(file = %self.target.display(), "audit trail rotated");
    }
}

impl Drop for Writer {
    /// The writer is gone (closed at shutdown, or a bug): no record can be
    /// written any more, so the trail is down from now on.
    fn drop(&mut self) {
        *self.health.reason.lock().unwrap_or_else(|p| p.into_inner()) = DownReason::WriterStopped;
        self.health.down.store(true, Ordering::SeqCst);
    }
}

/// Why the trail is down: a short, stable text for `/readyz`, the log and
/// the notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DownReason {
    /// The device is full.
    NoSpace,
    /// The file system is read-only.
    ReadOnly,
    /// The trail's file may not be written.
    PermissionDenied,
    /// Another write or fsync failure.
    WriteFailed(std::io::ErrorKind),
    /// Closed at shutdown.
    Closed,
    /// The writer thread is gone.
    #[default]
    WriterStopped,
}

impl DownReason {
    /// The reason of a failed write or fsync.
    pub fn of(e: &std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::StorageFull => DownReason::NoSpace,
            std::io::ErrorKind::ReadOnlyFilesystem => DownReason::ReadOnly,
            std::io::ErrorKind::PermissionDenied => DownReason::PermissionDenied,
            kind => DownReason::WriteFailed(kind),
        }
    }
}

impl std::fmt::Display for DownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DownReason::NoSpace => f.write_str("no space left on the trail's device"),
            DownReason::ReadOnly => f.write_str("the trail's file system is read-only"),
            DownReason::PermissionDenied => f.write_str("permission denied on the trail's file"),
            DownReason::WriteFailed(kind) => write!(f, "write failed: {kind}"),
            DownReason::Closed => f.write_str("the audit trail is closed"),
            DownReason::WriterStopped => f.write_str("the audit writer has stopped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{SealChecker, VerifyOptions, verify_paths};
    use crate::hsm::{HsmError, KeyLabel};
    use hmac::{Hmac, Mac};

    /// A software stand-in for the token's audit-seal key.
    #[derive(Debug)]
    struct SoftSealer(KeyLabel);

    fn mac(message: &[u8]) -> Vec<u8> {
        let mut m = Hmac::<sha2::Sha256>::new_from_slice(b"unit-test-seal-key").unwrap();
        m.update(message);
        m.finalize().into_bytes().to_vec()
    }

    impl Sealer for SoftSealer {
        fn key(&self) -> (&KeyLabel, String) {
            (&self.0, "ABCDEF".into())
        }
        fn seal(&self, message: &[u8]) -> Result<Vec<u8>, HsmError> {
            Ok(mac(message))
        }
    }

    impl SealChecker for SoftSealer {
        fn check(&self, _: &KeyLabel, message: &[u8], tag: &[u8]) -> Result<bool, HsmError> {
            Ok(mac(message) == tag)
        }
    }

    fn settings(dir: &Path) -> AuditSettings {
        AuditSettings {
            directory: dir.to_path_buf(),
            seal_key: "audit-seal-v1".parse().unwrap(),
            seal_every_records: 7,
            seal_interval: Duration::from_secs(3600),
            max_file_bytes: 4096,
        }
    }

    fn sealer() -> Arc<SoftSealer> {
        Arc::new(SoftSealer("audit-seal-v1".parse().unwrap()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_group_committed_into_one_sealed_chain() {
        let dir = tempfile::tempdir().unwrap();
        let trail =
            Trail::open(&settings(dir.path()), sealer(), Arc::new(NoAuditObserver)).unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..100 {
            let trail = trail.clone();
            tasks.spawn(async move {
                trail
                    .append(RequestFacts {
                        request_id: format!("r{i}"),
                        status: 200,
                        ..RequestFacts::default()
                    })
                    .await
                    .unwrap()
            });
        }
        let mut seqs = Vec::new();
        while let Some(seq) = tasks.join_next().await {
            seqs.push(seq.unwrap());
        }
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), 100, "every record has its own seq");
        // One at a time now: a file is rotated between batches.
        for _ in 0..30 {
            trail.append(RequestFacts::default()).await.unwrap();
        }
        trail.close().await;
        assert!(
            trail.down_reason().is_some(),
            "a closed trail takes no record"
        );
        let summary = verify_paths(
            &[dir.path().to_path_buf()],
            sealer().as_ref(),
            VerifyOptions {
                require_sealed: true,
                partial: false,
            },
        )
        .unwrap();
        assert!(summary.files >= 2, "{summary:?}");
        // At most one seal per batch: a big batch gets one seal after it.
        assert!(summary.seals >= 1, "{summary:?}");
        assert_eq!(summary.records, 131 + summary.seals);
        assert_eq!(summary.last_sealed_seq, summary.last_seq);
    }

    #[tokio::test]
    async fn one_writer_per_directory_and_a_reopened_trail_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let first =
            Trail::open(&settings(dir.path()), sealer(), Arc::new(NoAuditObserver)).unwrap();
        let second = Trail::open(&settings(dir.path()), sealer(), Arc::new(NoAuditObserver));
        assert!(matches!(second, Err(AuditError::Locked(_))), "{second:?}");
        first.append(RequestFacts::default()).await.unwrap();
        first.close().await;
        drop(first);
        // The writer thread releases the lock when it ends.
        let deadline = Instant::now() + Duration::from_secs(5);
        let again = loop {
            match Trail::open(&settings(dir.path()), sealer(), Arc::new(NoAuditObserver)) {
                Ok(t) => break t,
                Err(AuditError::Locked(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(again.append(RequestFacts::default()).await.unwrap(), 5);
        again.close().await;
        let checker = sealer();
        let summary = verify_paths(
            &[dir.path().to_path_buf()],
            checker.as_ref(),
            VerifyOptions::default(),
        )
        .unwrap();
        assert_eq!(summary.last_seq, Some(6), "{summary:?}");
    }
}
