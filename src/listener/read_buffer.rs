//! [`ReadBuffer`]: what a connection reads into, and how big.
//!
//! 8 KiB for commands and small messages; 64 KiB once message content filled it, so a
//! large message comes in few reads. Reads go into spare capacity (`read_buf`: the buffer
//! is never zeroed). The session may keep the buffer as message content instead of copying
//! it (`ServerSession::handle_input_owned`); a new one of the same size takes its place.

use postern_proto::server::ServerSession;

/// The read buffer of a connection: commands, and small messages.
const READ: usize = 8 << 10;
/// The read buffer once message content filled `READ`: a large message in few reads.
const CONTENT_READ: usize = 64 << 10;

/// A connection's read buffer (see the module header).
#[derive(Debug)]
pub(super) struct ReadBuffer {
    buf: Vec<u8>,
}

impl ReadBuffer {
    pub(super) fn new() -> Self {
        Self {
            buf: Vec::with_capacity(READ),
        }
    }

    /// Where the next read goes (empty, with room for it).
    pub(super) fn next_read(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// The octets of the last read.
    pub(super) fn octets(&self) -> &[u8] {
        &self.buf
    }

    /// Hands the octets of the last read to `session` and readies the buffer for the next
    /// read; `in_message`: message content is being received.
    pub(super) fn hand_over(&mut self, session: &mut ServerSession, in_message: bool) {
        let capacity = self.buf.capacity();
        // Message content filled the buffer: a large message is coming in, read it in
        // larger pieces (fewer reads, each decoded at once).
        let grow = self.buf.len() == capacity && capacity < CONTENT_READ && in_message;
        session.handle_input_owned(&mut self.buf);
        if grow {
            self.buf = Vec::with_capacity(CONTENT_READ);
        } else if self.buf.capacity() == 0 {
            // The session kept the buffer as message content (no copy of it).
            self.buf = Vec::with_capacity(capacity);
        } else {
            self.buf.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use postern_proto::server::{Protocol, ServerConfig, ServerEvent};

    use super::*;

    /// A session past `DATA ... 354`; the content it has been handed so far.
    fn in_data() -> ServerSession {
        let mut s = ServerSession::new(ServerConfig::new(Protocol::Smtp, "mx.test"));
        s.handle_input(b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n");
        let _ = content(&mut s);
        s
    }

    fn content(s: &mut ServerSession) -> Vec<u8> {
        let mut got = Vec::new();
        while let Some(event) = s.poll_event() {
            match event {
                ServerEvent::Mail { .. } | ServerEvent::Rcpt { .. } | ServerEvent::DataStart => {
                    s.accept().unwrap();
                }
                ServerEvent::Data(bytes) => got.extend_from_slice(&bytes),
                _ => {}
            }
        }
        got
    }

    fn read(buf: &mut ReadBuffer, octets: &[u8]) {
        let next = buf.next_read();
        assert!(next.is_empty() && next.capacity() >= octets.len());
        next.extend_from_slice(octets);
    }

    #[test]
    fn grows_once_content_fills_it_and_replaces_a_buffer_the_session_kept() {
        let line = b"A line of the message, long enough to be content.\r\n";
        let mut s = in_data();
        let mut buf = ReadBuffer::new();
        // Content that fills the 8 KiB buffer: kept by the session, 64 KiB from now on.
        let full: Vec<u8> = line.iter().copied().cycle().take(READ).collect();
        read(&mut buf, &full);
        buf.hand_over(&mut s, true);
        assert_eq!(content(&mut s), full);
        assert_eq!(buf.next_read().capacity(), CONTENT_READ);
        // Kept again (over 4 KiB of content): a new buffer of the same size.
        let part = line.repeat(100);
        read(&mut buf, &part);
        buf.hand_over(&mut s, true);
        assert_eq!(content(&mut s), part);
        assert_eq!(buf.next_read().capacity(), CONTENT_READ);
        // Copied (a few octets): the same buffer, emptied.
        read(&mut buf, b"end\r\n.\r\n");
        let at = buf.next_read().as_ptr();
        buf.hand_over(&mut s, true);
        assert_eq!(content(&mut s), b"end\r\n");
        assert_eq!(buf.next_read().as_ptr(), at);
    }

    #[test]
    fn commands_never_grow_it() {
        let mut s = ServerSession::new(ServerConfig::new(Protocol::Smtp, "mx.test"));
        let mut buf = ReadBuffer::new();
        let noops: Vec<u8> = b"NOOP\r\n".iter().copied().cycle().take(READ).collect();
        read(&mut buf, &noops);
        buf.hand_over(&mut s, false);
        assert_eq!(buf.next_read().capacity(), READ);
    }
}
