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
    let server = Server::bind(&ep.endpoint, ServerOptions::default(), Arc::new(NoApp)).unwrap();
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

/// A segment in /dev/shm that another user owns, or that others may write, is never mapped: names there are
/// visible to every local user, who could otherwise pre-create one and get this user's engine to serve them.
#[test]
fn a_segment_owned_by_another_user_or_writable_by_others_is_refused() {
    use lapce_ai_transport::segment::SlotSegment;
    let ep = TestEndpoint::new("shmowner");
    let generation = 0x5eed_u64;
    let name = ep.endpoint.shm_name(7, generation);
    let shm_path = std::path::Path::new("/dev/shm").join(&name);
    let created = SlotSegment::create(&name, 4096, 4096, generation).unwrap();

    // Ours and private: accepted.
    SlotSegment::open(&name, generation).expect("our own private segment opens");

    // Writable by others: refused, naming the mode.
    std::fs::set_permissions(&shm_path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = SlotSegment::open(&name, generation)
        .err()
        .expect("a world-writable segment must be refused");
    assert!(matches!(err, TransportError::UnsafeRendezvous(_)), "{err}");
    assert!(err.to_string().contains("mode 666"), "{err}");
    std::fs::set_permissions(&shm_path, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Owned by another user (nobody): refused, naming the owner. Needs CAP_CHOWN (the tests run as root).
    if sys_is_root() {
        std::os::unix::fs::chown(&shm_path, Some(65534), Some(65534)).unwrap();
        let err = SlotSegment::open(&name, generation)
            .err()
            .expect("a segment owned by another user must be refused");
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    }
    drop(created);
    let _ = std::fs::remove_file(&shm_path);
    ep.assert_clean();
}

fn sys_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}
