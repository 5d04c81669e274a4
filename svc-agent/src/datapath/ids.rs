//! Frontend and backend ids. They index arrays (counters, backends), so they
//! are small and dense; and connection tracking names them, so a released
//! id is reused only once a sweep of connection tracking that began after
//! its release found no live flow naming it. A flow that outlives its
//! frontend or backend (a TCP connection finishing after its pod left the
//! service) is thus never counted under, or mistaken for, another.

use std::{
    collections::{BTreeMap, HashSet},
    hash::Hash,
    marker::PhantomData,
};

use svc_common::wire::{BackendId, FrontendId};

/// An id a pool hands out: an index into the datapath's arrays.
pub trait PoolId: Copy + Eq + Hash + std::fmt::Debug {
    /// The id of index `index`; `None` for an index no id has.
    fn from_index(index: u32) -> Option<Self>;
    fn index(self) -> u32;
}

impl PoolId for FrontendId {
    fn from_index(index: u32) -> Option<Self> {
        Some(Self::new(index))
    }

    fn index(self) -> u32 {
        self.get()
    }
}

impl PoolId for BackendId {
    fn from_index(index: u32) -> Option<Self> {
        Self::new(index)
    }

    fn index(self) -> u32 {
        self.get()
    }
}

/// Ids from `first` up to a capacity, with a quarantine for released ones.
#[derive(Debug)]
pub struct IdPool<I> {
    first: u32,
    capacity: u32,
    /// Ids below this have been handed out at some point.
    next: u32,
    free: Vec<u32>,
    /// Released ids and the sweep epoch they were released in.
    quarantined: BTreeMap<u32, u64>,
    /// Sweeps begun so far.
    epoch: u64,
    ids: PhantomData<I>,
}

impl<I: PoolId> IdPool<I> {
    /// Ids of indexes `first..capacity`; `first` must be an id's.
    #[must_use]
    pub const fn new(first: u32, capacity: u32) -> Self {
        Self {
            first,
            capacity,
            next: first,
            free: Vec::new(),
            quarantined: BTreeMap::new(),
            epoch: 0,
            ids: PhantomData,
        }
    }

    /// A free id, or `None` when every id is in use or quarantined.
    pub fn allocate(&mut self) -> Option<I> {
        if let Some(id) = self.free.pop() {
            return I::from_index(id);
        }
        if self.next >= self.capacity {
            return None;
        }
        self.next += 1;
        I::from_index(self.next - 1)
    }

    /// Gives back an id the datapath never saw (a write that failed).
    pub fn unallocate(&mut self, id: I) {
        self.free.push(id.index());
    }

    /// Releases an id the datapath may still have flows under: it waits in
    /// quarantine for a sweep.
    pub fn release(&mut self, id: I) {
        self.quarantined.insert(id.index(), self.epoch);
    }

    /// Takes a quarantined id back (its backend returned before a sweep
    /// freed it). Returns whether it was quarantined.
    pub fn reclaim(&mut self, id: I) -> bool {
        self.quarantined.remove(&id.index()).is_some()
    }

    /// Starts a sweep: ids released before this call are the ones its
    /// result may free.
    pub fn begin_sweep(&mut self) -> u64 {
        self.epoch += 1;
        self.epoch
    }

    /// Frees the ids released before sweep `epoch` began that its live
    /// flows do not name. Returns how many were freed.
    pub fn end_sweep(&mut self, epoch: u64, named: &HashSet<I>) -> usize {
        let named: HashSet<u32> = named.iter().map(|id| id.index()).collect();
        let freed: Vec<u32> = self
            .quarantined
            .iter()
            .filter(|&(id, released)| *released < epoch && !named.contains(id))
            .map(|(&id, _)| id)
            .collect();
        for id in &freed {
            self.quarantined.remove(id);
            self.free.push(*id);
        }
        freed.len()
    }

    /// Rebuilds the pool from what the maps hold after a restart: `used`
    /// ids are installed, and ids that only flows `named` stay quarantined.
    pub fn adopt(&mut self, used: &HashSet<I>, named: &HashSet<I>) {
        let index = |ids: &HashSet<I>| ids.iter().map(|id| id.index()).collect::<HashSet<u32>>();
        let (used, named) = (&index(used), &index(named));
        let top = used
            .iter()
            .chain(named)
            .copied()
            .filter(|&id| id >= self.first && id < self.capacity)
            .max();
        self.next = top.map_or(self.first, |top| top + 1);
        self.free = (self.first..self.next)
            .filter(|id| !used.contains(id) && !named.contains(id))
            .collect();
        self.quarantined = (self.first..self.next)
            .filter(|id| !used.contains(id) && named.contains(id))
            .map(|id| (id, self.epoch))
            .collect();
    }

    /// Ids waiting for a sweep.
    #[must_use]
    pub fn quarantined(&self) -> usize {
        self.quarantined.len()
    }

    /// Whether `id` waits for a sweep.
    #[must_use]
    pub fn is_quarantined(&self, id: I) -> bool {
        self.quarantined.contains_key(&id.index())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(index: u32) -> BackendId {
        BackendId::new(index).expect("not 0")
    }

    #[test]
    fn a_released_id_comes_back_only_after_a_later_sweep_finds_no_flow() {
        let mut pool = IdPool::<BackendId>::new(1, 4);
        let (a, b, c) = (
            pool.allocate().expect("1"),
            pool.allocate().expect("2"),
            pool.allocate().expect("3"),
        );
        assert_eq!((a, b, c), (backend(1), backend(2), backend(3)));
        assert_eq!(pool.allocate(), None, "capacity 4 holds ids 1..4");
        pool.release(a);
        pool.release(b);
        assert_eq!(pool.allocate(), None, "released ids wait for a sweep");

        let epoch = pool.begin_sweep();
        pool.release(c);
        let freed = pool.end_sweep(epoch, &HashSet::from([b]));
        assert_eq!(freed, 1, "b still has a flow; c was released mid-sweep");
        assert_eq!(pool.allocate(), Some(a));
        assert_eq!(pool.allocate(), None);
        assert!(pool.is_quarantined(b) && pool.is_quarantined(c));

        let epoch = pool.begin_sweep();
        assert_eq!(pool.end_sweep(epoch, &HashSet::new()), 2);
        assert_eq!(pool.quarantined(), 0);
    }

    #[test]
    fn a_returning_backend_reclaims_its_quarantined_id() {
        let mut pool = IdPool::<BackendId>::new(1, 10);
        let id = pool.allocate().expect("an id");
        pool.release(id);
        assert!(pool.reclaim(id));
        let epoch = pool.begin_sweep();
        assert_eq!(pool.end_sweep(epoch, &HashSet::new()), 0, "in use again");
        assert!(!pool.reclaim(id));
    }

    #[test]
    fn adoption_keeps_ids_that_only_flows_name_in_quarantine() {
        let id = FrontendId::new;
        let mut pool = IdPool::<FrontendId>::new(0, 100);
        pool.adopt(
            &HashSet::from([id(0), id(3)]),
            &HashSet::from([id(3), id(5), id(500)]),
        );
        assert!(pool.is_quarantined(id(5)), "only a flow names 5");
        assert!(!pool.is_quarantined(id(3)), "3 is installed");
        let mut handed = vec![
            pool.allocate().expect("id"),
            pool.allocate().expect("id"),
            pool.allocate().expect("id"),
        ];
        handed.sort_unstable();
        assert_eq!(
            handed,
            [id(1), id(2), id(4)],
            "free below the highest, then 6"
        );
        assert_eq!(pool.allocate(), Some(id(6)));
    }
}
