//! Idle exit: the daemon stops after a configurable time with no clients (a `status` query does not count).

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

/// `serve --idle-exit`: how long without clients before the daemon exits (`None` = never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleExit(pub Option<Duration>);

impl fmt::Display for IdleExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("never"),
            Some(d) => write!(f, "{}s", d.as_secs()),
        }
    }
}

/// Parses `90s`, `30m`, `2h`, a plain number of minutes, or `never`/`0`.
pub fn parse_idle_exit(text: &str) -> Result<IdleExit, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("never") {
        return Ok(IdleExit(None));
    }
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "m"),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 30m, 2h or never"))?;
    let seconds = match unit.trim() {
        "s" | "sec" | "secs" => value,
        "m" | "min" | "mins" => value.saturating_mul(60),
        "h" => value.saturating_mul(3600),
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use s, m or h)"
            ))
        }
    };
    Ok(IdleExit(
        (seconds > 0).then(|| Duration::from_secs(seconds)),
    ))
}

/// What a connection has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Connected, nothing sent yet (an editor bridge waiting for keystrokes).
    Fresh,
    /// Only asked for status (the CLI's `status`): does not keep the daemon alive.
    StatusOnly,
    Active,
}

/// Tracks clients and when the daemon became idle.
#[derive(Debug)]
pub struct IdleTracker {
    after: Option<Duration>,
    connections: HashMap<(u32, u64), Kind>,
    idle_since: Instant,
}

impl IdleTracker {
    pub fn new(after: Option<Duration>, now: Instant) -> Self {
        Self {
            after,
            connections: HashMap::new(),
            idle_since: now,
        }
    }

    pub fn after(&self) -> Option<Duration> {
        self.after
    }

    pub fn connected(&mut self, key: (u32, u64)) {
        self.connections.insert(key, Kind::Fresh);
    }

    /// A message arrived on `key`; `status_request` says whether it was a `StatusRequest`.
    pub fn message(&mut self, key: (u32, u64), status_request: bool) {
        let kind = self.connections.entry(key).or_insert(Kind::Fresh);
        *kind = match (*kind, status_request) {
            (Kind::Fresh, true) => Kind::StatusOnly,
            (Kind::StatusOnly, true) => Kind::StatusOnly,
            _ => Kind::Active,
        };
    }

    pub fn disconnected(&mut self, key: (u32, u64), now: Instant) {
        let kind = self.connections.remove(&key);
        if kind != Some(Kind::StatusOnly) && !self.has_clients() {
            self.idle_since = now;
        }
    }

    fn has_clients(&self) -> bool {
        self.connections.values().any(|k| *k != Kind::StatusOnly)
    }

    /// Time left before the idle exit, counted from when the last client left; `None` while clients are
    /// connected or requests run, or when the daemon never exits.
    pub fn remaining(&self, requests_running: bool, now: Instant) -> Option<Duration> {
        let after = self.after?;
        if self.has_clients() || requests_running {
            return None;
        }
        Some(after.saturating_sub(now.saturating_duration_since(self.idle_since)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(
            parse_idle_exit("90s"),
            Ok(IdleExit(Some(Duration::from_secs(90))))
        );
        assert_eq!(
            parse_idle_exit("30"),
            Ok(IdleExit(Some(Duration::from_secs(1800))))
        );
        assert_eq!(
            parse_idle_exit("2h"),
            Ok(IdleExit(Some(Duration::from_secs(7200))))
        );
        assert_eq!(parse_idle_exit("never"), Ok(IdleExit(None)));
        assert_eq!(parse_idle_exit("0"), Ok(IdleExit(None)));
        assert!(parse_idle_exit("soon").is_err());
        assert!(parse_idle_exit("5d").is_err());
        let round_trip = parse_idle_exit(&IdleExit(Some(Duration::from_secs(42))).to_string());
        assert_eq!(round_trip, Ok(IdleExit(Some(Duration::from_secs(42)))));
    }

    #[test]
    fn clients_hold_the_daemon_and_status_queries_do_not() {
        let t0 = Instant::now();
        let after = Duration::from_secs(60);
        let mut idle = IdleTracker::new(Some(after), t0);
        assert_eq!(
            idle.remaining(false, t0 + Duration::from_secs(10)),
            Some(Duration::from_secs(50))
        );

        // A bridge connects (sends nothing yet): no countdown.
        idle.connected((0, 1));
        assert_eq!(idle.remaining(false, t0 + Duration::from_secs(20)), None);
        // A status query meanwhile does not change that.
        idle.connected((1, 1));
        idle.message((1, 1), true);
        assert_eq!(idle.remaining(false, t0 + Duration::from_secs(21)), None);
        idle.disconnected((1, 1), t0 + Duration::from_secs(22));
        // The bridge leaves: the countdown starts from then.
        idle.disconnected((0, 1), t0 + Duration::from_secs(30));
        assert_eq!(
            idle.remaining(false, t0 + Duration::from_secs(40)),
            Some(Duration::from_secs(50))
        );
        // A status query does not restart it, and sees the time left.
        idle.connected((1, 2));
        idle.message((1, 2), true);
        assert_eq!(
            idle.remaining(false, t0 + Duration::from_secs(45)),
            Some(Duration::from_secs(45))
        );
        idle.disconnected((1, 2), t0 + Duration::from_secs(46));
        assert_eq!(
            idle.remaining(false, t0 + Duration::from_secs(100)),
            Some(Duration::ZERO)
        );
        // A running request (e.g. a CLI completion) holds it.
        assert_eq!(idle.remaining(true, t0 + Duration::from_secs(101)), None);

        let never = IdleTracker::new(None, t0);
        assert_eq!(
            never.remaining(false, t0 + Duration::from_secs(1_000_000)),
            None
        );
    }
}
