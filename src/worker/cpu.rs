//! How much CPU a worker's event loop wanted: the share of the time its
//! main thread ran on a CPU or waited for one, from the kernel's scheduler
//! statistics (`/proc/PID/schedstat`).
//!
//! Event-loop utilisation alone reads low when workers share CPUs (more
//! workers than cores, a container's CPU limit): a loop whose events are
//! ready while its thread waits for the CPU counts that wait as idle time.
//! Measured here with two workers on one core at twice their capacity: 0.75
//! utilisation each with the CPU 98% busy, while run plus wait time said
//! 0.97. Only the main thread counts: the garbage collector's and libuv's
//! helper threads do not hold requests up.

use std::time::Instant;

/// Successive samples of one process's main thread.
#[derive(Debug, Default)]
pub struct CpuDemand {
    /// The last sample: when, and nanoseconds run plus waited by then.
    sampled: Option<(Instant, u64)>,
    /// The share measured at the last sample, for the metrics.
    pub share: Option<f64>,
}

impl CpuDemand {
    /// The share (0..1) of the time since the previous sample that the
    /// main thread of `pid` ran or waited to run. None at the first sample,
    /// and where the kernel keeps no scheduler statistics.
    pub fn sample(&mut self, pid: u32, now: Instant) -> Option<f64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
        let busy = parse(&text)?;
        let (at, before) = self.sampled.replace((now, busy))?;
        let wall = now.duration_since(at).as_nanos() as f64;
        let share = (wall > 0.0).then(|| (busy.saturating_sub(before) as f64 / wall).min(1.0));
        self.share = share;
        share
    }
}

/// `/proc/PID/schedstat`: nanoseconds on a CPU, nanoseconds waiting on a
/// run queue, time slices; the first two summed.
fn parse(text: &str) -> Option<u64> {
    let mut fields = text.split_whitespace();
    let run: u64 = fields.next()?.parse().ok()?;
    let wait: u64 = fields.next()?.parse().ok()?;
    Some(run.saturating_add(wait))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    #[test]
    fn run_and_wait_time_are_summed() {
        assert_eq!(parse("1500 250 7\n"), Some(1750));
        assert_eq!(parse(""), None);
        assert_eq!(parse("x 1 2"), None);
    }

    /// Over 300 ms, a process that spins wanted the CPU all along, whether
    /// it got it or waited for it (the test's other threads compete), and
    /// one that sleeps wanted next to none of it.
    #[test]
    fn a_spinning_process_wants_the_cpu_and_a_sleeping_one_does_not() {
        let spawn = |script: &str| {
            Command::new("sh")
                .args(["-c", script])
                .stdout(Stdio::null())
                .spawn()
                .expect("sh")
        };
        let mut busy = spawn("while :; do :; done");
        let mut idle = spawn("exec sleep 30");
        let (mut a, mut b) = (CpuDemand::default(), CpuDemand::default());
        let start = Instant::now();
        let first = (a.sample(busy.id(), start), b.sample(idle.id(), start));
        std::thread::sleep(Duration::from_millis(300));
        let now = Instant::now();
        let (spinning, sleeping) = (a.sample(busy.id(), now), b.sample(idle.id(), now));
        let _ = busy.kill();
        let _ = idle.kill();
        let _ = (busy.wait(), idle.wait());
        assert_eq!(first, (None, None));
        let (spinning, sleeping) = (spinning.expect("schedstat"), sleeping.expect("schedstat"));
        assert!(spinning > 0.9, "{spinning}");
        assert!(sleeping < 0.1, "{sleeping}");
    }
}
