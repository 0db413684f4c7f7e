//! The reactor thread: drains every client's ring, answers transport messages itself, and sleeps when idle.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::connection::{DisconnectReason, ServerConnection};
use super::{Attach, InboxEvent, Shared};
use tokio::sync::Notify;

use crate::doorbell::{self, SpinPolicy};
use crate::framing::{AsyncWriter, FrameReceiver, FrameSender, Received};
use crate::protocol::{
    self, Credit, ErrorCode, ErrorMessage, FrameError, Goodbye, Hello, HelloAck, MessageType, Ping,
    PROTOCOL_VERSION,
};

/// Messages handled per connection before moving on, so one busy client cannot starve the others.
const BATCH: usize = 64;

struct Slot {
    connection: Arc<ServerConnection>,
    receiver: FrameReceiver,
    handshaken: bool,
    /// Replies the reactor could not write because the client's ring was full; while non-empty the reactor
    /// stops reading this client (backpressure instead of loss).
    deferred: VecDeque<(u16, u64, Vec<u8>)>,
}

pub(super) fn run(shared: &Shared) {
    let mut slots: Vec<Slot> = Vec::new();
    let mut spin = SpinPolicy::new(shared.options.max_spin);
    let mut announcements_seen = 0;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            for slot in slots.drain(..) {
                close(shared, slot, DisconnectReason::ServerShutdown);
            }
            return;
        }
        if shared.inbox_ready.swap(false, Ordering::SeqCst) {
            take_inbox(shared, &mut slots);
        }
        attach_if_announced(shared, &mut slots, &mut announcements_seen, &mut spin);
        let mut progressed = false;
        let mut index = 0;
        while index < slots.len() {
            // A connecting client waits for its answer: with many connections, look for one every
            // CONNECT_CHECK_EVERY services, so a connect never waits for a whole pass.
            if index % CONNECT_CHECK_EVERY == CONNECT_CHECK_EVERY - 1 {
                attach_if_announced(shared, &mut slots, &mut announcements_seen, &mut spin);
            }
            match service(shared, &mut slots[index]) {
                Ok(did_work) => {
                    progressed |= did_work;
                    index += 1;
                }
                Err(reason) => {
                    let slot = slots.swap_remove(index);
                    close(shared, slot, reason);
                    progressed = true;
                }
            }
        }
        if !progressed {
            // `ready` looks at every connection: with many, read the clock after each look, or the spin
            // would overrun its budget many times over (each look reads every connection's ring indices).
            let checks_per_clock = (64 / slots.len().max(1)).max(1) as u32;
            doorbell::wait_forever_armed(
                shared.page.bell(),
                &mut spin,
                checks_per_clock,
                || {
                    for slot in &slots {
                        slot.connection.segment.arm_server_wakeup();
                    }
                    // For connecting clients (`EngineLink::announce`).
                    shared.page.bell().set_armed();
                },
                || {
                    let announced = || shared.page.announce_sequence() != announcements_seen;
                    shared.stop.load(Ordering::Relaxed)
                        || shared.inbox_ready.load(Ordering::Relaxed)
                        || announced()
                        || slots
                            .chunks(CONNECT_CHECK_EVERY)
                            .any(|chunk| announced() || chunk.iter().any(ready))
                },
            );
            shared.page.bell().disarm();
        }
    }
}

/// How many connections the reactor looks at between two looks for a connecting client.
const CONNECT_CHECK_EVERY: usize = 64;

/// Attaches the clients that announced since `seen` (see [`attach_announced`]).
fn attach_if_announced(
    shared: &Shared,
    slots: &mut Vec<Slot>,
    seen: &mut u32,
    spin: &mut SpinPolicy,
) {
    let announcements = shared.page.announce_sequence();
    if announcements != *seen {
        *seen = announcements;
        if attach_announced(shared, slots) {
            // Connects come in bursts (an editor starting several windows, a reconnect after an engine
            // restart): spin the full budget for the next one, however the budget had shrunk.
            *spin = SpinPolicy::new(shared.options.max_spin);
        }
    }
}

fn ready(slot: &Slot) -> bool {
    if slot.deferred.is_empty() && slot.receiver.has_data() {
        return true;
    }
    let writer = &slot.connection.writer;
    if !slot.deferred.is_empty() {
        return writer
            .lock()
            .has_space_for(slot.deferred.front().map_or(1, |d| d.2.len()))
            .unwrap_or(true);
    }
    writer.space_wanted_and_available()
}

/// Applies the acceptor's events in the order they happened (an attach followed by the same client's detach
/// must end with the connection closed).
fn take_inbox(shared: &Shared, slots: &mut Vec<Slot>) {
    let inbox = std::mem::take(&mut *crate::util::lock(&shared.inbox));
    for event in inbox.events {
        match event {
            InboxEvent::Detach { slot, generation } => detach(shared, slots, slot, generation),
            InboxEvent::Attach(attach) => {
                attach_and_answer(shared, slots, attach);
            }
        }
    }
}

/// Closes the connection of `slot` at `generation` (its client is gone), if it is still open.
fn detach(shared: &Shared, slots: &mut Vec<Slot>, slot: u32, generation: u64) {
    if let Some(index) = slots
        .iter()
        .position(|s| s.connection.slot == slot && s.connection.generation == generation)
    {
        let gone = slots.swap_remove(index);
        close(shared, gone, DisconnectReason::ClientGone);
    }
}

/// Attaches the slots whose clients rang after announcing (the engine page's hint bits): reads each
/// announcement, verifies and maps the segment here on the reactor thread, and answers its hello at once.
/// Returns true if it attached a connection.
fn attach_announced(shared: &Shared, slots: &mut Vec<Slot>) -> bool {
    let mut attached = false;
    shared.page.take_announced(|slot| {
        let opened = super::acceptor::open_announcement(shared, slot);
        if let Some(generation) = opened.replaces {
            // The slot changed hands: its previous holder is gone.
            detach(shared, slots, slot, generation);
        }
        if let Some(segment) = opened.segment {
            attached |= attach_and_answer(shared, slots, Attach { slot, segment });
        }
    });
    attached
}

/// Attaches a segment and serves it once right away, so its hello is answered before a pass over every other
/// connection.
/// Returns true if the connection stays open.
fn attach_and_answer(shared: &Shared, slots: &mut Vec<Slot>, attach: Attach) -> bool {
    let Some(mut slot) = attach_slot(shared, attach) else {
        return false;
    };
    match service(shared, &mut slot) {
        Ok(_) => {
            slots.push(slot);
            true
        }
        Err(reason) => {
            close(shared, slot, reason);
            false
        }
    }
}

/// Maps a newly announced segment into a connection; `None` (and the client told) when its rings are impossible.
fn attach_slot(shared: &Shared, Attach { slot, segment }: Attach) -> Option<Slot> {
    let segment = Arc::new(segment);
    // SAFETY: one pair of ends per segment on the server side; they live in `Slot` next to the Arc'd
    // segment that backs them (the connection holds the segment).
    let (producer, consumer) = match unsafe { segment.server_ends() } {
        Ok(ends) => ends,
        Err(e) => {
            tracing::warn!(slot, error = %e, "refusing a slot segment with impossible ring indices");
            segment.mark_server_closed();
            segment.client_bell().ring_always();
            return None;
        }
    };
    let connection = Arc::new(ServerConnection {
        slot,
        generation: segment.generation(),
        client_pid: segment.client_pid(),
        client_name: Mutex::new(String::new()),
        segment: Arc::clone(&segment),
        writer: AsyncWriter::new(FrameSender::new(producer), shared.options.send_timeout),
        closed: AtomicBool::new(false),
        credits: Mutex::new(HashMap::new()),
        credit_changed: Notify::new(),
        stream_window: shared.options.stream_window_bytes,
    });
    tracing::debug!(slot, pid = segment.client_pid(), "slot attached");
    Some(Slot {
        connection,
        receiver: FrameReceiver::new(consumer, shared.options.max_message_bytes),
        handshaken: false,
        deferred: VecDeque::new(),
    })
}

fn close(shared: &Shared, slot: Slot, reason: DisconnectReason) {
    let connection = &slot.connection;
    let goodbye = match &reason {
        DisconnectReason::ProtocolViolation(why) => Some(format!("protocol violation: {why}")),
        DisconnectReason::HandlerPanicked(why) => Some(format!(
            "internal engine error while serving this connection: {why}"
        )),
        DisconnectReason::ServerShutdown => Some("engine shutting down".into()),
        DisconnectReason::Goodbye(_) | DisconnectReason::ClientGone => None,
    };
    if let Some(Ok(payload)) = goodbye.map(|reason| protocol::encode(&Goodbye { reason })) {
        let _ = connection.try_send_raw(MessageType::Goodbye.code(), 0, &payload);
    }
    if let DisconnectReason::ProtocolViolation(why) = &reason {
        tracing::warn!(slot = connection.slot, pid = connection.client_pid, reason = %why, "closing connection");
    } else if let DisconnectReason::HandlerPanicked(why) = &reason {
        tracing::error!(slot = connection.slot, pid = connection.client_pid, panic = %why, "handler panicked; closing only this connection");
    } else {
        tracing::debug!(slot = connection.slot, ?reason, "connection closed");
    }
    connection.segment.mark_server_closed();
    connection.segment.client_bell().ring_always();
    connection.mark_closed();
    if slot.handshaken {
        shared.connections.fetch_sub(1, Ordering::AcqRel);
        if let Err(DisconnectReason::HandlerPanicked(why)) =
            isolate_panic(|| shared.handler.on_disconnect(connection, &reason))
        {
            tracing::error!(slot = connection.slot, panic = %why, "the handler panicked in on_disconnect");
        }
    }
}

type Deferred = VecDeque<(u16, u64, Vec<u8>)>;

fn queue_or_send(
    connection: &ServerConnection,
    deferred: &mut Deferred,
    message_type: u16,
    message_id: u64,
    payload: &[u8],
) -> Result<(), DisconnectReason> {
    if deferred.is_empty() {
        match connection.try_send_raw(message_type, message_id, payload) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(DisconnectReason::ProtocolViolation(e.to_string())),
        }
    }
    deferred.push_back((message_type, message_id, payload.to_vec()));
    connection.writer.lock().set_waiting_for_space(true);
    Ok(())
}

fn send_error(
    connection: &ServerConnection,
    deferred: &mut Deferred,
    message_id: u64,
    code: ErrorCode,
    message: String,
) -> Result<(), DisconnectReason> {
    let payload = protocol::encode(&ErrorMessage { code, message })
        .map_err(|e| DisconnectReason::ProtocolViolation(e.to_string()))?;
    queue_or_send(
        connection,
        deferred,
        MessageType::ErrorMessage.code(),
        message_id,
        &payload,
    )
}

/// Drains one connection. `Err` closes it.
fn service(shared: &Shared, slot: &mut Slot) -> Result<bool, DisconnectReason> {
    let mut did_work = false;
    while let Some((message_type, message_id, payload)) = slot.deferred.front() {
        match slot
            .connection
            .try_send_raw(*message_type, *message_id, payload)
        {
            Ok(true) => {
                slot.deferred.pop_front();
                did_work = true;
            }
            Ok(false) => break,
            Err(e) => return Err(DisconnectReason::ProtocolViolation(e.to_string())),
        }
    }
    did_work |= slot.connection.writer.wake_if_space();
    let head_before = slot.receiver.consumer().position();
    for _ in 0..BATCH {
        if !slot.deferred.is_empty() {
            break;
        }
        let received = slot
            .receiver
            .poll()
            .map_err(|e| DisconnectReason::ProtocolViolation(e.to_string()))?;
        match received {
            Received::Nothing => break,
            Received::Rejected { message_id, error } => {
                did_work = true;
                let code = match error {
                    FrameError::UnsupportedVersion { .. } => ErrorCode::VersionMismatch,
                    FrameError::TooLarge { .. } => ErrorCode::MessageTooLarge,
                    _ => ErrorCode::Protocol,
                };
                send_error(
                    &slot.connection,
                    &mut slot.deferred,
                    message_id,
                    code,
                    error.to_string(),
                )?;
            }
            Received::Message => {
                did_work = true;
                dispatch(shared, slot)?;
            }
        }
    }
    // Only a pass that released ring space (whole messages or fragments) can owe the client a wake-up (a
    // client that announced its wait after our last release re-checks the head itself): idle connections
    // cost no fence here.
    let released = slot.receiver.consumer().position() != head_before;
    if released && slot.receiver.take_peer_waiting_for_space() {
        slot.connection.segment.client_bell().ring();
    }
    Ok(did_work)
}

fn dispatch(shared: &Shared, slot: &mut Slot) -> Result<(), DisconnectReason> {
    let violation = |why: String| DisconnectReason::ProtocolViolation(why);
    let Slot {
        connection,
        receiver,
        handshaken,
        deferred,
    } = slot;
    let message = receiver.message();
    let header = message.header;
    let Some(message_type) = message.message_type() else {
        return send_error(
            connection,
            deferred,
            header.message_id,
            ErrorCode::UnknownMessageType,
            format!("unknown message type {}", header.message_type),
        );
    };
    if !*handshaken {
        if message_type != MessageType::Hello {
            return Err(violation(format!(
                "expected hello, got {}",
                message_type.name()
            )));
        }
        let hello = message
            .decode_owned::<Hello>()
            .map_err(|e| violation(e.to_string()))?;
        handshake(shared, connection, deferred, hello)?;
        *handshaken = true;
        shared.connections.fetch_add(1, Ordering::AcqRel);
        return isolate_panic(|| shared.handler.on_connect(connection));
    }
    match message_type {
        MessageType::Hello => Err(violation("second hello".into())),
        MessageType::Ping => {
            // Validate, then echo the payload bytes: Ping and Pong archive identically.
            if let Err(e) = message.decode::<Ping>() {
                return send_error(
                    connection,
                    deferred,
                    header.message_id,
                    ErrorCode::InvalidPayload,
                    e.to_string(),
                );
            }
            queue_or_send(
                connection,
                deferred,
                MessageType::Pong.code(),
                header.message_id,
                message.payload,
            )
        }
        MessageType::Credit => match message.decode::<Credit>() {
            Ok(credit) => {
                connection.add_credit(credit.request_id.to_native(), credit.bytes.to_native());
                Ok(())
            }
            Err(e) => send_error(
                connection,
                deferred,
                header.message_id,
                ErrorCode::InvalidPayload,
                e.to_string(),
            ),
        },
        MessageType::Goodbye => {
            let reason = message
                .decode::<Goodbye>()
                .map(|g| g.reason.to_string())
                .unwrap_or_default();
            Err(DisconnectReason::Goodbye(reason))
        }
        _ => isolate_panic(|| shared.handler.on_message(connection, &message)),
    }
}

/// Runs a handler callback; a panic in it closes only the connection it was serving, never the reactor.
fn isolate_panic(callback: impl FnOnce()) -> Result<(), DisconnectReason> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(callback))
        .map_err(|panic| DisconnectReason::HandlerPanicked(crate::util::panic_text(&*panic)))
}

fn handshake(
    shared: &Shared,
    connection: &ServerConnection,
    deferred: &mut Deferred,
    hello: Hello,
) -> Result<(), DisconnectReason> {
    let (c2s, s2c) = connection.segment.ring_sizes();
    let refusal = if hello.protocol_version != PROTOCOL_VERSION {
        Some((
            ErrorCode::VersionMismatch,
            format!(
                "client speaks protocol version {}, engine {PROTOCOL_VERSION}; update both to the same release",
                hello.protocol_version
            ),
        ))
    } else if hello.generation != connection.generation
        || hello.client_to_server_ring_bytes as usize != c2s
        || hello.server_to_client_ring_bytes as usize != s2c
    {
        Some((
            ErrorCode::Protocol,
            "hello does not match the slot segment".to_owned(),
        ))
    } else if connection.slot >= shared.options.max_connections {
        Some((
            ErrorCode::SlotLimit,
            format!(
                "the engine accepts at most {} connections",
                shared.options.max_connections
            ),
        ))
    } else {
        None
    };
    if let Some((code, message)) = refusal {
        send_error(connection, deferred, 0, code, message.clone())?;
        return Err(DisconnectReason::ProtocolViolation(message));
    }
    *crate::util::lock(&connection.client_name) = hello.client_name;
    let ack = HelloAck {
        protocol_version: PROTOCOL_VERSION,
        slot: connection.slot,
        server_pid: std::process::id(),
        max_message_bytes: shared.options.max_message_bytes,
        stream_window_bytes: shared.options.stream_window_bytes,
        server_name: shared.options.server_name.clone(),
    };
    let payload =
        protocol::encode(&ack).map_err(|e| DisconnectReason::ProtocolViolation(e.to_string()))?;
    queue_or_send(
        connection,
        deferred,
        MessageType::HelloAck.code(),
        0,
        &payload,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::SlotSegment;
    use crate::server::ServerHandler;
    use crate::{Endpoint, ReceivedMessage};

    struct Silent;
    impl ServerHandler for Silent {
        fn on_message(&self, _: &Arc<ServerConnection>, _: &ReceivedMessage<'_>) {}
    }

    /// A client attached and gone before the reactor looked: both events wait in one inbox. Applied in the order
    /// they happened, the connection ends closed; a detach applied before its attach would find nothing to close
    /// and leave a dead client's connection open for good.
    #[test]
    fn an_attach_and_its_detach_in_one_inbox_leave_the_connection_closed() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::Builder::new()
            .prefix("lapce-ai-inbox")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let endpoint = Endpoint::in_root("inbox", root.path()).unwrap();
        let (shared, engine_lock) = Shared::for_test(&endpoint, Arc::new(Silent)).unwrap();

        const SLOT: u32 = 3;
        let generation = 0x1b0c_u64;
        let client_side = SlotSegment::create(4096, 4096, generation).unwrap();
        let fd = client_side.memfd_number().unwrap();
        let server_side = SlotSegment::open_announced(std::process::id(), fd, generation).unwrap();
        shared.post(|inbox| {
            inbox.events.push(InboxEvent::Attach(Attach {
                slot: SLOT,
                segment: server_side,
            }));
            inbox.events.push(InboxEvent::Detach {
                slot: SLOT,
                generation,
            });
        });
        let mut slots = Vec::new();
        take_inbox(&shared, &mut slots);
        assert!(
            slots.is_empty(),
            "the connection of a client that is gone must not stay open"
        );
        assert!(
            client_side.server_closed(),
            "the client side sees its connection closed"
        );

        drop(shared);
        engine_lock.remove();
    }
}
