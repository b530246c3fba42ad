//! Fuzz target: the first-bytes classifier and the ClientHello SNI reader.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = moat::data::classify::classify(data);
    let _ = moat::data::classify::sni(data);
});
