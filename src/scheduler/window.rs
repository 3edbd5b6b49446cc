//! A store's concurrency window: how many transactions may run at once.
//!
//! Postfix's destination concurrency feedback, in integers: the window starts at
//! `initial_window` (slow start, capped by the store's `max_connections`); a run of as many
//! consecutive successes as the window is wide raises it by one (positive feedback of
//! 1/window per success), up to `max_connections`; a failure — a connection or handshake
//! failure, or a "busy" reply (`421`, `4.3.2`, `4.7.0`) — lowers it by one, never below one,
//! and restarts the run. When a store comes back after being down the window restarts at
//! the initial value, so the backlog drains at slow-start pace, not as a flood.

use postern_proto::Reply;

/// One store's window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    current: usize,
    initial: usize,
    max: usize,
    run: usize,
}

impl Window {
    /// A window at `initial`, at most `max` (both at least 1).
    pub fn new(initial: usize, max: usize) -> Self {
        let max = max.max(1);
        let initial = initial.clamp(1, max);
        Self {
            current: initial,
            initial,
            max,
            run: 0,
        }
    }

    /// Transactions allowed at once now.
    pub fn limit(&self) -> usize {
        self.current
    }

    /// The most it can grow to.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A transaction went through without trouble beyond its recipients.
    pub fn on_success(&mut self) {
        self.run += 1;
        if self.run >= self.current {
            self.run = 0;
            self.current = (self.current + 1).min(self.max);
        }
    }

    /// A connection or handshake failure, or a busy reply.
    pub fn on_failure(&mut self) {
        self.run = 0;
        self.current = self.current.saturating_sub(1).max(1);
    }

    /// Back to the initial window (after the store recovered).
    pub fn restart(&mut self) {
        self.run = 0;
        self.current = self.initial;
    }
}

/// Is this reply the store saying it is too busy (`421`, `4.3.2` system not accepting
/// messages, `4.7.0` temporary refusal such as a rate limit)?
pub fn is_busy(reply: &Reply) -> bool {
    if reply.code().get() == 421 {
        return true;
    }
    reply.enhanced().is_some_and(|e| {
        reply.is_transient() && e.class == 4 && matches!((e.subject, e.detail), (3, 2) | (7, 0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_proto::reply::{EnhancedCode, ReplyCode};

    #[test]
    fn slow_start_then_grows_after_runs_of_success() {
        let mut w = Window::new(5, 20);
        assert_eq!(w.limit(), 5);
        for _ in 0..4 {
            w.on_success();
        }
        assert_eq!(
            w.limit(),
            5,
            "a run shorter than the window changes nothing"
        );
        w.on_success();
        assert_eq!(w.limit(), 6);
        for _ in 0..6 {
            w.on_success();
        }
        assert_eq!(w.limit(), 7);
        for _ in 0..1000 {
            w.on_success();
        }
        assert_eq!(w.limit(), 20, "capped at max_connections");
    }

    #[test]
    fn failures_lower_it_and_break_the_run() {
        let mut w = Window::new(5, 20);
        for _ in 0..4 {
            w.on_success();
        }
        w.on_failure();
        assert_eq!(w.limit(), 4);
        for _ in 0..3 {
            w.on_success();
        }
        assert_eq!(w.limit(), 4, "the run restarted at the failure");
        w.on_success();
        assert_eq!(w.limit(), 5);
        for _ in 0..10 {
            w.on_failure();
        }
        assert_eq!(w.limit(), 1, "never below one");
        w.on_success();
        assert_eq!(w.limit(), 2);
        w.restart();
        assert_eq!(w.limit(), 5);
    }

    #[test]
    fn initial_is_capped_by_max() {
        assert_eq!(Window::new(5, 2).limit(), 2);
        assert_eq!(Window::new(0, 0).limit(), 1);
    }

    #[test]
    fn busy_replies() {
        let r = |c: u16, e: Option<(u8, u16, u16)>| {
            Reply::new(
                ReplyCode::new(c).unwrap(),
                e.map(|(a, b, c)| EnhancedCode::new(a, b, c)),
                "x",
            )
        };
        assert!(is_busy(&r(421, None)));
        assert!(is_busy(&r(451, Some((4, 3, 2)))));
        assert!(is_busy(&r(450, Some((4, 7, 0)))));
        assert!(!is_busy(&r(451, Some((4, 2, 0)))));
        assert!(!is_busy(&r(550, Some((5, 7, 0)))));
        assert!(!is_busy(&r(250, Some((2, 0, 0)))));
    }
}
