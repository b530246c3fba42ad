//! Fuzz target: PROXY protocol v1/v2 header parsing and prefix detection.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = moat::data::proxy_header::prefix(data);
    let _ = moat::data::proxy_header::parse(data);
});
