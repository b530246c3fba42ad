//! `GET /deployments`: every deployment the key may see, as running now.

use super::error::{json, ApiError};
use super::{Api, Ctx};
use crate::config::{Deployment, Plan};
use crate::policy::snapshot::Snapshot;
use axum::body::Body;
use axum::http::{Response, StatusCode};
use serde_json::json;

pub fn list(api: &Api, ctx: &Ctx) -> Result<Response<Body>, ApiError> {
    let live = api.shared.live.load();
    let results: Vec<_> = live
        .snap
        .config
        .deployments
        .iter()
        .zip(&live.deployments)
        .filter(|(d, _)| ctx.key.sees(&d.name))
        .map(|(d, state)| {
            json!({
                "name": d.name,
                "plan": match d.plan { Plan::Dedicated => "dedicated", Plan::Shared => "shared" },
                "listen": d.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "tls": d.tls.is_some(),
                "accessListEntries": own_entries(&live.snap, d),
                "activeConnections": state.metrics.active.get().max(0),
            })
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({ "totalCount": results.len(), "results": results }),
    ))
}

/// What `GET /deployments/{name}/accessList` lists: the store's entries when
/// a fleet store holds the access lists (the file's `allow` tables are then
/// host rules the API does not edit), else the file's `allow` tables.
fn own_entries(snap: &Snapshot, d: &Deployment) -> usize {
    if snap.config.store.is_some() {
        snap.store.of(&d.name).len()
    } else {
        d.rules.len()
    }
}
