//! CPU time and peak memory of a process, from /proc; pinning this one to a CPU.

use std::time::Duration;

/// Linux reports /proc times in USER_HZ, which is 100 on every architecture it supports.
const USER_HZ: u64 = 100;

/// CPU time used so far by process `pid` ("self" for this process).
pub fn cpu_time(pid: &str) -> Result<Duration, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15; the first field after ')' is field 3.
    let ticks = |index: usize| -> Result<u64, String> {
        fields
            .get(index)
            .and_then(|field| field.parse().ok())
            .ok_or_else(|| format!("{path}: unexpected format"))
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_millis(total * 1000 / USER_HZ))
}

/// CPU time of one process over a measured phase.
pub struct CpuMeter {
    pid: String,
    start: Duration,
}

impl CpuMeter {
    /// Starts measuring process `pid` ("self" for this process).
    pub fn start(pid: &str) -> Result<Self, String> {
        Ok(Self {
            pid: pid.to_string(),
            start: cpu_time(pid)?,
        })
    }

    /// CPU time used since `start`.
    pub fn used(&self) -> Result<Duration, String> {
        Ok(cpu_time(&self.pid)?.saturating_sub(self.start))
    }

    /// Microseconds of CPU per call since `start`.
    pub fn per_call_us(&self, calls: u64) -> Result<f64, String> {
        Ok(self.used()?.as_micros() as f64 / calls.max(1) as f64)
    }
}

/// The most memory process `pid` has held at once (VmHWM), in bytes.
pub fn peak_rss(pid: &str) -> Result<u64, String> {
    status_bytes(pid, "VmHWM")
}

/// The memory process `pid` allocated itself and holds now (RssAnon), in bytes: its
/// resident memory without the pages of files it maps, above all its own executable, which
/// the kernel maps as it sees fit (whole large folios on recent kernels) and can drop and
/// read again at any time.
pub fn anonymous_rss(pid: &str) -> Result<u64, String> {
    status_bytes(pid, "RssAnon")
}

/// A `kB` field of /proc/PID/status, in bytes.
fn status_bytes(pid: &str, field: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| format!("{path}: no {field} line"))
}

/// Pins every thread of this process (and so the threads they start) to CPU `cpu`, as
/// `taskset -c CPU` would have from the start.
pub fn pin_to(cpu: usize) -> Result<(), String> {
    use rustix::process::Pid;
    use rustix::thread::{CpuSet, sched_setaffinity};
    if cpu >= CpuSet::MAX_CPU {
        return Err(format!("CPU {cpu} does not exist"));
    }
    let mut set = CpuSet::new();
    set.set(cpu);
    let tasks =
        std::fs::read_dir("/proc/self/task").map_err(|e| format!("/proc/self/task: {e}"))?;
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
            .and_then(Pid::from_raw)
        else {
            continue;
        };
        sched_setaffinity(Some(tid), &set)
            .map_err(|e| format!("cannot pin the client to CPU {cpu}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_peak_memory_is_readable() {
        let peak = super::peak_rss("self").unwrap();
        assert!(peak > 1024 * 1024, "{peak}");
    }

    #[test]
    fn anonymous_memory_grows_with_what_is_allocated_and_stays_under_the_peak() {
        let before = super::anonymous_rss("self").unwrap();
        // Written, so that its pages are resident; half of it is the margin for what tests
        // running beside this one free meanwhile.
        let held = std::hint::black_box(vec![1u8; 64 << 20]);
        let during = super::anonymous_rss("self").unwrap();
        assert!(during >= before + (32 << 20), "{before} -> {during}");
        assert!(during <= super::peak_rss("self").unwrap());
        drop(held);
    }

    #[test]
    fn own_cpu_time_is_readable_and_grows() {
        let before = super::cpu_time("self").unwrap();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(60) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        std::hint::black_box(x);
        assert!(super::cpu_time("self").unwrap() > before);
    }
}
