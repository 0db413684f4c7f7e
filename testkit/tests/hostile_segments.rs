//! Segments the engine must never map: another user's, an unsealed one; and a client that tries to resize its
//! own under the engine's mapping (which would kill the engine with SIGBUS). A well-behaved client keeps doing
//! round trips throughout.

mod support;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use lapce_ai_transport::segment::{Announcement, SlotSegment};
use lapce_ai_transport::{Client, ClientOptions};
use support::{announce_by_hand, ping, serve_no_app, Peer, Survivor, TestEndpoint};

/// The uid of `nobody`.
const NOBODY: u32 = 65534;

fn running_as_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Another local user offers the engine a segment (as it could if it learnt a slot's name and raced a client to
/// it): the engine's owner check refuses it, nothing is written into it, and this user's clients carry on.
#[test]
fn a_segment_another_user_created_is_never_served() {
    if !running_as_root() {
        println!("skipped: starting a process as another user needs root");
        return;
    }
    let ep = TestEndpoint::new("foreignuid");
    let server = serve_no_app(&ep);
    let survivor = Survivor::start(&ep);
    let (mut foreign, announcement) = Peer::foreign_segment(&ep, NOBODY);

    // The check itself names the owner.
    let err = SlotSegment::open_announced(
        announcement.pid,
        announcement.memfd,
        announcement.generation,
    )
    .err()
    .expect("a segment owned by nobody must be refused");
    assert!(
        err.to_string().contains(&format!("owned by uid {NOBODY}")),
        "{err}"
    );

    // Through the engine: announced in a slot the way a client announces, it is refused and never touched.
    let slot_lock = announce_by_hand(&ep, 900, announcement);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        server.connection_count(),
        1,
        "only the well-behaved client is connected"
    );
    assert_eq!(
        foreign.ask("check"),
        "untouched",
        "the engine wrote into the foreign segment"
    );
    slot_lock.remove();
    survivor.finish();
    drop(foreign);
    server.shutdown();
    ep.assert_clean();
}

/// A client's segment is sealed against shrinking and growing, so `ftruncate` fails instead of leaving the
/// engine's mapping with pages that SIGBUS; a segment without those seals is refused before it is mapped.
#[test]
fn a_client_cannot_resize_its_segment_and_an_unsealed_one_is_refused() {
    let ep = TestEndpoint::new("truncate");
    let server = serve_no_app(&ep);
    let survivor = Survivor::start(&ep);
    let mut truncater = Client::connect(&ep.endpoint, ClientOptions::default()).unwrap();
    ping(&mut truncater, 1);

    // Every memfd of this process (the clients' segments) refuses to shrink or grow.
    let memfds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|entry| {
            std::fs::read_link(entry.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("/memfd:"))
        })
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    assert!(
        memfds.len() >= 2,
        "both clients' segments are memfds: {memfds:?}"
    );
    for fd in memfds {
        for len in [0, 1 << 30] {
            // SAFETY: plain syscall on an fd this process owns.
            let rc = unsafe { libc::ftruncate(fd, len) };
            let err = std::io::Error::last_os_error();
            assert_eq!(rc, -1, "fd {fd} was resized to {len}");
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "fd {fd}: {err}");
        }
    }
    ping(&mut truncater, 2);

    // A segment without the size seals: a byte-for-byte copy of a real one (header, hello in its ring) in a
    // memfd of our own, so the seals are the only difference. Refused, and never answered.
    let generation = 0xabad_5ea1_u64;
    let real = support::segment_with_hello(generation);
    let image = std::fs::read(format!("/proc/self/fd/{}", real.memfd_number().unwrap())).unwrap();
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let raw = unsafe { libc::memfd_create(c"lapce-ai-unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd this test owns.
    let unsealed = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    // SAFETY: plain syscall on an fd this test owns (a memfd starts with mode 777).
    assert_eq!(unsafe { libc::fchmod(unsealed.as_raw_fd(), 0o600) }, 0);
    std::os::unix::fs::FileExt::write_all_at(&unsealed, &image, 0).unwrap();
    let slot_lock = announce_by_hand(
        &ep,
        901,
        Announcement::new(generation, std::process::id(), unsealed.as_raw_fd()),
    );
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(server.connection_count(), 2);
    let after = std::fs::read(format!("/proc/self/fd/{}", unsealed.as_raw_fd())).unwrap();
    assert!(
        after == image,
        "the engine mapped an unsealed segment and wrote into it"
    );
    slot_lock.remove();

    ping(&mut truncater, 3);
    truncater.close();
    survivor.finish();
    server.shutdown();
    ep.assert_clean();
}
