//! The log's writer: every thread appends its formatted lines to one buffer in memory, and
//! a thread of its own writes that buffer out (to stderr in the daemon) in one `write` per
//! [`LINGER`], or at once when it holds [`FLUSH_AT`] bytes.
//!
//! Why not `tracing_appender::non_blocking`: its worker thread is woken for every line and,
//! before it sleeps again, spins and calls `sched_yield` (crossbeam's back-off). A gateway
//! logs three lines per message (accepted, delivered, removed), so on a two-core box that
//! thread took CPU from the sessions at every message: measured with shape d of
//! `bench/e2e.sh` (one session), about five `sched_yield` and one wake-up per message, and
//! 0.04 ms of CPU per message more than with the lines switched off. Here a line costs a
//! short, uncontended mutex and a copy; the writing thread wakes at most once per
//! [`LINGER`] while lines come.
//!
//! Promises:
//! - Lines are written whole and in the order they were appended; none is dropped. When
//!   the output cannot keep up and [`CAP`] bytes wait, appending threads wait for room
//!   (as `non_blocking` with `lossy(false)` does).
//! - A line is written within [`LINGER`] of being appended (unless the output blocks).
//! - Dropping the [`LogGuard`] writes everything appended before; lines appended after it
//!   are written directly, unbuffered.
//! - A write error on the output is not retried: those lines are lost, the next are tried
//!   (there is nowhere else to report it).

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The longest a line waits in memory before it is written.
pub const LINGER: Duration = Duration::from_millis(20);
/// A buffer this large is written at once, without waiting for [`LINGER`].
pub const FLUSH_AT: usize = 64 << 10;
/// Appending waits while this much waits to be written.
pub const CAP: usize = 4 << 20;

type Output = Box<dyn Write + Send>;

struct State {
    buf: Vec<u8>,
    /// The writing thread waits without a timeout (nothing buffered): wake it.
    idle: bool,
    /// The guard was dropped: the thread wrote what was left and ended.
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// For the writing thread: lines came into an empty buffer, the buffer is full, or
    /// closing.
    work: Condvar,
    /// For appending threads: the buffer was written out.
    room: Condvar,
    /// The output, used by the writing thread, and directly once closed.
    out: Mutex<Output>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What `tracing_subscriber` writes through (`with_writer`). Cheap to clone.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Keeps the writing thread; dropping it writes what is buffered and ends the thread.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A writer to `out` and its guard. Fails only if the thread cannot be started.
pub fn buffered(out: impl Write + Send + 'static) -> io::Result<(LogWriter, LogGuard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            buf: Vec::with_capacity(FLUSH_AT),
            idle: false,
            closed: false,
        }),
        work: Condvar::new(),
        room: Condvar::new(),
        out: Mutex::new(Box::new(out)),
    });
    let s = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("postern-log".into())
        .spawn(move || s.run())?;
    Ok((
        LogWriter {
            shared: Arc::clone(&shared),
        },
        LogGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

impl Shared {
    /// The writing thread.
    fn run(&self) {
        let mut spare = Vec::with_capacity(FLUSH_AT);
        let mut st = lock(&self.state);
        loop {
            if st.buf.is_empty() {
                if st.closed {
                    return;
                }
                st.idle = true;
                st = self.work.wait(st).unwrap_or_else(|e| e.into_inner());
                st.idle = false;
                continue;
            }
            if st.buf.len() < FLUSH_AT && !st.closed {
                // Let more lines come; they do not wake this thread again.
                st = self
                    .work
                    .wait_timeout(st, LINGER)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            std::mem::swap(&mut st.buf, &mut spare);
            drop(st);
            self.room.notify_all();
            let mut out = lock(&self.out);
            // Nowhere to report a failure: these lines are lost, the next are tried.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            drop(out);
            spare.clear();
            if spare.capacity() > 4 * FLUSH_AT {
                spare = Vec::with_capacity(FLUSH_AT);
            }
            st = lock(&self.state);
        }
    }

    fn append(&self, line: &[u8]) {
        let mut st = lock(&self.state);
        if st.closed {
            drop(st);
            let mut out = lock(&self.out);
            let _ = out.write_all(line).and_then(|()| out.flush());
            return;
        }
        while st.buf.len() >= CAP && !st.closed {
            st = self.room.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let was_empty = st.buf.is_empty();
        st.buf.extend_from_slice(line);
        let wake = (was_empty && std::mem::take(&mut st.idle))
            || (st.buf.len() >= FLUSH_AT && st.buf.len() - line.len() < FLUSH_AT);
        drop(st);
        if wake {
            self.work.notify_one();
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.work.notify_one();
        self.shared.room.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One event's writer: `tracing_subscriber` formats the line first and writes it whole.
pub struct LineWriter<'a> {
    shared: &'a Shared,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that keeps what is written, optionally slowly.
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
        slow: Option<Duration>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(d) = self.slow {
                std::thread::sleep(d);
            }
            lock(&self.bytes).extend_from_slice(buf);
            *lock(&self.writes) += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn line(thread: usize, i: usize) -> String {
        format!("thread {thread} line {i} {}\n", "x".repeat(i % 97))
    }

    /// Every line from every thread, whole and in each thread's order, in few writes.
    #[test]
    fn every_line_arrives_whole_and_in_order() {
        let sink = Sink::default();
        let (writer, guard) = buffered(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = writer.clone();
                std::thread::spawn(move || {
                    use tracing_subscriber::fmt::MakeWriter;
                    for i in 0..5000 {
                        w.make_writer().write_all(line(t, i).as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(lock(&sink.bytes).clone()).unwrap();
        let mut next = [0usize; 4];
        for l in text.lines() {
            let t: usize = l.split(' ').nth(1).unwrap().parse().unwrap();
            assert_eq!(
                format!("{l}\n"),
                line(t, next[t]),
                "a line was cut or reordered"
            );
            next[t] += 1;
        }
        assert_eq!(next, [5000; 4], "lines were lost");
        let writes = *lock(&sink.writes);
        assert!(
            writes < 2000,
            "{writes} writes for 20000 lines: not batched"
        );
    }

    /// A line is written within LINGER (and a little) without more lines to push it.
    #[test]
    fn a_lone_line_is_written_soon() {
        let sink = Sink::default();
        let (writer, _guard) = buffered(sink.clone()).unwrap();
        use tracing_subscriber::fmt::MakeWriter;
        writer.make_writer().write_all(b"one\n").unwrap();
        let start = std::time::Instant::now();
        while lock(&sink.bytes).is_empty() {
            assert!(start.elapsed() < Duration::from_secs(2), "never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(&*lock(&sink.bytes), b"one\n");
    }

    /// A slow output makes appenders wait at CAP instead of dropping lines.
    #[test]
    fn a_slow_output_holds_appenders_back_and_loses_nothing() {
        let sink = Sink {
            slow: Some(Duration::from_millis(5)),
            ..Sink::default()
        };
        let (writer, guard) = buffered(sink.clone()).unwrap();
        use tracing_subscriber::fmt::MakeWriter;
        let big = vec![b'y'; 1 << 20];
        for _ in 0..12 {
            writer.make_writer().write_all(&big).unwrap();
        }
        drop(guard);
        assert_eq!(lock(&sink.bytes).len(), 12 << 20);
        // After the guard: written directly.
        writer.make_writer().write_all(b"late\n").unwrap();
        assert!(lock(&sink.bytes).ends_with(b"late\n"));
    }
}
