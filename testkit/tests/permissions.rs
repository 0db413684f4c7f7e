//! The rendezvous directory must be ours and private: anything else is refused with a clear error.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use lapce_ai_transport::{Client, ClientOptions, Server, ServerOptions, TransportError};
use support::{NoApp, TestEndpoint};

fn assert_refused(ep: &TestEndpoint, needle: &str) {
    let err = Server::bind(&ep.endpoint, ServerOptions::default(), Arc::new(NoApp))
        .err()
        .expect("server must refuse");
    assert!(matches!(err, TransportError::UnsafeRendezvous(_)), "{err}");
    assert!(err.to_string().contains(needle), "{err}");
    let err = Client::connect(&ep.endpoint, ClientOptions::default())
        .err()
        .expect("client must refuse");
    assert!(matches!(err, TransportError::UnsafeRendezvous(_)), "{err}");
}

#[test]
fn group_or_world_accessible_dir_is_refused() {
    let ep = TestEndpoint::new("perm");
    std::fs::create_dir_all(ep.endpoint.dir()).unwrap();
    std::fs::set_permissions(ep.endpoint.dir(), std::fs::Permissions::from_mode(0o770)).unwrap();
    assert_refused(&ep, "chmod 700");
    std::fs::set_permissions(ep.endpoint.dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let server = support::serve_no_app(&ep);
    server.shutdown();
    ep.assert_clean();
}

#[test]
fn foreign_owner_is_refused() {
    let ep = TestEndpoint::new("owner");
    std::fs::create_dir_all(ep.endpoint.dir()).unwrap();
    std::fs::set_permissions(ep.endpoint.dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    match std::os::unix::fs::chown(ep.endpoint.dir(), Some(65534), Some(65534)) {
        Ok(()) => assert_refused(&ep, "owned by uid 65534"),
        Err(e) => {
            // Without CAP_CHOWN we cannot fabricate a foreign directory; use one that exists instead.
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
            let foreign =
                lapce_ai_transport::endpoint::ensure_private_dir(std::path::Path::new("/"));
            assert!(foreign.unwrap_err().to_string().contains("owned by uid 0"));
        }
    }
    let _ = std::os::unix::fs::chown(ep.endpoint.dir(), Some(0), Some(0));
}

#[test]
fn symlinked_dir_is_refused() {
    let ep = TestEndpoint::new("link");
    let target = ep.root.path().join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&target, ep.endpoint.dir()).unwrap();
    assert_refused(&ep, "not a directory");
}

/// A segment that another user owns, or that others may read or write, is never mapped: a segment is opened
/// through `/proc/<pid>/fd/<n>` as a client announced it, and only this user's private, sealed memfd is served.
#[test]
fn a_segment_owned_by_another_user_or_open_to_others_is_refused() {
    use lapce_ai_transport::segment::SlotSegment;
    use std::os::fd::AsRawFd;
    let generation = 0x5eed_u64;
    let created = SlotSegment::create(4096, 4096, generation).unwrap();
    let fd = created.memfd_number().unwrap();
    let pid = std::process::id();

    // Ours and private: accepted.
    SlotSegment::open_announced(pid, fd, generation).expect("our own private segment opens");

    // Open to others: refused, naming the mode.
    let file = std::fs::File::open(format!("/proc/self/fd/{fd}")).unwrap();
    // SAFETY: plain syscall on a valid fd.
    assert_eq!(unsafe { libc::fchmod(file.as_raw_fd(), 0o666) }, 0);
    let err = SlotSegment::open_announced(pid, fd, generation)
        .err()
        .expect("a world-writable segment must be refused");
    assert!(matches!(err, TransportError::UnsafeRendezvous(_)), "{err}");
    assert!(err.to_string().contains("mode 666"), "{err}");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::fchmod(file.as_raw_fd(), 0o600) }, 0);

    // Owned by another user (nobody): refused, naming the owner. Needs CAP_CHOWN (the tests run as root).
    if sys_is_root() {
        // SAFETY: as above.
        assert_eq!(unsafe { libc::fchown(file.as_raw_fd(), 65534, 65534) }, 0);
        let err = SlotSegment::open_announced(pid, fd, generation)
            .err()
            .expect("a segment owned by another user must be refused");
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    }
    // A process of another user cannot even be opened: /proc refuses, and the error says which file.
    let err = SlotSegment::open_announced(1, 0, generation)
        .err()
        .expect("pid 1's fd 0 is not a segment");
    assert!(err.to_string().contains("/proc/1/fd/0"), "{err}");
}

fn sys_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}
