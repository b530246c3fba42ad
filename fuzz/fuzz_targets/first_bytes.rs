//! Fuzz target: the first-bytes classifier and the ClientHello SNI reader.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = moat::classify::classify(data);
    let _ = moat::classify::sni(data);
});
