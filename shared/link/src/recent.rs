//! The last few keys seen, to pass over a repeat: a QoS 1 redelivery (at least once) reaching
//! a ward broker from HQ, or a command reaching a site again after a failover.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;

/// The last `capacity` distinct keys inserted.
#[derive(Debug)]
pub struct Recent<K> {
    capacity: usize,
    order: VecDeque<K>,
    set: HashSet<K>,
}

impl<K: Hash + Eq + Clone> Recent<K> {
    pub fn new(capacity: usize) -> Recent<K> {
        Recent {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            set: HashSet::new(),
        }
    }

    /// False if `key` is among the last seen; otherwise remembers it (forgetting the oldest).
    pub fn first_time(&mut self, key: &K) -> bool {
        if self.set.contains(key) {
            return false;
        }
        if self.order.len() >= self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(key.clone());
        self.set.insert(key.clone());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_is_seen_until_it_is_among_the_oldest_forgotten() {
        let mut recent = Recent::new(2);
        assert!(recent.first_time(&1));
        assert!(!recent.first_time(&1));
        assert!(recent.first_time(&2));
        assert!(recent.first_time(&3), "1 is forgotten");
        assert!(recent.first_time(&1));
        assert!(!recent.first_time(&3));
    }
}
