//! Thin safe wrappers over the Linux calls the transport needs: futex, sealed memfds, mmap.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `word == expected`, at most `timeout`. Uses a shared (non-private) futex so it works
/// across processes that map the same memory. Spurious returns are allowed; callers re-check.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call; FUTEX_WAIT only reads it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every waiter sleeping on `word` (in any process).
pub fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE does not access it beyond hashing its address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

pub fn current_uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// Sets the size of a new segment and reserves its pages so a full /dev/shm fails here, not with SIGBUS later.
pub fn size_and_reserve(fd: &OwnedFd, len: usize) -> io::Result<()> {
    // SAFETY: plain syscalls on an owned fd.
    unsafe {
        if libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) < 0 {
            return Err(io::Error::last_os_error());
        }
        let rc = libc::posix_fallocate(fd.as_raw_fd(), 0, len as libc::off_t);
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}

/// Sets a file's access and modification times to now (an `IN_ATTRIB` event for inotify watchers).
pub fn touch(fd: &impl AsRawFd) -> io::Result<()> {
    let now = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_NOW,
    };
    // SAFETY: a valid fd and a pointer to two timespecs that outlive the call.
    if unsafe { libc::futimens(fd.as_raw_fd(), [now, now].as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What `fstat` says about an open file that the transport cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileFacts {
    pub size: u64,
    pub inode: u64,
    pub uid: u32,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
}

/// Size, inode, owner and permission bits of an open file.
pub fn fstat(fd: &impl AsRawFd) -> io::Result<FileFacts> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: st is a valid out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded and filled st.
    let st = unsafe { st.assume_init() };
    Ok(FileFacts {
        size: st.st_size as u64,
        inode: st.st_ino,
        uid: st.st_uid,
        mode: st.st_mode & 0o7777,
    })
}

/// A shared read-write memory mapping, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory; all concurrent access goes through atomics or is copied out.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub fn map_shared(fd: &impl AsRawFd, len: usize) -> io::Result<Self> {
        // SAFETY: mapping a file we own a descriptor for; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from a successful mmap and are unmapped once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Number of CPUs this process may run on (1 disables spinning). Read once per process: std's answer costs
/// about 16 syscalls (the cgroup quota files and the affinity mask), and every new spin policy asks for it.
pub fn available_cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// 64 random bits (getrandom); falls back to time and pid, which only has to differ between incarnations.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return nanos ^ (u64::from(std::process::id()) << 32);
    }
    u64::from_le_bytes(bytes)
}

/// A new anonymous memory file that can be sealed, close-on-exec, mode 0600.
pub fn memfd_create_sealable(name: &str) -> io::Result<OwnedFd> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid NUL-terminated name; the returned fd is owned below.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscall on an owned fd.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The seals that fix a segment's size for good.
const SIZE_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Seals a memfd against shrinking and growing, and against further seal changes.
pub fn seal_size(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: plain fcntl on an owned fd.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SIZE_SEALS) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The seals of an open file (0 for files that cannot be sealed).
pub fn seals(fd: &impl AsRawFd) -> io::Result<libc::c_int> {
    // SAFETY: plain fcntl on a valid fd.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::EINVAL) {
            Ok(0)
        } else {
            Err(err)
        };
    }
    Ok(seals)
}

/// True when `seals` fix the size for good.
pub fn size_is_sealed(seals: libc::c_int) -> bool {
    seals & SIZE_SEALS == SIZE_SEALS
}
