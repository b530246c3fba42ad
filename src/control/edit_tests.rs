//! Tests of the config-file edit path: only the changed block differs, the
//! result passes `check`, links stay links, read-only files stay untouched.

use super::*;
use crate::policy::access::parse_key;
use std::os::unix::fs::symlink;

const CONFIG: &str = r#"# moat config: comments and layout must survive edits
[server]
on_revoke = "close"   # trailing comment

[[deployment]]
name = "orders"
listen = "127.0.0.1:27117"
upstream = "127.0.0.1:27017"

# the app servers
[[deployment.allow]]
cidr = "10.0.0.0/16"
description = "app servers"

[deployment.limits]
max_connections = 10

[[deployment]]
name   =   "billing"    # odd spacing kept
listen = "127.0.0.1:27118"
upstream = "127.0.0.1:27018"

[[deployment.allow]]
cidr = "192.0.2.0/24"
description = "billing hosts"

[[deployment]]
name = "shared"
plan = "shared"
listen = "127.0.0.1:27119"
upstream = "127.0.0.1:27019"
"#;

fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moat.toml");
    fs::write(&path, CONFIG).unwrap();
    (dir, path)
}

fn valid(json: &str) -> ValidEntry {
    serde_json::from_str::<Entry>(json)
        .unwrap()
        .validate(Some(SystemTime::now()))
        .unwrap()
}

#[test]
fn adding_an_entry_adds_only_its_block() {
    let (_d, path) = setup();
    let store = FileStore::new(&path);
    let e = valid(
        r#"{"cidrBlock":"198.51.100.7","comment":"on-call","deleteAfterDate":"2099-01-01T00:00:00Z"}"#,
    );
    let out = store.add("orders", &[e], None).unwrap();
    assert!(out.written);
    let after = fs::read_to_string(&path).unwrap();
    let block = "[[deployment.allow]]\ncidr = \"198.51.100.7/32\"\ndescription = \"on-call\"\nexpires = \"2099-01-01T00:00:00Z\"\n\n";
    let at = CONFIG.find("[deployment.limits]").unwrap();
    assert_eq!(after, format!("{}{block}{}", &CONFIG[..at], &CONFIG[at..]));
    // It lands with the deployment's other rules, before [deployment.limits].
    assert!(after.find("198.51.100.7").unwrap() < after.find("[deployment.limits]").unwrap());
    crate::config::load(&path, SystemTime::now()).unwrap();
    assert_eq!(out.listing.entries.len(), 2);
    assert_eq!(
        out.listing.entries[1].cidr_block.as_deref(),
        Some("198.51.100.7/32")
    );
}

#[test]
fn replacing_and_removing_touch_only_that_entry() {
    let (_d, path) = setup();
    let store = FileStore::new(&path);
    let out = store
        .add("orders", &[valid(r#"{"cidrBlock":"10.0.0.0/16"}"#)], None)
        .unwrap();
    let after = fs::read_to_string(&path).unwrap();
    assert_eq!(
        after,
        CONFIG.replacen("description = \"app servers\"\n", "", 1)
    );
    assert_eq!(out.listing.entries[0].comment, None);
    // The same entry again changes nothing.
    let again = store
        .add("orders", &[valid(r#"{"cidrBlock":"10.0.0.0/16"}"#)], None)
        .unwrap();
    assert!(!again.written);

    let (_d, path) = setup();
    let store = FileStore::new(&path);
    let (edited, gone) = store
        .remove("billing", &parse_key("192.0.2.0/24").unwrap(), None)
        .unwrap();
    assert_eq!(gone.comment.as_deref(), Some("billing hosts"));
    assert!(edited.listing.entries.is_empty());
    let after = fs::read_to_string(&path).unwrap();
    let block =
        "\n[[deployment.allow]]\ncidr = \"192.0.2.0/24\"\ndescription = \"billing hosts\"\n";
    assert_eq!(after, CONFIG.replacen(block, "", 1));
    let absent = store.remove("billing", &parse_key("192.0.2.0/24").unwrap(), None);
    assert!(matches!(absent, Err(StoreError::NoEntry { .. })));
}

#[test]
fn replacing_keeps_the_lines_it_does_not_change() {
    let (_d, path) = setup();
    let text = CONFIG.replace(
        "cidr = \"10.0.0.0/16\"\ndescription = \"app servers\"\n",
        "cidr = \"10.0.0.0/16\"   # keep me\ndescription = \"app servers\"  # and me\n",
    );
    fs::write(&path, &text).unwrap();
    let store = FileStore::new(&path);
    store
        .add(
            "orders",
            &[valid(
                r#"{"cidrBlock":"10.0.0.0/16","comment":"app tier","deleteAfterDate":"2099-01-01T00:00:00Z"}"#,
            )],
            None,
        )
        .unwrap();
    let after = fs::read_to_string(&path).unwrap();
    let want = text.replace(
        "description = \"app servers\"  # and me\n",
        "description = \"app tier\"  # and me\nexpires = \"2099-01-01T00:00:00Z\"\n",
    );
    assert_eq!(after, want);
}

#[test]
fn a_crlf_file_keeps_its_line_endings() {
    let (_d, path) = setup();
    let crlf = CONFIG.replace('\n', "\r\n");
    fs::write(&path, &crlf).unwrap();
    let store = FileStore::new(&path);
    store
        .add("orders", &[valid(r#"{"cidrBlock":"198.51.100.7"}"#)], None)
        .unwrap();
    let after = fs::read_to_string(&path).unwrap();
    assert!(
        after.contains("cidr = \"198.51.100.7/32\"\r\n"),
        "{after:?}"
    );
    assert_eq!(after.matches('\n').count(), after.matches("\r\n").count());
    assert!(after.starts_with("# moat config: comments and layout must survive edits\r\n"));
}

#[test]
fn if_match_guards_against_lost_updates() {
    let (_d, path) = setup();
    let store = FileStore::new(&path);
    let tag = store.list("orders").unwrap().etag;
    let other = store.list("billing").unwrap().etag;
    store
        .add(
            "billing",
            &[valid(r#"{"cidrBlock":"198.51.100.0/24"}"#)],
            Some(&other),
        )
        .unwrap();
    // Another deployment's change does not count.
    store
        .add(
            "orders",
            &[valid(r#"{"cidrBlock":"198.51.100.1"}"#)],
            Some(&tag),
        )
        .unwrap();
    let stale = store.add(
        "orders",
        &[valid(r#"{"cidrBlock":"198.51.100.2"}"#)],
        Some(&tag),
    );
    assert!(matches!(stale, Err(StoreError::Changed(_))));
    assert!(etag_matches("*", "\"x\""));
    assert!(etag_matches("\"a\", W/\"x\"", "\"x\""));
}

#[test]
fn refusals_write_nothing() {
    let (_d, path) = setup();
    let store = FileStore::new(&path);
    let e = valid(r#"{"cidrBlock":"10.9.0.0/16"}"#);
    assert!(matches!(
        store.add("shared", std::slice::from_ref(&e), None),
        Err(StoreError::SharedPlan(_))
    ));
    assert!(matches!(
        store.add("nope", std::slice::from_ref(&e), None),
        Err(StoreError::UnknownDeployment(_))
    ));
    assert!(matches!(
        store.copy("orders", "nope", None),
        Err(StoreError::UnknownSource(_))
    ));
    assert_eq!(fs::read_to_string(&path).unwrap(), CONFIG);

    fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();
    let r = store.add("orders", &[e], None);
    assert!(matches!(r, Err(StoreError::ReadOnly(_))), "{:?}", r.err());
    assert_eq!(fs::read_to_string(&path).unwrap(), CONFIG);
}

#[test]
fn a_broken_file_is_not_made_worse() {
    let (_d, path) = setup();
    let broken = CONFIG.replace("10.0.0.0/16", "10.0.0.1/16");
    fs::write(&path, &broken).unwrap();
    let r = FileStore::new(&path).add("billing", &[valid(r#"{"cidrBlock":"10.9.0.0/16"}"#)], None);
    match r {
        Err(StoreError::Rejected(d)) => assert!(d[0].contains("host bits"), "{d:?}"),
        other => panic!("{:?}", other.err()),
    }
    assert_eq!(fs::read_to_string(&path).unwrap(), broken);
}

#[test]
fn a_symlinked_config_keeps_its_link() {
    let (dir, real) = setup();
    let link = dir.path().join("current.toml");
    symlink(&real, &link).unwrap();
    let store = FileStore::new(&link);
    store
        .add(
            "orders",
            &[valid(r#"{"cidrBlock":"198.51.100.0/24"}"#)],
            None,
        )
        .unwrap();
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(fs::read_to_string(&real)
        .unwrap()
        .contains("198.51.100.0/24"));
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn copy_adds_what_is_missing() {
    let (_d, path) = setup();
    let store = FileStore::new(&path);
    let out = store.copy("orders", "billing", None).unwrap();
    let cidrs: Vec<_> = out
        .listing
        .entries
        .iter()
        .map(|e| e.cidr_block.clone().unwrap())
        .collect();
    assert_eq!(cidrs, ["10.0.0.0/16", "192.0.2.0/24"]);
    assert!(!store.copy("orders", "billing", None).unwrap().written);
    crate::config::load(&path, SystemTime::now()).unwrap();
}

#[test]
fn concurrent_writers_lose_nothing() {
    let (_d, path) = setup();
    let store = std::sync::Arc::new(FileStore::new(&path));
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            std::thread::spawn(move || {
                // A second store on the same file: only flock serialises them.
                let own = FileStore::new(store.path());
                let s = if i % 2 == 0 { &*store } else { &own };
                s.add(
                    "orders",
                    &[valid(&format!(r#"{{"cidrBlock":"198.51.100.{i}"}}"#))],
                    None,
                )
                .unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(store.list("orders").unwrap().entries.len(), 21);
}

#[test]
fn removing_takes_every_table_of_that_key() {
    let (_d, path) = setup();
    let twice = CONFIG.replace(
        "[deployment.limits]",
        "[[deployment.allow]]\ncidr = \"10.0.0.0/16\"\ndescription = \"again\"\n\n[deployment.limits]",
    );
    fs::write(&path, &twice).unwrap();
    let store = FileStore::new(&path);
    let (edited, gone) = store
        .remove("orders", &parse_key("10.0.0.0/16").unwrap(), None)
        .unwrap();
    assert_eq!(gone.comment.as_deref(), Some("app servers"));
    assert!(edited.listing.entries.is_empty());
}
