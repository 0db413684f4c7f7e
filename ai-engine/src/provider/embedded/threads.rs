//! How many threads llama.cpp gets: physical cores this process may run on, and what the CPU is busy with.

use std::collections::BTreeSet;
use std::path::Path;

/// What the CPU looks like to this process right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CpuPicture {
    /// Logical CPUs in this process's affinity mask (and cgroup quota).
    pub logical: u32,
    /// Distinct physical cores among them (hyper-threads of one core count once).
    pub physical: u32,
    /// Runnable tasks on the machine other than the one asking (from `/proc/stat`'s `procs_running`).
    pub others_running: u32,
}

impl CpuPicture {
    /// Reads the affinity mask, the CPU topology in sysfs and `/proc/stat`.
    pub(crate) fn read() -> Self {
        let logical = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let cpus = allowed_cpus();
        let physical = physical_cores(Path::new("/sys/devices/system/cpu"), &cpus)
            .unwrap_or(logical)
            .clamp(1, logical);
        let others_running = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| procs_running(&s))
            .map_or(0, |n| n.saturating_sub(1));
        Self {
            logical,
            physical,
            others_running,
        }
    }

    /// Threads for decoding: the configured count, else one per physical core, one fewer when other tasks
    /// keep every core busy on a machine with more than two (a descheduled thread stalls the others at the next
    /// graph barrier; OpenMP's barriers sleep, so a fully busy machine costs one thread, not all of them).
    pub(crate) fn decode_threads(&self, configured: Option<u32>) -> u32 {
        if let Some(n) = configured.filter(|&n| n > 0) {
            return n;
        }
        let idle_cores = self.physical.saturating_sub(self.others_running);
        if idle_cores == 0 && self.physical > 2 {
            self.physical - 1
        } else {
            self.physical
        }
        .max(1)
    }
}

/// The CPU numbers in this process's affinity mask (empty when it cannot be read).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bit array that sched_getaffinity fills; the size passed is its own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Distinct (package, core) pairs among `cpus`, read from `<sysfs>/cpuN/topology`.
fn physical_cores(sysfs: &Path, cpus: &[usize]) -> Option<u32> {
    let mut cores = BTreeSet::new();
    for cpu in cpus {
        let topology = sysfs.join(format!("cpu{cpu}")).join("topology");
        let read = |name: &str| {
            std::fs::read_to_string(topology.join(name))
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
        };
        cores.insert((read("physical_package_id")?, read("core_id")?));
    }
    (!cores.is_empty()).then_some(cores.len() as u32)
}

/// The `procs_running` count of a `/proc/stat` text.
fn procs_running(stat: &str) -> Option<u32> {
    stat.lines()
        .find_map(|l| l.strip_prefix("procs_running "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picture(logical: u32, physical: u32, others_running: u32) -> CpuPicture {
        CpuPicture {
            logical,
            physical,
            others_running,
        }
    }

    #[test]
    fn threads_follow_physical_cores_and_load() {
        assert_eq!(picture(8, 4, 0).decode_threads(None), 4);
        assert_eq!(picture(8, 4, 6).decode_threads(None), 3);
        assert_eq!(picture(2, 2, 5).decode_threads(None), 2);
        assert_eq!(picture(1, 1, 3).decode_threads(None), 1);
        // A configured count always wins.
        assert_eq!(picture(8, 4, 6).decode_threads(Some(6)), 6);
        assert_eq!(picture(8, 4, 0).decode_threads(Some(0)), 4);
    }

    #[test]
    fn hyper_threads_count_once() {
        let dir = tempfile::tempdir().expect("tmp");
        for (cpu, core) in [(0, 0), (1, 1), (2, 0), (3, 1)] {
            let t = dir.path().join(format!("cpu{cpu}/topology"));
            std::fs::create_dir_all(&t).expect("mkdir");
            std::fs::write(t.join("core_id"), format!("{core}\n")).expect("write");
            std::fs::write(t.join("physical_package_id"), "0\n").expect("write");
        }
        assert_eq!(physical_cores(dir.path(), &[0, 1, 2, 3]), Some(2));
        assert_eq!(physical_cores(dir.path(), &[0, 2]), Some(1));
        assert_eq!(physical_cores(dir.path(), &[7]), None);
    }

    #[test]
    fn procs_running_is_parsed() {
        let stat = "cpu  1 2 3\nctxt 5\nprocs_running 3\nprocs_blocked 0\n";
        assert_eq!(procs_running(stat), Some(3));
        assert_eq!(procs_running("cpu 1\n"), None);
        let now = CpuPicture::read();
        assert!(now.physical >= 1 && now.physical <= now.logical);
    }
}
