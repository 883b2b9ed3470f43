//! Reading the source into the ring of stored packets: a window's blocks with one vectored
//! read where the source allows it, block by block otherwise, each straight into its
//! packet behind the DATA header.

use std::io::{self, IoSliceMut};

use super::Session;
use crate::packet::{write_data_header, DATA_HEADER_LEN};

/// `Interrupted` errors in a row after which a source counts as not ready (`WouldBlock`),
/// so that a source that returns `Interrupted` forever cannot hang the event loop.
pub(super) const MAX_INTERRUPTED: u32 = 16;

/// Most blocks read with one vectored read (a window's worth for the usual windows).
const MAX_VECTORED: usize = 64;

impl Session {
    /// Reads up to `count` blocks from `filled + 1` on (slots that do not wrap) with one
    /// [`ResponseData::read_vectored`], each straight into its packet. Full blocks are
    /// stored; what the source gave of the next one stays as `partial`, for
    /// [`read_block`](Self::read_block) to finish (it also sees the end, and retries
    /// `Interrupted`). `Ok(false)` means the source would block.
    pub(super) fn read_blocks(&mut self, count: u64) -> io::Result<bool> {
        let mut count = (count as usize).min(MAX_VECTORED);
        let slot_len = self.slot_len();
        let blksize = slot_len - DATA_HEADER_LEN;
        if let Some(size) = self.announced {
            // No ring slots for blocks past the announced end (a source whose data runs
            // longer is read on block by block).
            let left = size.saturating_sub(self.stats.bytes_read + self.partial as u64);
            count = count.min((left / blksize as u64) as usize + 1);
        }
        let first_slot = self.slot(self.filled + 1);
        self.ensure_slots(first_slot + count);
        let start = first_slot * slot_len;
        let Some(region) = self.ring.get_mut(start..start + count * slot_len) else {
            return Ok(true);
        };
        let mut bufs: [IoSliceMut<'_>; MAX_VECTORED] =
            std::array::from_fn(|_| IoSliceMut::new(&mut []));
        for (buf, packet) in bufs.iter_mut().zip(region.chunks_exact_mut(slot_len)) {
            *buf = IoSliceMut::new(&mut packet[DATA_HEADER_LEN..]);
        }
        let n = match self.source.read_vectored(&mut bufs[..count]) {
            Ok(n) => n.min(count * blksize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        };
        for _ in 0..n / blksize {
            self.store_block(blksize, false);
        }
        self.partial = n % blksize;
        Ok(true)
    }

    /// Reads block `filled + 1` into its slot. `Ok(false)` means the source would block.
    pub(super) fn read_block(&mut self) -> io::Result<bool> {
        let slot_len = self.slot_len();
        let slot = self.slot(self.filled + 1);
        self.ensure_slots(slot + 1);
        let start = slot * slot_len;
        let packet = &mut self.ring[start..start + slot_len];
        let blksize = slot_len - DATA_HEADER_LEN;
        let mut eof = false;
        let mut interrupted = 0;
        while self.partial < blksize {
            match self
                .source
                .read(&mut packet[DATA_HEADER_LEN + self.partial..])
            {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    self.partial += n.min(blksize - self.partial);
                    interrupted = 0;
                }
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted && interrupted < MAX_INTERRUPTED =>
                {
                    interrupted += 1;
                }
                // A source that is interrupted again and again is not ready: never spin.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    return Ok(false)
                }
                Err(e) => return Err(e),
            }
        }
        self.store_block(self.partial, eof);
        Ok(true)
    }

    /// Makes the ring hold at least `slots` slots (at most the window): it grows by
    /// doubling, so reading a window block by block copies little, and never holds more
    /// than twice the slots in use nor more than one window.
    pub(super) fn ensure_slots(&mut self, slots: usize) {
        let have = self.lens.len();
        let window = self.params.window.max(1) as usize;
        if slots <= have {
            return;
        }
        let target = (have * 2).clamp(slots, window.max(slots));
        let slot_len = self.slot_len();
        self.ring.reserve_exact(target * slot_len - self.ring.len());
        self.ring.resize(target * slot_len, 0);
        self.lens.reserve_exact(target - have);
        self.lens.resize(target, 0);
        self.sent_at.reserve_exact(target - have);
        // Marked as resent: a slot not yet used never gives a round-trip sample.
        self.sent_at.resize(target, (self.now, true));
    }

    /// Block `filled + 1` holds `payload` bytes in its slot: writes its header and counts
    /// it read (the last block when the source reached its end).
    pub(super) fn store_block(&mut self, payload: usize, eof: bool) {
        let block = self.filled + 1;
        let slot = self.slot(block);
        let slot_len = self.slot_len();
        let packet = &mut self.ring[slot * slot_len..(slot + 1) * slot_len];
        write_data_header(packet, block as u16).expect("slot holds a header");
        self.lens[slot] = DATA_HEADER_LEN + payload;
        self.stats.bytes_read += payload as u64;
        if eof {
            self.last = Some(block);
            if self
                .announced
                .is_some_and(|size| size != self.stats.bytes_read)
            {
                self.stats.size_mismatch = self.announced;
            }
        }
        self.partial = 0;
        self.filled = block;
        self.stalled_since = None;
    }
}
