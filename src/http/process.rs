//! The standard Prometheus process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
//! `process_open_fds`, `process_max_fds`, `process_start_time_seconds`,
//! `process_threads`) and the process's context switches
//! (`process_context_switches_total{kind}`), read from `/proc` at scrape time,
//! unprefixed, as the Go and Python clients name them so dashboards and
//! `dcvv-tools bench http` find them.
//!
//! The readers are public because `dcvv-tools bench http` uses the same parsing
//! on its own process (engine CPU) and on a local gateway's (`--gateway-pid`). On a system
//! without `/proc`, or when one file cannot be read, the families from that file
//! are left out of the exposition; a scrape never fails because of them.
//!
//! Times in `/proc/PID/stat` are in clock ticks of `USER_HZ`, which Linux fixes
//! at 100 for user space on every architecture the gateway builds for (the Go
//! client's `procfs` assumes the same); CPU time therefore has 10 ms resolution.
//!
//! Context switches: `/proc/PID/status` counts those of one thread only (the
//! main one for the process's own file), so the sum is over
//! `/proc/PID/task/*/status`. A thread that exits takes its counts with it; the
//! collector remembers each thread's last counts and keeps those of threads that
//! have gone, so the counter never goes back (switches of a thread between its
//! last scrape and its exit are missed).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::{LazyLock, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Clock ticks per second of the times in `/proc/PID/stat` (Linux `USER_HZ`).
pub const USER_HZ: u64 = 100;

/// The `/proc` directory of a process: this one for `None`.
fn proc_dir(pid: Option<u32>) -> PathBuf {
    match pid {
        Some(pid) => PathBuf::from(format!("/proc/{pid}")),
        None => PathBuf::from("/proc/self"),
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("cannot parse {what}"))
}

/// The fields of `/proc/PID/stat` the metrics use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// User-mode CPU time, in ticks.
    pub utime_ticks: u64,
    /// Kernel-mode CPU time, in ticks.
    pub stime_ticks: u64,
    /// Threads now.
    pub threads: u64,
    /// Start time, in ticks after boot.
    pub start_ticks: u64,
    /// Virtual memory size, bytes.
    pub vsize_bytes: u64,
}

impl Stat {
    /// Parses the one line of `/proc/PID/stat`. The command name (field 2) is
    /// in parentheses and may itself hold spaces and `)`, so fields are counted
    /// from the last `)`.
    pub fn parse(text: &str) -> Option<Stat> {
        let (_, rest) = text.rsplit_once(')')?;
        // `rest` starts at field 3 (state): field n is at index n - 3.
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            utime_ticks: field(14)?,
            stime_ticks: field(15)?,
            threads: field(20)?,
            start_ticks: field(22)?,
            vsize_bytes: field(23)?,
        })
    }

    /// Reads `/proc/PID/stat` (this process's for `None`).
    ///
    /// # Errors
    /// The file cannot be read (no such process, no `/proc`) or parsed.
    pub fn read(pid: Option<u32>) -> io::Result<Stat> {
        let text = std::fs::read_to_string(proc_dir(pid).join("stat"))?;
        Stat::parse(&text).ok_or_else(|| invalid("/proc/PID/stat"))
    }

    /// User plus kernel CPU time, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        self.utime_ticks.saturating_add(self.stime_ticks) as f64 / USER_HZ as f64
    }
}

/// The first number after `key` (e.g. `VmRSS:`) at the start of a line of a
/// `/proc/PID/status` file.
pub fn status_value(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Voluntary and involuntary context switches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContextSwitches {
    /// The thread waited (a lock, a futex, I/O, a channel).
    pub voluntary: u64,
    /// The scheduler took the CPU away.
    pub involuntary: u64,
}

impl ContextSwitches {
    /// Reads the two counts of one thread's `status` file.
    pub fn parse_status(text: &str) -> Option<ContextSwitches> {
        Some(ContextSwitches {
            voluntary: status_value(text, "voluntary_ctxt_switches:")?,
            involuntary: status_value(text, "nonvoluntary_ctxt_switches:")?,
        })
    }

    /// Both kinds together.
    pub fn total(&self) -> u64 {
        self.voluntary.saturating_add(self.involuntary)
    }

    fn add(self, other: ContextSwitches) -> ContextSwitches {
        ContextSwitches {
            voluntary: self.voluntary.saturating_add(other.voluntary),
            involuntary: self.involuntary.saturating_add(other.involuntary),
        }
    }

    /// Each kind's growth since `earlier` (0 where it went back).
    pub fn since(&self, earlier: &ContextSwitches) -> ContextSwitches {
        ContextSwitches {
            voluntary: self.voluntary.saturating_sub(earlier.voluntary),
            involuntary: self.involuntary.saturating_sub(earlier.involuntary),
        }
    }
}

/// Each live thread's context switches, by thread id, from
/// `/proc/PID/task/*/status`. A thread that exits while being read is skipped.
///
/// # Errors
/// The task directory cannot be listed (no such process, no `/proc`).
pub fn thread_switches(pid: Option<u32>) -> io::Result<Vec<(u64, ContextSwitches)>> {
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(proc_dir(pid).join("task"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        if let Some(switches) = ContextSwitches::parse_status(&text) {
            threads.push((tid, switches));
        }
    }
    Ok(threads)
}

/// The context switches of all live threads of a process together.
///
/// # Errors
/// As [`thread_switches`].
pub fn process_switches(pid: Option<u32>) -> io::Result<ContextSwitches> {
    Ok(thread_switches(pid)?
        .into_iter()
        .fold(ContextSwitches::default(), |sum, (_, s)| sum.add(s)))
}

/// The soft limit on open files from `/proc/PID/limits`; `None` when unlimited
/// or absent.
pub fn max_open_files(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Boot time, Unix seconds, from `/proc/stat`'s `btime` line.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Threads seen at earlier scrapes, so that the switches of those that have
/// exited stay counted.
#[derive(Debug, Default)]
struct SwitchLedger {
    last: HashMap<u64, ContextSwitches>,
    gone: ContextSwitches,
}

impl SwitchLedger {
    /// The process's total: the live threads' counts plus the last counts of
    /// the threads that have gone since the previous scrape (or whose id now
    /// belongs to a new thread: its counts went back).
    fn update(&mut self, live: Vec<(u64, ContextSwitches)>) -> ContextSwitches {
        let mut now = HashMap::with_capacity(live.len());
        for (tid, switches) in live {
            if let Some(before) = self.last.remove(&tid)
                && (switches.voluntary < before.voluntary
                    || switches.involuntary < before.involuntary)
            {
                self.gone = self.gone.add(before);
            }
            now.insert(tid, switches);
        }
        for (_, exited) in self.last.drain() {
            self.gone = self.gone.add(exited);
        }
        self.last = now;
        self.last
            .values()
            .fold(self.gone, |sum, switches| sum.add(*switches))
    }
}

/// Reads `/proc/self` on every scrape.
#[derive(Debug, Default)]
struct ProcessCollector {
    switches: Mutex<SwitchLedger>,
}

fn counter<N: prometheus_client::encoding::EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let encoder = &mut encoder;
        if let Ok(stat) = Stat::read(None) {
            counter(
                encoder,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                stat.cpu_seconds(),
            )?;
            gauge(
                encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                stat.vsize_bytes,
            )?;
            gauge(
                encoder,
                "process_threads",
                "Number of OS threads in the process",
                stat.threads,
            )?;
            if let Some(start) = start_time_seconds(&stat) {
                gauge(
                    encoder,
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds",
                    start,
                )?;
            }
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let Some(kib) = status_value(&status, "VmRSS:") {
            gauge(
                encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                kib.saturating_mul(1024),
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                encoder,
                "process_open_fds",
                "Number of open file descriptors",
                fds.count() as u64,
            )?;
        }
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        if let Some(max) = max_open_files(&limits) {
            gauge(
                encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                max,
            )?;
        }
        if let Ok(live) = thread_switches(None) {
            let total = self
                .switches
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .update(live);
            let mut family = encoder.encode_descriptor(
                "process_context_switches",
                "Context switches of all the process's threads, by kind (voluntary: the \
                 thread waited; involuntary: it was preempted)",
                None,
                MetricType::Counter,
            )?;
            for (kind, value) in [
                ("voluntary", total.voluntary),
                ("involuntary", total.involuntary),
            ] {
                ConstCounter::new(value).encode(family.encode_family(&[("kind", kind)])?)?;
            }
        }
        Ok(())
    }
}

/// Boot time (read once) plus the process's start in ticks after boot.
fn start_time_seconds(stat: &Stat) -> Option<f64> {
    static BOOT: LazyLock<Option<u64>> = LazyLock::new(|| {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .as_deref()
            .and_then(boot_time)
    });
    let boot = (*BOOT)?;
    Some(boot as f64 + stat.start_ticks as f64 / USER_HZ as f64)
}

/// The unprefixed registry holding the process collector: one per process, as
/// what it reports is.
fn registry() -> &'static Registry {
    static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector::default()));
        registry
    });
    &REGISTRY
}

/// Appends the process families to a text exposition (before its `# EOF`).
///
/// # Errors
/// Formatting failed (does not happen with a `String` sink).
pub fn encode(text: &mut String) -> fmt::Result {
    prometheus_client::encoding::text::encode_registry(text, registry())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    fn unix_now() -> f64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }

    // A real line (kernel 6.1), with a command name that holds `) (` to show the
    // fields are counted from the last parenthesis.
    const STAT: &str = "4242 (dcvv) (gw x) S 1 4242 4242 0 -1 4194560 2791 0 0 0 \
        123 45 0 0 20 0 17 0 98765 1234567168 4321 18446744073709551615 1 1 0 0 0 0 0 \
        4096 17476 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = Stat::parse(STAT).unwrap();
        assert_eq!(
            stat,
            Stat {
                utime_ticks: 123,
                stime_ticks: 45,
                threads: 17,
                start_ticks: 98765,
                vsize_bytes: 1_234_567_168,
            }
        );
        assert!((stat.cpu_seconds() - 1.68).abs() < 1e-9);
        assert_eq!(Stat::parse("4242 (dcvv) S 1 2"), None);
        assert_eq!(Stat::parse(""), None);
    }

    #[test]
    fn status_lines_and_limits() {
        let status = "Name:\tdcvv-gateway\nVmSize:\t 1205632 kB\nVmRSS:\t   23456 kB\n\
            Threads:\t17\nvoluntary_ctxt_switches:\t150\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(status_value(status, "VmRSS:"), Some(23456));
        assert_eq!(status_value(status, "VmSwap:"), None);
        assert_eq!(
            ContextSwitches::parse_status(status),
            Some(ContextSwitches {
                voluntary: 150,
                involuntary: 7
            })
        );
        assert_eq!(ContextSwitches::parse_status("Name:\tx\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
            Max processes             63704                63704                processes \n\
            Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(1024));
        assert_eq!(
            max_open_files(
                "Max open files            unlimited            unlimited            files\n"
            ),
            None
        );
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1767225600\nprocesses 9\n"),
            Some(1_767_225_600)
        );
    }

    #[test]
    fn switch_counts_subtract_per_kind_and_never_go_negative() {
        let a = ContextSwitches {
            voluntary: 10,
            involuntary: 3,
        };
        let b = ContextSwitches {
            voluntary: 25,
            involuntary: 2,
        };
        assert_eq!(
            b.since(&a),
            ContextSwitches {
                voluntary: 15,
                involuntary: 0
            }
        );
        assert_eq!(b.total(), 27);
    }

    #[test]
    fn the_ledger_keeps_the_switches_of_threads_that_have_gone() {
        let s = |voluntary, involuntary| ContextSwitches {
            voluntary,
            involuntary,
        };
        let mut ledger = SwitchLedger::default();
        assert_eq!(ledger.update(vec![(1, s(10, 1)), (2, s(5, 0))]), s(15, 1));
        // Thread 2 exits, thread 3 starts.
        assert_eq!(ledger.update(vec![(1, s(12, 1)), (3, s(1, 0))]), s(18, 1));
        // Thread id 1 is reused by a new thread (its counts went back).
        assert_eq!(ledger.update(vec![(1, s(2, 0)), (3, s(4, 1))]), s(23, 2));
        assert_eq!(ledger.update(vec![]), s(23, 2));
    }

    #[test]
    fn this_process_is_read() {
        let stat = Stat::read(None).unwrap();
        assert!(stat.threads >= 1);
        assert!(stat.vsize_bytes > 0);
        let switches = process_switches(None).unwrap();
        assert!(switches.total() > 0);
        let threads = thread_switches(None).unwrap();
        assert!(!threads.is_empty());
        assert!(Stat::read(Some(u32::MAX)).is_err());
    }

    /// The value of an unlabelled sample line `name value`.
    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn the_gateway_exposition_has_the_process_families_with_plausible_values() {
        // Burn CPU until the kernel has counted some (its tick is 10 ms; on a
        // loaded machine 30 ms of wall time may hold no tick of this process),
        // so the counter is above zero even in a fresh process.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while Stat::read(None).unwrap().cpu_seconds() == 0.0
            && start.elapsed() < std::time::Duration::from_secs(10)
        {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        let text = super::super::metrics::Metrics::new().encode().unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(
            text.contains("# TYPE process_cpu_seconds counter"),
            "{text}"
        );
        let cpu = sample(&text, "process_cpu_seconds_total");
        assert!(cpu > 0.0 && cpu < 1e6, "{cpu}");
        let rss = sample(&text, "process_resident_memory_bytes");
        let vsize = sample(&text, "process_virtual_memory_bytes");
        assert!(rss > 1e5 && rss <= vsize, "rss {rss}, vsize {vsize}");
        let open = sample(&text, "process_open_fds");
        let max = sample(&text, "process_max_fds");
        assert!(open >= 3.0 && open <= max, "open {open}, max {max}");
        assert!(sample(&text, "process_threads") >= 1.0);
        let started = sample(&text, "process_start_time_seconds");
        let now = unix_now();
        assert!(
            started > now - 86_400.0 * 365.0 && started <= now + 1.0,
            "{started} vs {now}"
        );
        for kind in ["voluntary", "involuntary"] {
            let line = format!("process_context_switches_total{{kind=\"{kind}\"}}");
            assert!(text.contains(&line), "{text}");
        }
        assert!(sample(&text, "process_context_switches_total{kind=\"voluntary\"}") > 0.0);
        // The gateway's own families keep their prefix.
        assert!(text.contains("dcvv_http_in_flight"), "{text}");
    }
}
