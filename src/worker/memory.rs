//! The memory a container allows (its cgroup's limit, v1 or v2) and each
//! worker's share of it as V8's old-space limit.
//!
//! Node sizes its heap from the memory one process may use: in a 1 GiB
//! container every worker would take about half of the whole. Four of them
//! would then outgrow the container together, and the kernel's OOM killer
//! would end one at random (the supervisor included) long before any worker
//! came near its own V8 limit, which is what `[health] max_heap_used`
//! watches. With a share each, a leaking worker reaches that bound first and
//! is replaced while the others serve.

use std::path::{Path, PathBuf};

/// Of a worker's share of the container's memory, the part its V8 old
/// space may take; the rest is for what a Node process holds outside it
/// (code, the young generation, buffers).
const OLD_SPACE_PART: f64 = 0.75;
/// The least old space a worker gets, however small its share.
pub const MIN_OLD_SPACE_MIB: u64 = 64;

/// The memory limit of this process's cgroup, or of the nearest ancestor
/// that sets a lower one; None where nothing sets one, or one above the
/// machine's memory.
pub fn container_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let limit = limit_in(Path::new("/sys/fs/cgroup"), &cgroups)?;
    // Equal is a limit: lxcfs and gVisor show the container's limit as
    // the machine's memory, and node sizes each worker from it.
    match physical_memory() {
        Some(total) if limit > total => None,
        _ => Some(limit),
    }
}

/// The lowest memory limit on the path of this process's memory cgroup, as
/// `/proc/self/cgroup` gives it (`cgroups`), under a cgroup filesystem
/// mounted at `root`: cgroup v1's memory hierarchy (`root/memory`) or the
/// unified v2 hierarchy (`root` itself).
fn limit_in(root: &Path, cgroups: &str) -> Option<u64> {
    let mut lowest: Option<u64> = None;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (base, file) = if id == "0" && controllers.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        for dir in ancestors(&base, path) {
            if let Some(limit) = read_limit(&dir.join(file)) {
                lowest = Some(lowest.map_or(limit, |l| l.min(limit)));
            }
        }
    }
    lowest
}

/// `base/path` and each directory above it, up to `base`. A path that
/// leaves `base` (`..`) yields nothing.
fn ancestors(base: &Path, path: &str) -> Vec<PathBuf> {
    let rel = path.trim_start_matches('/');
    if rel.split('/').any(|c| c == "..") {
        return Vec::new();
    }
    let mut dir = base.join(rel);
    let mut out = vec![dir.clone()];
    while dir != base && dir.pop() {
        out.push(dir.clone());
    }
    out
}

/// A limit file's value: None for "max" (v2), v1's "unlimited" (a value
/// near `i64::MAX`), or a file that is not there or not a number.
fn read_limit(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let text = text.trim();
    if text == "max" {
        return None;
    }
    let v: u64 = text.parse().ok()?;
    (v < 1 << 60).then_some(v)
}

fn physical_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The old-space limit, in MiB, of each of `workers` workers that share
/// `limit` bytes.
pub fn old_space_mib(limit: u64, workers: usize) -> u64 {
    let share = limit as f64 / workers.max(1) as f64;
    ((share * OLD_SPACE_PART) as u64 >> 20).max(MIN_OLD_SPACE_MIB)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn cgroup_v2_limits_are_read_along_the_path_and_the_lowest_wins() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        write(&r.join("memory.max"), "max\n");
        write(&r.join("kubepods/memory.max"), "2147483648\n");
        write(&r.join("kubepods/pod1/memory.max"), "max\n");
        write(&r.join("kubepods/pod1/c1/memory.max"), "4294967296\n");
        assert_eq!(limit_in(r, "0::/kubepods/pod1/c1\n"), Some(2 << 30));
        // In its own cgroup namespace a container sees its cgroup as "/".
        write(&r.join("memory.max"), "536870912\n");
        assert_eq!(limit_in(r, "0::/\n"), Some(512 << 20));
    }

    #[test]
    fn cgroup_v1_reads_the_memory_hierarchy_only() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let unlimited = "9223372036854771712\n";
        write(&r.join("memory/memory.limit_in_bytes"), unlimited);
        write(
            &r.join("memory/docker/abc/memory.limit_in_bytes"),
            "1073741824\n",
        );
        write(&r.join("cpu/docker/abc/memory.limit_in_bytes"), "1\n");
        let cgroups = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n";
        assert_eq!(limit_in(r, cgroups), Some(1 << 30));
        let free = "4:memory:/\n0::/\n";
        assert_eq!(limit_in(r, free), None);
    }

    #[test]
    fn no_cgroup_files_and_odd_paths_mean_no_limit() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(limit_in(root.path(), "0::/a/b\n"), None);
        assert_eq!(limit_in(root.path(), "garbage\n"), None);
        assert_eq!(limit_in(root.path(), "0::/../../etc\n"), None);
    }

    #[test]
    fn each_worker_gets_three_quarters_of_its_share() {
        assert_eq!(old_space_mib(1 << 30, 4), 192);
        assert_eq!(old_space_mib(512 << 20, 2), 192);
        assert_eq!(old_space_mib(2 << 30, 1), 1536);
        assert_eq!(old_space_mib(256 << 20, 8), MIN_OLD_SPACE_MIB);
    }
}
