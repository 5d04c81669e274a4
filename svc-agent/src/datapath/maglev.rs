//! The shared Maglev array: a block allocator over its slots and a
//! writable memory mapping of it.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::maps::MapData;
use svc_common::lb::BackendId;

use super::{Error, Result};

/// A run of slots owned by one service's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub offset: u32,
    pub len: u32,
}

/// First-fit allocator of slot runs, merging neighbours on free.
#[derive(Debug)]
pub struct SlotAllocator {
    /// Free runs by offset.
    free: BTreeMap<u32, u32>,
    capacity: u32,
}

impl SlotAllocator {
    #[must_use]
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self { free, capacity }
    }

    /// A block of `len` slots, or `None` when no free run is long enough.
    pub fn allocate(&mut self, len: u32) -> Option<Block> {
        let (&offset, &run) = self.free.iter().find(|&(_, &run)| run >= len)?;
        self.free.remove(&offset);
        if run > len {
            self.free.insert(offset + len, run - len);
        }
        Some(Block { offset, len })
    }

    pub fn free(&mut self, block: Block) {
        let mut offset = block.offset;
        let mut len = block.len;
        if let Some((&prev, &prev_len)) = self.free.range(..offset).next_back()
            && prev + prev_len == offset
        {
            self.free.remove(&prev);
            offset = prev;
            len += prev_len;
        }
        if let Some(next_len) = self.free.remove(&(offset + len)) {
            len += next_len;
        }
        self.free.insert(offset, len);
    }

    /// Marks `block` as owned (adopting the tables of a previous run).
    /// `false` if any of its slots is already owned or out of range.
    pub fn reserve(&mut self, block: Block) -> bool {
        let end = block.offset + block.len;
        let Some((&start, &run)) = self.free.range(..=block.offset).next_back() else {
            return false;
        };
        if start + run < end {
            return false;
        }
        self.free.remove(&start);
        if block.offset > start {
            self.free.insert(start, block.offset - start);
        }
        if start + run > end {
            self.free.insert(end, start + run - end);
        }
        true
    }

    /// Slots not owned by any block.
    #[must_use]
    pub fn free_slots(&self) -> u32 {
        self.free.values().sum()
    }

    #[must_use]
    pub const fn capacity(&self) -> u32 {
        self.capacity
    }
}

/// The kernel stores array elements 8-byte aligned: in the mapping, slot
/// `i` is the `BackendId` at byte `8 * i`.
const ELEMENT_STRIDE: usize = size_of::<BackendId>().next_multiple_of(8);
const IDS_PER_ELEMENT: usize = ELEMENT_STRIDE / size_of::<BackendId>();

/// `MAGLEV_MAP` mapped into our memory (the map is `BPF_F_MMAPABLE`):
/// writing a table is a memory write per slot, not a syscall per slot.
pub struct MaglevArea {
    ptr: NonNull<BackendId>,
    slots: u32,
    // Keeps the map (and so the mapping's object) alive.
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory owned by this value.
unsafe impl Send for MaglevArea {}

impl MaglevArea {
    pub fn map(map: MapData, slots: u32) -> Result<Self> {
        let bytes = slots as usize * ELEMENT_STRIDE;
        // SAFETY: mapping a BPF array fd read-write and shared, with the
        // length of its values; the kernel checks the map is mmapable.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast())
            .ok_or_else(|| Error::Mmap(std::io::Error::other("mmap returned a null pointer")))?;
        Ok(Self {
            ptr,
            slots,
            _map: map,
        })
    }

    /// Copies `table` into `block`.
    ///
    /// # Panics
    ///
    /// If the table does not fit the block or the block lies outside the
    /// map; the allocator never hands out such blocks.
    pub fn write(&mut self, block: Block, table: &[BackendId]) {
        assert!(
            table.len() <= block.len as usize,
            "table larger than its block"
        );
        assert!(
            block.offset + block.len <= self.slots,
            "block outside the map"
        );
        let base = self.ptr.as_ptr();
        for (i, &id) in table.iter().enumerate() {
            // SAFETY: in bounds (checked above); the program only reads
            // these slots once the service entry points at them.
            unsafe {
                base.add((block.offset as usize + i) * IDS_PER_ELEMENT)
                    .write(id);
            }
        }
    }

    /// Reads one slot, for tests and inspection.
    #[must_use]
    pub fn slot(&self, index: u32) -> Option<BackendId> {
        // SAFETY: in bounds; a racing writer stores whole words.
        (index < self.slots).then(|| unsafe {
            self.ptr
                .as_ptr()
                .add(index as usize * IDS_PER_ELEMENT)
                .read_volatile()
        })
    }
}

impl Drop for MaglevArea {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe {
            libc::munmap(
                self.ptr.as_ptr().cast(),
                self.slots as usize * ELEMENT_STRIDE,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_first_fit_and_merges_on_free() {
        let mut slots = SlotAllocator::new(1000);
        let a = slots.allocate(251).expect("room for a");
        let b = slots.allocate(509).expect("room for b");
        assert_eq!((a.offset, b.offset), (0, 251));
        assert!(slots.allocate(251).is_none(), "only 240 slots are left");
        slots.free(a);
        let c = slots.allocate(100).expect("a's run is free again");
        assert_eq!(c.offset, 0);
        slots.free(b);
        slots.free(c);
        assert_eq!(slots.free_slots(), 1000);
        assert_eq!(
            slots.allocate(1000),
            Some(Block {
                offset: 0,
                len: 1000
            }),
            "freed runs merge back into one"
        );
    }

    #[test]
    fn reserving_adopted_blocks_splits_the_free_runs() {
        let mut slots = SlotAllocator::new(1000);
        assert!(slots.reserve(Block {
            offset: 100,
            len: 251
        }));
        assert!(
            !slots.reserve(Block {
                offset: 300,
                len: 10
            }),
            "overlaps"
        );
        assert!(
            !slots.reserve(Block {
                offset: 990,
                len: 20
            }),
            "past the end"
        );
        assert_eq!(slots.free_slots(), 749);
        assert_eq!(slots.allocate(100).map(|b| b.offset), Some(0));
        assert_eq!(slots.allocate(101).map(|b| b.offset), Some(351));
    }
}
