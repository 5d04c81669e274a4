//! Reading `SVC_STATS_V2`.

use aya::{Ebpf, maps::PerCpuArray};
use svc_common::stats::{Counter, CounterValue, STATS_MAP};

use super::{Error, Result};

/// Every counter, summed over CPUs, in [`Counter`] index order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    values: Vec<CounterValue>,
}

impl StatsSnapshot {
    pub(super) fn read(ebpf: &Ebpf) -> Result<Self> {
        let map_error = |source| Error::Map {
            name: STATS_MAP,
            source,
        };
        let map = ebpf.map(STATS_MAP).ok_or(Error::MissingMap(STATS_MAP))?;
        let array: PerCpuArray<_, CounterValue> = PerCpuArray::try_from(map).map_err(map_error)?;
        let values = Counter::ALL
            .iter()
            .map(|counter| {
                let per_cpu = array.get(&counter.index(), 0).map_err(map_error)?;
                Ok(per_cpu
                    .iter()
                    .fold(CounterValue::default(), |sum, value| sum.add(*value)))
            })
            .collect::<Result<_>>()?;
        Ok(Self { values })
    }

    /// The value of one counter.
    #[must_use]
    pub fn get(&self, counter: Counter) -> CounterValue {
        self.values
            .get(counter.index() as usize)
            .copied()
            .unwrap_or_default()
    }

    /// Counters that moved from `earlier` to `self`.
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Vec<(Counter, CounterValue)> {
        Counter::ALL
            .iter()
            .filter_map(|&counter| {
                let (now, then) = (self.get(counter), earlier.get(counter));
                let delta = CounterValue {
                    packets: now.packets.wrapping_sub(then.packets),
                    bytes: now.bytes.wrapping_sub(then.bytes),
                };
                (delta.packets != 0).then_some((counter, delta))
            })
            .collect()
    }
}
