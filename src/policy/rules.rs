//! The compiled allowlist: CIDR prefixes flattened into sorted, disjoint
//! address ranges, answered by binary search without locks or allocation.
//!
//! Each address family is a list of range starts with a parallel list of rule
//! indices; range `i` covers `[starts[i], starts[i + 1])` and maps to the most
//! specific (longest) prefix that contains it, or to no rule at all.

use ipnet::IpNet;
use std::net::IpAddr;

/// Marks a range that no rule covers.
const NONE: u32 = u32::MAX;

/// An unsigned address type (IPv4 as `u32`, IPv6 as `u128`).
trait Key: Copy + Ord {
    const MIN: Self;
    fn succ(self) -> Option<Self>;
}

impl Key for u32 {
    const MIN: Self = 0;
    fn succ(self) -> Option<Self> {
        self.checked_add(1)
    }
}

impl Key for u128 {
    const MIN: Self = 0;
    fn succ(self) -> Option<Self> {
        self.checked_add(1)
    }
}

/// Ranges per block of the sampled first level: a block's starts span a
/// few cache lines, and the samples of a 1M-prefix table fit in L2.
const BLOCK: usize = 64;

/// Sorted disjoint ranges of one address family.
#[derive(Debug, Clone, Default)]
struct Ranges<K> {
    starts: Vec<K>,
    rules: Vec<u32>,
    /// Every `BLOCK`-th start: searched first, to pick the block.
    samples: Vec<K>,
}

/// One prefix to compile: first and last address, length, rule index.
#[derive(Clone, Copy)]
struct Span<K> {
    first: K,
    last: K,
    len: u8,
    rule: u32,
}

/// How many different prefixes `spans` holds.
fn distinct<K: Key>(spans: &[Span<K>]) -> usize {
    let mut keys: Vec<(K, u8)> = spans.iter().map(|s| (s.first, s.len)).collect();
    keys.sort_unstable();
    keys.dedup();
    keys.len()
}

impl<K: Key> Ranges<K> {
    fn push(&mut self, start: K, rule: u32) {
        if self.rules.last() == Some(&rule) {
            return;
        }
        self.starts.push(start);
        self.rules.push(rule);
    }

    /// Flattens prefixes into disjoint ranges. CIDR prefixes are either nested
    /// or disjoint, so a sweep with a stack of open prefixes suffices.
    fn build(mut spans: Vec<Span<K>>) -> Self {
        // Wider prefixes first at the same start; the earliest rule wins a tie.
        spans.sort_unstable_by_key(|s| (s.first, s.len, s.rule));
        let mut out = Ranges {
            starts: Vec::with_capacity(spans.len() * 2 + 1),
            rules: Vec::with_capacity(spans.len() * 2 + 1),
            samples: Vec::new(),
        };
        let mut open: Vec<Span<K>> = Vec::new();
        // Next address not yet assigned to a range; None once past the top.
        let mut cursor: Option<K> = Some(K::MIN);
        let close_until = |out: &mut Ranges<K>,
                           open: &mut Vec<Span<K>>,
                           cursor: &mut Option<K>,
                           bound: Option<K>| {
            while let Some(top) = open.last().copied() {
                if let Some(b) = bound {
                    if top.last >= b {
                        break;
                    }
                }
                if let Some(c) = *cursor {
                    if c <= top.last {
                        out.push(c, top.rule);
                        *cursor = top.last.succ();
                    }
                }
                open.pop();
            }
        };
        for span in spans {
            close_until(&mut out, &mut open, &mut cursor, Some(span.first));
            if let Some(top) = open.last() {
                if top.first == span.first && top.len == span.len {
                    continue; // a duplicate prefix: the earlier rule stands
                }
            }
            if let Some(c) = cursor {
                if c < span.first {
                    out.push(c, open.last().map_or(NONE, |t| t.rule));
                }
            }
            cursor = Some(span.first);
            open.push(span);
        }
        close_until(&mut out, &mut open, &mut cursor, None);
        if let Some(c) = cursor {
            out.push(c, NONE);
        }
        out.starts.shrink_to_fit();
        out.rules.shrink_to_fit();
        out.samples = out.starts.iter().step_by(BLOCK).copied().collect();
        out
    }

    #[inline]
    fn lookup(&self, key: K) -> Option<u32> {
        // The block whose first start is the last one <= key, then within it.
        let block = self.samples.partition_point(|s| *s <= key).checked_sub(1)?;
        let lo = block * BLOCK;
        let hi = (lo + BLOCK).min(self.starts.len());
        let i = lo + self.starts[lo..hi].partition_point(|s| *s <= key);
        match i.checked_sub(1).map(|i| self.rules[i]) {
            Some(NONE) | None => None,
            other => other,
        }
    }

    fn bytes(&self) -> usize {
        (self.starts.capacity() + self.samples.capacity()) * std::mem::size_of::<K>()
            + self.rules.capacity() * 4
    }
}

/// The allowlist of one deployment: which rule, if any, contains an address.
#[derive(Debug, Clone, Default)]
pub struct RuleTable {
    v4: Ranges<u32>,
    v6: Ranges<u128>,
    prefixes: usize,
}

impl RuleTable {
    /// Compiles `(prefix, rule index)` pairs. For an address covered by several
    /// prefixes the longest wins; between equal prefixes the lowest index.
    pub fn build<I: IntoIterator<Item = (IpNet, u32)>>(prefixes: I) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (net, rule) in prefixes {
            match net {
                IpNet::V4(n) => v4.push(Span {
                    first: u32::from(n.network()),
                    last: u32::from(n.broadcast()),
                    len: n.prefix_len(),
                    rule,
                }),
                IpNet::V6(n) => v6.push(Span {
                    first: u128::from(n.network()),
                    last: u128::from(n.broadcast()),
                    len: n.prefix_len(),
                    rule,
                }),
            }
        }
        // The same prefix from several rules (a copy, a group member also
        // listed by CIDR) is one effective prefix.
        let prefixes = distinct(&v4) + distinct(&v6);
        RuleTable {
            v4: Ranges::build(v4),
            v6: Ranges::build(v6),
            prefixes,
        }
    }

    /// The index of the most specific rule containing `ip`. IPv4-mapped IPv6
    /// addresses are matched as IPv4.
    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<u32> {
        match crate::policy::addr::canonical(ip) {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }

    /// Number of prefixes compiled in (after copies and group expansion).
    pub fn prefixes(&self) -> usize {
        self.prefixes
    }

    /// Heap bytes held by the table.
    pub fn heap_bytes(&self) -> usize {
        self.v4.bytes() + self.v6.bytes()
    }
}

/// The reference answer: a linear scan for the longest containing prefix.
/// Used by the property test and the benchmarks, never on the data path.
pub fn linear_lookup(prefixes: &[(IpNet, u32)], ip: IpAddr) -> Option<u32> {
    let ip = crate::policy::addr::canonical(ip);
    let mut best: Option<(u8, u32)> = None;
    for (net, rule) in prefixes {
        if net.contains(&ip) {
            let better = match best {
                None => true,
                Some((len, r)) => net.prefix_len() > len || (net.prefix_len() == len && *rule < r),
            };
            if better {
                best = Some((net.prefix_len(), *rule));
            }
        }
    }
    best.map(|(_, r)| r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn most_specific_wins_and_gaps_miss() {
        let rules = vec![
            (net("10.0.0.0/8"), 0),
            (net("10.1.0.0/16"), 1),
            (net("10.1.2.3/32"), 2),
            (net("0.0.0.0/0"), 3),
            (net("2001:db8::/32"), 4),
        ];
        let t = RuleTable::build(rules.clone());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(2));
        assert_eq!(t.lookup(ip("10.1.2.4")), Some(1));
        assert_eq!(t.lookup(ip("10.2.0.0")), Some(0));
        assert_eq!(t.lookup(ip("11.0.0.0")), Some(3));
        assert_eq!(t.lookup(ip("255.255.255.255")), Some(3));
        assert_eq!(t.lookup(ip("::ffff:10.1.2.3")), Some(2));
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(4));
        assert_eq!(t.lookup(ip("2001:db9::1")), None);
        assert_eq!(t.prefixes(), 5);
    }

    #[test]
    fn a_prefix_from_several_rules_counts_once() {
        let t = RuleTable::build(vec![
            (net("10.0.0.0/8"), 0),
            (net("10.0.0.0/8"), 1),
            (net("10.0.0.0/9"), 1),
            (net("2001:db8::/32"), 2),
            (net("2001:db8::/32"), 0),
        ]);
        assert_eq!(t.prefixes(), 3);
        assert_eq!(t.lookup("10.1.0.0".parse().unwrap()), Some(1));
    }

    #[test]
    fn empty_and_top_of_range() {
        let t = RuleTable::build(vec![]);
        assert_eq!(t.lookup("1.2.3.4".parse().unwrap()), None);
        let t = RuleTable::build(vec![(net("255.255.255.255/32"), 7), (net("ffff::/16"), 8)]);
        assert_eq!(t.lookup("255.255.255.255".parse().unwrap()), Some(7));
        assert_eq!(t.lookup("255.255.255.254".parse().unwrap()), None);
        assert_eq!(t.lookup(IpAddr::V6(Ipv6Addr::from(u128::MAX))), Some(8));
    }

    fn arb_v4() -> impl Strategy<Value = (IpNet, u32)> {
        // Few distinct high bits so that prefixes nest and collide often.
        (0u32..16, any::<u32>(), 0u8..=32, 0u32..64).prop_map(|(hi, lo, len, rule)| {
            let addr = Ipv4Addr::from((hi << 28) | (lo >> 4));
            (IpNet::new(IpAddr::V4(addr), len).unwrap().trunc(), rule)
        })
    }

    fn arb_v6() -> impl Strategy<Value = (IpNet, u32)> {
        (0u128..8, any::<u128>(), 0u8..=128, 0u32..64).prop_map(|(hi, lo, len, rule)| {
            let addr = Ipv6Addr::from((hi << 125) | (lo >> 3));
            (IpNet::new(IpAddr::V6(addr), len).unwrap().trunc(), rule)
        })
    }

    fn probes(rules: &[(IpNet, u32)], extra: &[IpAddr]) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = extra.to_vec();
        for (n, _) in rules {
            out.push(n.network());
            out.push(n.broadcast());
            match n.broadcast() {
                IpAddr::V4(b) => out.push(IpAddr::V4(Ipv4Addr::from(u32::from(b).wrapping_add(1)))),
                IpAddr::V6(b) => {
                    out.push(IpAddr::V6(Ipv6Addr::from(u128::from(b).wrapping_add(1))))
                }
            }
            match n.network() {
                IpAddr::V4(b) => out.push(IpAddr::V4(Ipv4Addr::from(u32::from(b).wrapping_sub(1)))),
                IpAddr::V6(b) => {
                    out.push(IpAddr::V6(Ipv6Addr::from(u128::from(b).wrapping_sub(1))))
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn equals_linear_scan(
            v4 in proptest::collection::vec(arb_v4(), 0..40),
            v6 in proptest::collection::vec(arb_v6(), 0..40),
            extra4 in proptest::collection::vec(any::<u32>(), 0..20),
            extra6 in proptest::collection::vec(any::<u128>(), 0..20),
        ) {
            let rules: Vec<(IpNet, u32)> = v4.into_iter().chain(v6).collect();
            let table = RuleTable::build(rules.clone());
            let mut extra: Vec<IpAddr> = extra4.into_iter().map(|a| IpAddr::V4(a.into())).collect();
            extra.extend(extra6.into_iter().map(|a| IpAddr::V6(a.into())));
            for ip in probes(&rules, &extra) {
                prop_assert_eq!(table.lookup(ip), linear_lookup(&rules, ip), "ip {}", ip);
            }
        }
    }
}
