//! Rule-table benchmarks: lookup at 1k, 100k and 1M prefixes (IPv4 and IPv6,
//! hit and miss) beside a linear scan and `prefix-trie`; build time at 1M.
//! Run: `cargo bench --bench lookup`. Table memory at 1M is printed once.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use moat::policy::rules::{linear_lookup, RuleTable};
use prefix_trie::PrefixMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A small deterministic generator (xorshift), so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `n` IPv4 prefixes inside 10.0.0.0/8 (/16–/32) and `n` IPv6 prefixes
/// inside 2001:db8::/32 (/48–/64), like the proxy comparison's rule sets.
type Rules = Vec<(IpNet, u32)>;

fn rules(n: usize) -> (Rules, Rules) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let v4 = (0..n)
        .map(|i| {
            let len = 16 + (rng.next() % 17) as u8;
            let addr = Ipv4Addr::from(0x0A00_0000 | (rng.next() as u32 & 0x00FF_FFFF));
            (
                IpNet::V4(Ipv4Net::new(addr, len).unwrap().trunc()),
                i as u32,
            )
        })
        .collect();
    let v6 = (0..n)
        .map(|i| {
            let len = 48 + (rng.next() % 17) as u8;
            let low = ((rng.next() as u128) << 64 | rng.next() as u128) & ((1u128 << 96) - 1);
            let addr = Ipv6Addr::from(0x2001_0db8u128 << 96 | low);
            (
                IpNet::V6(Ipv6Net::new(addr, len).unwrap().trunc()),
                i as u32,
            )
        })
        .collect();
    (v4, v6)
}

fn probes(rules: &[(IpNet, u32)]) -> (Vec<IpAddr>, IpAddr) {
    let hits = rules
        .iter()
        .step_by((rules.len() / 64).max(1))
        .map(|(n, _)| n.broadcast())
        .collect();
    let miss = match rules[0].0 {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        IpNet::V6(_) => IpAddr::V6("2001:db9::1".parse().unwrap()),
    };
    (hits, miss)
}

fn lookups(c: &mut Criterion) {
    for n in [1_000usize, 100_000, 1_000_000] {
        let (v4, v6) = rules(n);
        for (family, set) in [("v4", &v4), ("v6", &v6)] {
            let table = RuleTable::build(set.iter().copied());
            let (hits, miss) = probes(set);
            let mut g = c.benchmark_group(format!("lookup/{family}/{n}"));
            let mut i = 0usize;
            g.bench_function("moat hit", |b| {
                b.iter(|| {
                    i = (i + 1) % hits.len();
                    black_box(table.lookup(black_box(hits[i])))
                })
            });
            g.bench_function("moat miss", |b| {
                b.iter(|| black_box(table.lookup(black_box(miss))))
            });
            let mut trie_v4: PrefixMap<Ipv4Net, u32> = PrefixMap::new();
            let mut trie_v6: PrefixMap<Ipv6Net, u32> = PrefixMap::new();
            for (net, r) in set.iter() {
                match net {
                    IpNet::V4(n) => {
                        trie_v4.insert(*n, *r);
                    }
                    IpNet::V6(n) => {
                        trie_v6.insert(*n, *r);
                    }
                }
            }
            let trie = |ip: IpAddr| match ip {
                IpAddr::V4(a) => trie_v4.get_lpm(&Ipv4Net::from(a)).map(|(_, r)| *r),
                IpAddr::V6(a) => trie_v6.get_lpm(&Ipv6Net::from(a)).map(|(_, r)| *r),
            };
            g.bench_function("prefix-trie hit", |b| {
                b.iter(|| {
                    i = (i + 1) % hits.len();
                    black_box(trie(black_box(hits[i])))
                })
            });
            g.bench_function("prefix-trie miss", |b| {
                b.iter(|| black_box(trie(black_box(miss))))
            });
            if n <= 100_000 {
                g.bench_function("linear miss", |b| {
                    b.iter(|| black_box(linear_lookup(set, black_box(miss))))
                });
            }
            g.finish();
        }
    }
}

fn build(c: &mut Criterion) {
    let (v4, v6) = rules(500_000);
    let all: Vec<(IpNet, u32)> = v4.into_iter().chain(v6).collect();
    let table = RuleTable::build(all.iter().copied());
    eprintln!(
        "table of {} prefixes (half IPv4, half IPv6): {:.1} MB",
        all.len(),
        table.heap_bytes() as f64 / 1e6
    );
    drop(table);
    let mut g = c.benchmark_group("build");
    g.sample_size(10);
    g.bench_function("1M prefixes", |b| {
        b.iter_batched(
            || all.clone(),
            |r| black_box(RuleTable::build(r)),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, lookups, build);
criterion_main!(benches);
