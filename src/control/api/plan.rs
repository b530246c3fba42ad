//! `POST /plan`: compiles a candidate config beside the running one (the
//! same load path as `moat check`) and reports what it would change: per
//! deployment, the effective prefixes added and removed and the live
//! connections it would revoke. Applies nothing.

use super::error::{json, ApiError};
use super::{Api, Ctx};
use crate::config::OnRevoke;
use crate::policy::admission::readmit;
use crate::policy::snapshot::Snapshot;
use axum::body::Body;
use axum::http::{Response, StatusCode};
use ipnet::IpNet;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

fn prefixes(snap: &Snapshot, name: &str) -> BTreeSet<IpNet> {
    snap.deployment_index(name)
        .map(|i| snap.compiled[i].prefixes.iter().map(|(n, _)| *n).collect())
        .unwrap_or_default()
}

/// Plans run one at a time.
static PLANNING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

pub async fn plan(api: &Api, ctx: &Ctx) -> Result<Response<Body>, ApiError> {
    if std::str::from_utf8(&ctx.body).is_err() {
        return Err(ApiError::bad(
            "the body is not text",
            "body: send the whole config file, as UTF-8 TOML (Content-Type: application/toml)",
        ));
    }
    let live = api.shared.live.load_full();
    // Relative paths in the candidate resolve against the running config's directory.
    let path = live.snap.config.path.clone();
    let bytes = ctx.body.clone();
    // One plan at a time, and like a reload bounded in time: a candidate
    // that names a FIFO or a file on a hung mount fails instead of holding
    // the request (and a thread) forever.
    let limit = crate::control::reload::LOAD_TIMEOUT;
    let too_slow = || {
        let error = format!(
            "reading the files the candidate names took longer than {}",
            humantime::format_duration(limit)
        );
        Ok(json(
            StatusCode::OK,
            &json!({ "valid": false, "errors": [error], "warnings": [], "deployments": [] }),
        ))
    };
    let Ok(Ok(_permit)) = tokio::time::timeout(limit, PLANNING.acquire()).await else {
        return too_slow();
    };
    let load = tokio::task::spawn_blocking(move || {
        crate::config::load_bytes(&path, &bytes, SystemTime::now())
    });
    let loaded = match tokio::time::timeout(limit, load).await {
        Err(_) => return too_slow(),
        Ok(r) => r.map_err(|e| ApiError::Internal(format!("the plan did not finish: {e}")))?,
    };
    let config = match loaded {
        Err(e) => {
            let list = |ds: &[crate::config::Diagnostic]| {
                ds.iter().map(|d| d.to_string()).collect::<Vec<_>>()
            };
            return Ok(json(
                StatusCode::OK,
                &json!({ "valid": false, "errors": list(&e.errors), "warnings": list(&e.warnings), "deployments": [] }),
            ));
        }
        Ok(c) => c,
    };
    let warnings: Vec<String> = config.warnings.iter().map(|d| d.to_string()).collect();
    let closes = config.server.on_revoke == OnRevoke::Close;
    // The fleet store's entries in force stay while the new file has a store.
    let store = match config.store {
        Some(_) => live.snap.store.clone(),
        None => Arc::default(),
    };
    let new = Snapshot::compile(
        Arc::new(config),
        live.snap.resolved.clone(),
        store,
        SystemTime::now(),
    );
    let old = &live.snap;
    let mut names: Vec<&str> = new
        .config
        .deployments
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    for d in &old.config.deployments {
        if !names.contains(&d.name.as_str()) {
            names.push(&d.name);
        }
    }
    let conns = api.shared.registry.list();
    let deployments: Vec<Value> = names
        .into_iter()
        .filter(|n| ctx.key.sees(n))
        .map(|name| {
            let (before, after) = (prefixes(old, name), prefixes(&new, name));
            let revokes: Vec<Value> = conns
                .iter()
                .filter(|c| closes && *c.deployment == *name)
                .filter(|c| readmit(&new, name, c.source).is_err())
                .map(|c| json!({ "id": c.id, "source": c.source.to_string() }))
                .collect();
            json!({
                "name": name,
                "added": after.difference(&before).map(|n| n.to_string()).collect::<Vec<_>>(),
                "removed": before.difference(&after).map(|n| n.to_string()).collect::<Vec<_>>(),
                "revokes": revokes,
            })
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({ "valid": true, "errors": [], "warnings": warnings, "deployments": deployments }),
    ))
}
