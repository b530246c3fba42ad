//! Fuzz target: the API's access-list entry parser (a JSON array of entries)
//! and the entry names of paths; an accepted entry must round-trip.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
    if let Ok(entries) = moat::policy::access::parse_entries(data, now) {
        for (_, valid) in entries {
            let out = moat::policy::access::Entry::from_rule(&valid.rule);
            assert_eq!(out.validate(None).map(|v| v.key).ok(), Some(valid.key));
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = moat::policy::access::parse_key(text);
    }
});
