//! The read-timeout list: connections ordered by deadline, oldest first.
//!
//! Every connection gets the same timeout, so "deadline = last progress +
//! read_timeout" is ordered like "last progress": moving a connection that
//! made progress to the newest end keeps the list sorted. That makes every
//! operation O(1) — no heap, no periodic scan of all connections (nbNet's
//! `check_fd` thread scanned every fd once a minute). The links live inside
//! each entry (an intrusive doubly linked list over slab keys).

use std::time::Instant;

use slab::Slab;

/// An entry's place in the list. Embedded in each connection.
#[derive(Debug, Clone, Copy)]
pub struct Links {
    /// When the entry times out unless it makes progress.
    pub deadline: Instant,
    older: Option<usize>,
    newer: Option<usize>,
}

impl Links {
    /// Links for an entry not yet in the list.
    pub fn new(deadline: Instant) -> Self {
        Links {
            deadline,
            older: None,
            newer: None,
        }
    }
}

/// Something that sits in the deadline list.
pub trait Linked {
    /// The entry's links.
    fn links(&mut self) -> &mut Links;
}

/// Ends of the list; the links are in the entries.
#[derive(Debug, Default)]
pub struct Deadlines {
    oldest: Option<usize>,
    newest: Option<usize>,
}

impl Deadlines {
    /// Appends entry `key` (not in the list) with `deadline`.
    pub fn push<T: Linked>(&mut self, entries: &mut Slab<T>, key: usize, deadline: Instant) {
        *entries[key].links() = Links {
            deadline,
            older: self.newest,
            newer: None,
        };
        match self.newest {
            Some(newest) => entries[newest].links().newer = Some(key),
            None => self.oldest = Some(key),
        }
        self.newest = Some(key);
    }

    /// Removes entry `key` from the list.
    pub fn remove<T: Linked>(&mut self, entries: &mut Slab<T>, key: usize) {
        let links = entries[key].links();
        let (older, newer) = (links.older.take(), links.newer.take());
        match older {
            Some(older) => entries[older].links().newer = newer,
            None => self.oldest = newer,
        }
        match newer {
            Some(newer) => entries[newer].links().older = older,
            None => self.newest = older,
        }
    }

    /// Entry `key` made progress: its deadline moves to `deadline`.
    pub fn touch<T: Linked>(&mut self, entries: &mut Slab<T>, key: usize, deadline: Instant) {
        if self.newest == Some(key) {
            entries[key].links().deadline = deadline;
            return;
        }
        self.remove(entries, key);
        self.push(entries, key, deadline);
    }

    /// The entry with the earliest deadline, if any.
    pub fn oldest(&self) -> Option<usize> {
        self.oldest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Entry(Links);
    impl Linked for Entry {
        fn links(&mut self) -> &mut Links {
            &mut self.0
        }
    }

    /// Keys from oldest to newest, checking both directions agree.
    fn order(list: &Deadlines, entries: &mut Slab<Entry>) -> Vec<usize> {
        let mut keys = Vec::new();
        let mut next = list.oldest;
        while let Some(key) = next {
            keys.push(key);
            next = entries[key].links().newer;
        }
        let mut back = Vec::new();
        let mut prev = list.newest;
        while let Some(key) = prev {
            back.push(key);
            prev = entries[key].links().older;
        }
        back.reverse();
        assert_eq!(keys, back, "forward and backward links disagree");
        keys
    }

    #[test]
    fn touching_moves_an_entry_to_the_newest_end_and_removal_relinks_neighbours() {
        let t0 = Instant::now();
        let mut entries = Slab::new();
        let mut list = Deadlines::default();
        let keys: Vec<usize> = (0..4)
            .map(|_| entries.insert(Entry(Links::new(t0))))
            .collect();
        for (i, &key) in keys.iter().enumerate() {
            list.push(&mut entries, key, t0 + Duration::from_secs(i as u64));
        }
        assert_eq!(order(&list, &mut entries), keys);
        list.touch(&mut entries, keys[0], t0 + Duration::from_secs(10));
        assert_eq!(
            order(&list, &mut entries),
            vec![keys[1], keys[2], keys[3], keys[0]]
        );
        list.remove(&mut entries, keys[2]);
        assert_eq!(order(&list, &mut entries), vec![keys[1], keys[3], keys[0]]);
        list.remove(&mut entries, keys[1]);
        list.remove(&mut entries, keys[0]);
        assert_eq!(order(&list, &mut entries), vec![keys[3]]);
        list.touch(&mut entries, keys[3], t0 + Duration::from_secs(20));
        assert_eq!(
            entries[keys[3]].links().deadline,
            t0 + Duration::from_secs(20)
        );
        list.remove(&mut entries, keys[3]);
        assert_eq!(list.oldest(), None);
        assert_eq!(list.newest, None);
    }
}
