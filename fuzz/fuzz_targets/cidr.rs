//! Fuzz target: CIDR/address parsing, and a table built from what parses
//! must agree with the linear scan.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let rules: Vec<_> = text.split(',').filter_map(|t| moat::config::values::parse_cidr(t).ok()).enumerate().map(|(i, n)| (n, i as u32)).collect();
    let table = moat::policy::rules::RuleTable::build(rules.clone());
    for (net, _) in &rules {
        for ip in [net.network(), net.broadcast()] {
            assert_eq!(table.lookup(ip), moat::policy::rules::linear_lookup(&rules, ip));
        }
    }
});
