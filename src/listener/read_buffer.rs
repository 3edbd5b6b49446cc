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
        let full = self.buf.len() == capacity;
        session.handle_input_owned(&mut self.buf);
        if self.buf.capacity() == 0 {
            // The session kept the buffer as message content (no copy of it).
            self.buf = Vec::with_capacity(capacity);
        }
        self.buf.clear();
        if full && capacity < CONTENT_READ && in_message {
            // Message content filled the buffer: a large message is coming in, read it in
            // larger pieces (fewer reads, each decoded at once).
            self.buf = Vec::with_capacity(CONTENT_READ);
        }
    }
}
