//! The control commands of the CLI: `moat access-list` (the same edit path
//! as the API, with no daemon needed), `moat connections` and `moat plan`
//! (through the running daemon's API), `moat api-key new`. Each returns the
//! process exit status.

use super::client::Client;
use super::edit::{Edited, FileStore};
use super::StoreError;
use crate::policy::access::{parse_key, Entry};
use serde_json::Value;
use std::path::Path;
use std::time::SystemTime;

fn rejected(e: &StoreError) -> i32 {
    eprintln!("moat access-list: {e}");
    match e {
        StoreError::Rejected(detail) => {
            for d in detail {
                eprintln!("  {d}");
            }
        }
        StoreError::Unavailable(why) | StoreError::Unconfirmed(why) => eprintln!("  etcd: {why}"),
        _ => {}
    }
    1
}

fn show(entry: &Entry) -> String {
    let mut s = match (&entry.cidr_block, &entry.aws_security_group) {
        (Some(c), _) => c.clone(),
        (None, Some(g)) => format!(
            "{g} (account {})",
            entry.aws_account_id.as_deref().unwrap_or("?")
        ),
        (None, None) => "?".into(),
    };
    if let Some(c) = &entry.comment {
        s.push_str(&format!("  \"{c}\""));
    }
    if let Some(d) = &entry.delete_after_date {
        s.push_str(&format!("  until {d}"));
    }
    s
}

pub fn list(config: &Path, deployment: &str, json: bool) -> i32 {
    let t = target(config);
    match t.run(|f| f.list(deployment), async |s| s.list(deployment).await) {
        Err(e) => rejected(&e),
        Ok(l) => {
            if json {
                let v = serde_json::json!({ "results": l.entries, "totalCount": l.entries.len() });
                println!("{v}");
            } else {
                for e in &l.entries {
                    println!("{}", show(e));
                }
            }
            0
        }
    }
}

/// What `add` was told on the command line.
pub struct NewEntry {
    pub entry: String,
    pub comment: Option<String>,
    pub delete_after: Option<String>,
    pub aws_account: Option<String>,
}

/// Where `moat access-list` edits: with `[store] etcd` in the config, the
/// fleet store (SPEC 6.3; no daemon needed, and the command returns once
/// etcd accepted the change); else the config file.
enum Target {
    File(FileStore),
    Fleet(super::Store, tokio::runtime::Runtime),
}

/// Longest a command waits for etcd.
const FLEET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn target(config: &Path) -> Target {
    let loaded = crate::config::load(config, SystemTime::now())
        .ok()
        .filter(|c| c.store.is_some());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match (loaded, runtime) {
        (Some(c), Ok(rt)) => {
            let c = std::sync::Arc::new(c);
            Target::Fleet(super::Store::running(config, move || c.clone()), rt)
        }
        _ => Target::File(FileStore::new(config)),
    }
}

impl Target {
    fn run<T>(
        &self,
        file: impl FnOnce(&FileStore) -> Result<T, StoreError>,
        fleet: impl AsyncFnOnce(&super::Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match self {
            Target::File(f) => file(f),
            Target::Fleet(store, rt) => rt.block_on(async {
                tokio::time::timeout(FLEET_TIMEOUT, fleet(store))
                    .await
                    .unwrap_or_else(|_| {
                        Err(StoreError::Io(format!(
                            "the fleet store (etcd) did not answer within {}s; nothing was written",
                            FLEET_TIMEOUT.as_secs()
                        )))
                    })
            }),
        }
    }
}

fn report(edited: &Edited, done: &str, config: &Path) {
    if edited.written && fleet_configured(config) {
        println!("{done} (fleet store; every moat of the fleet applies it within a second)");
    } else if edited.written {
        println!(
            "{done} ({}; a running moat applies it on its next reload)",
            config.display()
        );
    } else {
        println!("{done}: already so, nothing written");
    }
}

pub fn add(config: &Path, deployment: &str, new: NewEntry) -> i32 {
    let mut entry = Entry {
        comment: new.comment,
        delete_after_date: new.delete_after,
        ..Entry::default()
    };
    if new.entry.starts_with("sg-") {
        entry.aws_security_group = Some(new.entry.clone());
        entry.aws_account_id = new.aws_account;
    } else {
        entry.cidr_block = Some(new.entry.clone());
        if new.aws_account.is_some() {
            eprintln!("moat access-list: --aws-account goes with a security group (sg-…), not with a CIDR");
            return 1;
        }
    }
    let valid = match entry.validate(Some(SystemTime::now())) {
        Ok(v) => v,
        Err(errors) => {
            eprintln!("moat access-list: the entry is invalid; nothing was written");
            for e in errors {
                let flag = match e.field {
                    "comment" => "--comment",
                    "deleteAfterDate" => "--delete-after",
                    "awsAccountId" => "--aws-account",
                    _ => "ENTRY",
                };
                eprintln!("  {flag}: {}", e.message);
            }
            return 1;
        }
    };
    let key = valid.key.to_string();
    let t = target(config);
    let entries = [valid];
    match t.run(
        |f| f.add(deployment, &entries, None),
        async |s| s.add(deployment, entries.to_vec(), None).await,
    ) {
        Err(e) => rejected(&e),
        Ok(edited) => {
            report(
                &edited,
                &format!("added {key} to deployment \"{deployment}\""),
                config,
            );
            0
        }
    }
}

pub fn remove(config: &Path, deployment: &str, entry: &str, aws_account: Option<String>) -> i32 {
    let key = match parse_key(entry) {
        Ok(k) => k,
        Err(m) => {
            eprintln!("moat access-list: ENTRY: {m}");
            return 1;
        }
    };
    let key = match key.in_account(aws_account) {
        Ok(k) => k,
        Err(m) => {
            eprintln!("moat access-list: --aws-account: {m}");
            return 1;
        }
    };
    let t = target(config);
    match t.run(
        |f| f.remove(deployment, &key, None),
        async |s| s.remove(deployment, key.clone(), None).await,
    ) {
        Err(e) => rejected(&e),
        Ok((edited, _)) => {
            report(
                &edited,
                &format!("removed {key} from deployment \"{deployment}\""),
                config,
            );
            0
        }
    }
}

pub fn copy(config: &Path, deployment: &str, from: &str) -> i32 {
    let t = target(config);
    match t.run(
        |f| f.copy(deployment, from, None),
        async |s| s.copy(deployment, from, None).await,
    ) {
        Err(e) => rejected(&e),
        Ok(edited) => {
            report(
                &edited,
                &format!(
                    "copied the entries of \"{from}\" to \"{deployment}\" ({} entries now)",
                    edited.listing.entries.len()
                ),
                config,
            );
            0
        }
    }
}

/// Calls the API; prints why and gives exit status 2 when it fails.
fn call(
    running: &Path,
    method: &str,
    path: &str,
    ct: Option<&str>,
    body: Vec<u8>,
) -> Result<Value, i32> {
    let what = path.trim_start_matches("/api/v1/");
    let client = Client::for_config(running).map_err(|e| {
        eprintln!("moat {what}: {e}");
        2
    })?;
    let answer = client.send(method, path, ct, body).map_err(|e| {
        eprintln!("moat {what}: {e}");
        2
    })?;
    let value: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    if answer.status != 200 {
        let error = value["error"].as_str().unwrap_or("unexpected answer");
        eprintln!("moat {what}: the API answered {}: {error}", answer.status);
        for d in value["detail"].as_array().into_iter().flatten() {
            eprintln!("  {}", d.as_str().unwrap_or_default());
        }
        return Err(2);
    }
    Ok(value)
}

pub fn connections(running: &Path, deployment: Option<&str>, json: bool) -> i32 {
    let mut path = "/api/v1/connections".to_string();
    if let Some(d) = deployment {
        let enc = percent_encoding::utf8_percent_encode(d, percent_encoding::NON_ALPHANUMERIC);
        path.push_str(&format!("?deployment={enc}"));
    }
    let v = match call(running, "GET", &path, None, Vec::new()) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if json {
        println!("{v}");
        return 0;
    }
    println!(
        "{:<8} {:<16} {:<40} {:<5} {:<21} RULE",
        "ID", "DEPLOYMENT", "SOURCE", "TLS", "SINCE"
    );
    for c in v["results"].as_array().into_iter().flatten() {
        println!(
            "{:<8} {:<16} {:<40} {:<5} {:<21} {}  ({} B up, {} B down{})",
            c["id"],
            c["deployment"].as_str().unwrap_or_default(),
            c["source"].as_str().unwrap_or_default(),
            c["tls"],
            c["since"].as_str().unwrap_or_default(),
            c["rule"].as_str().unwrap_or_default(),
            c["bytesToUpstream"],
            c["bytesToClient"],
            c["sni"]
                .as_str()
                .map(|s| format!(", SNI {s}"))
                .unwrap_or_default(),
        );
    }
    0
}

pub fn plan(running: &Path, candidate: &Path, json: bool) -> i32 {
    let body = match std::fs::read(candidate) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("moat plan: cannot read {}: {e}", candidate.display());
            return 1;
        }
    };
    let v = match call(
        running,
        "POST",
        "/api/v1/plan",
        Some("application/toml"),
        body,
    ) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let valid = v["valid"].as_bool().unwrap_or(false);
    if json {
        println!("{v}");
    } else {
        for e in v["errors"].as_array().into_iter().flatten() {
            eprintln!("{}", e.as_str().unwrap_or_default());
        }
        for w in v["warnings"].as_array().into_iter().flatten() {
            eprintln!("{}", w.as_str().unwrap_or_default());
        }
        for d in v["deployments"].as_array().into_iter().flatten() {
            let list = |k: &str, sign: &str| -> Vec<String> {
                d[k].as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| format!("{sign}{}", n.as_str().unwrap_or_default()))
                    .collect()
            };
            let mut changes = list("added", "+");
            changes.extend(list("removed", "-"));
            let name = d["name"].as_str().unwrap_or_default();
            if changes.is_empty() {
                println!("{name}: no change");
            } else {
                println!("{name}: {}", changes.join(" "));
            }
            for r in d["revokes"].as_array().into_iter().flatten() {
                println!(
                    "  revokes connection {} from {}",
                    r["id"],
                    r["source"].as_str().unwrap_or_default()
                );
            }
        }
    }
    if valid {
        println!("{}: valid; nothing was applied", candidate.display());
        0
    } else {
        eprintln!("{}: invalid; nothing was applied", candidate.display());
        1
    }
}

/// `moat api-key new`: 32 bytes from the OS RNG, shown once, and the
/// `[[key]]` block that holds only their SHA-256.
pub fn new_key(name: &str, role: &str, deployments: &[String]) -> i32 {
    use ring::rand::SecureRandom;
    let mut secret = [0u8; 32];
    if ring::rand::SystemRandom::new().fill(&mut secret).is_err() {
        eprintln!("moat api-key: the OS random number generator failed");
        return 1;
    }
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let key = format!("moat_{}", hex(&secret));
    let digest = hex(&sha2::Sha256::digest(key.as_bytes()));
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    println!("{key}");
    println!();
    println!("# The key above is shown only this once: give it to its user now.");
    println!(
        "# Add this block to the API keys file ([api] keys); it holds only the key's SHA-256."
    );
    println!("[[key]]");
    println!("name = {}", q(name));
    println!("sha256 = \"{digest}\"");
    println!("role = {}", q(role));
    if !deployments.is_empty() {
        let list: Vec<String> = deployments.iter().map(|d| q(d)).collect();
        println!("deployments = [{}]", list.join(", "));
    }
    0
}

use sha2::Digest;

/// Whether the config at `path` names a fleet store.
fn fleet_configured(path: &Path) -> bool {
    crate::config::load(path, SystemTime::now()).is_ok_and(|c| c.store.is_some())
}
