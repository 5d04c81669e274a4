//! The shared Maglev array: a block allocator over its slots and a
//! writable memory mapping of it.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    time::{Duration, Instant},
};

use aya::maps::MapData;

use super::{Error, Result};

/// A run of slots owned by one service's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub offset: u32,
    pub len: u32,
}

/// How long a block a service entry named stays out of use after the
/// entry stopped naming it. A program run that read the old entry reads
/// the block's slot a few lookups later (microseconds; the NAT scan comes
/// after the pick); reused at once, the block could hand that packet a
/// backend of another service.
pub const RETIRE_GRACE: Duration = Duration::from_millis(50);

/// First-fit allocator of slot runs, merging neighbours on free.
#[derive(Debug)]
pub struct SlotAllocator {
    /// Free runs by offset.
    free: BTreeMap<u32, u32>,
    /// Blocks retired from published tables, and when.
    retired: Vec<(Block, Instant)>,
    grace: Duration,
    capacity: u32,
}

impl SlotAllocator {
    #[must_use]
    pub fn new(capacity: u32) -> Self {
        Self::with_grace(capacity, RETIRE_GRACE)
    }

    #[must_use]
    pub fn with_grace(capacity: u32, grace: Duration) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self {
            free,
            retired: Vec::new(),
            grace,
            capacity,
        }
    }

    /// Lets go of a block a published service entry named: it is free
    /// again once the grace period has passed.
    pub fn retire(&mut self, block: Block) {
        self.retired.push((block, Instant::now()));
    }

    /// Frees the retired blocks whose grace has passed.
    fn release_retired(&mut self) {
        let grace = self.grace;
        let mut due = Vec::new();
        self.retired.retain(|&(block, at)| {
            let over = at.elapsed() >= grace;
            if over {
                due.push(block);
            }
            !over
        });
        for block in due {
            self.free(block);
        }
    }

    /// A block of `len` slots, or `None` when no free run is long enough,
    /// counting the retired blocks: when only they would make room, this
    /// waits out their grace (at most [`RETIRE_GRACE`]).
    pub fn allocate(&mut self, len: u32) -> Option<Block> {
        self.release_retired();
        if let Some(block) = self.allocate_free(len) {
            return Some(block);
        }
        let youngest = self.retired.iter().map(|&(_, at)| at).max()?;
        std::thread::sleep(self.grace.saturating_sub(youngest.elapsed()));
        self.release_retired();
        self.allocate_free(len)
    }

    fn allocate_free(&mut self, len: u32) -> Option<Block> {
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
        let Some(end) = block.offset.checked_add(block.len) else {
            return false;
        };
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

    /// Slots no table owns (retired blocks, free after their grace,
    /// included).
    #[must_use]
    pub fn free_slots(&self) -> u32 {
        self.free.values().sum::<u32>() + self.retired.iter().map(|(b, _)| b.len).sum::<u32>()
    }

    #[must_use]
    pub const fn capacity(&self) -> u32 {
        self.capacity
    }
}

/// The kernel stores array elements 8-byte aligned: in the mapping, slot
/// `i` is the slot (a backend id, `u32`) at byte `8 * i`.
const ELEMENT_STRIDE: usize = size_of::<u32>().next_multiple_of(8);

/// `MAGLEV_MAP` (a `BPF_F_MMAPABLE` array) written through memory
/// mappings: a table is a memory write per slot, not a syscall per slot.
/// Only the pages of the block at hand are mapped, and only while it is
/// written or read, so the agent's resident memory does not carry the
/// whole array (the kernel maps every page of a BPF array at `mmap`).
pub struct MaglevArea {
    map: MapData,
    slots: u32,
}

/// The pages holding some slots, mapped read-write and shared; unmapped on
/// drop.
struct Window {
    base: NonNull<u8>,
    len: usize,
    /// Byte offset of the first slot asked for within the window.
    skew: usize,
}

impl Window {
    fn new(map: &MapData, block: Block) -> Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|page| page.is_power_of_two())
            .unwrap_or(4096);
        let start = block.offset as usize * ELEMENT_STRIDE;
        let end = (block.offset + block.len) as usize * ELEMENT_STRIDE;
        let first = start & !(page - 1);
        let len = (end - first).next_multiple_of(page);
        let offset = libc::off_t::try_from(first)
            .map_err(|_| Error::Mmap(std::io::Error::other("Maglev offset out of range")))?;
        // SAFETY: mapping part of a BPF array fd read-write and shared; the
        // kernel checks the map is mmapable and the range lies inside it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast())
            .ok_or_else(|| Error::Mmap(std::io::Error::other("mmap returned a null pointer")))?;
        Ok(Self {
            base,
            len,
            skew: start - first,
        })
    }

    /// The `i`th slot of the block.
    fn slot(&self, i: usize) -> *mut u32 {
        debug_assert!(self.skew + (i + 1) * ELEMENT_STRIDE <= self.len);
        // SAFETY: within the mapping (the window covers the whole block).
        unsafe {
            self.base
                .as_ptr()
                .add(self.skew + i * ELEMENT_STRIDE)
                .cast()
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

impl MaglevArea {
    /// Checks that the map can be mapped (it is `BPF_F_MMAPABLE`).
    pub fn new(map: MapData, slots: u32) -> Result<Self> {
        if slots > 0 {
            Window::new(&map, Block { offset: 0, len: 1 })?;
        }
        Ok(Self { map, slots })
    }

    fn check(&self, block: Block) {
        assert!(
            block
                .offset
                .checked_add(block.len)
                .is_some_and(|end| end <= self.slots),
            "block outside the map"
        );
    }

    /// Copies `table` into `block`.
    ///
    /// # Panics
    ///
    /// If the table does not fit the block or the block lies outside the
    /// map; the allocator never hands out such blocks.
    /// `table` holds backend ids as the slots do (`u32`, never 0).
    pub fn write(&mut self, block: Block, table: &[u32]) -> Result<()> {
        assert!(
            table.len() <= block.len as usize,
            "table larger than its block"
        );
        self.check(block);
        if table.is_empty() {
            return Ok(());
        }
        let window = Window::new(&self.map, block)?;
        for (i, &id) in table.iter().enumerate() {
            // SAFETY: in bounds (checked above); the program only reads
            // these slots once the service entry points at them.
            unsafe { window.slot(i).write(id) };
        }
        Ok(())
    }

    /// Reads the slots of `block` (adopting tables, inspection).
    pub fn read(&self, block: Block) -> Result<Vec<u32>> {
        self.check(block);
        if block.len == 0 {
            return Ok(Vec::new());
        }
        let window = Window::new(&self.map, block)?;
        // SAFETY: in bounds; a racing writer stores whole words.
        Ok((0..block.len as usize)
            .map(|i| unsafe { window.slot(i).read_volatile() })
            .collect())
    }

    /// Reads one slot, for tests and inspection.
    #[must_use]
    pub fn slot(&self, index: u32) -> Option<u32> {
        if index >= self.slots {
            return None;
        }
        self.read(Block {
            offset: index,
            len: 1,
        })
        .ok()?
        .first()
        .copied()
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
    fn a_retired_block_is_reused_only_after_its_grace() {
        let grace = Duration::from_millis(30);
        let mut slots = SlotAllocator::with_grace(600, grace);
        let old = slots.allocate(251).expect("room");
        slots.retire(old);
        let other = slots.allocate(251).expect("room elsewhere");
        assert_ne!(other.offset, old.offset, "not while a packet may read it");
        assert_eq!(
            slots.free_slots(),
            600 - 251,
            "the retired block is no table's"
        );
        // Only the retired block makes room now: the allocation waits.
        let started = Instant::now();
        let again = slots.allocate(251).expect("room once the grace passed");
        assert!(started.elapsed() >= grace / 2, "waited for the grace");
        assert_eq!(again.offset, old.offset);
        slots.retire(again);
        slots.free(other);
        std::thread::sleep(grace);
        assert_eq!(
            slots.allocate(600).map(|b| b.offset),
            Some(0),
            "every run merged back"
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
        assert!(
            !slots.reserve(Block {
                offset: u32::MAX - 5,
                len: 251
            }),
            "past the end of the numbers"
        );
        assert_eq!(slots.free_slots(), 749);
        assert_eq!(slots.allocate(100).map(|b| b.offset), Some(0));
        assert_eq!(slots.allocate(101).map(|b| b.offset), Some(351));
    }
}
