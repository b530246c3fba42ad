//! Fuzz target: config text → validated config or located errors; never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = moat::config::load_bytes(std::path::Path::new("/nonexistent/fuzz.toml"), data, std::time::SystemTime::UNIX_EPOCH);
});
