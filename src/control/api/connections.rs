//! `/connections`: the live connections of the registry, and closing one
//! (counted as revoked).

use super::auth::forbidden_deployment;
use super::error::{json, ApiError};
use super::{Api, Ctx};
use crate::data::registry::ConnInfo;
use crate::policy::access::format_instant;
use axum::body::Body;
use axum::http::{Response, StatusCode};
use serde_json::{json, Value};

pub fn to_json(c: &ConnInfo) -> Value {
    json!({
        "id": c.id,
        "deployment": &*c.deployment,
        "source": c.source.to_string(),
        "rule": c.rule,
        "tls": c.tls,
        "sni": c.sni,
        "since": format_instant(c.since),
        "bytesToUpstream": c.bytes_to_upstream,
        "bytesToClient": c.bytes_to_client,
    })
}

pub fn list(api: &Api, ctx: &Ctx, deployment: Option<&str>) -> Result<Response<Body>, ApiError> {
    if let Some(d) = deployment {
        if api.shared.live.load().snap.deployment_index(d).is_none() {
            let msg = format!("there is no deployment named \"{d}\"");
            return Err(ApiError::NotFound(
                msg.clone(),
                vec![format!("deployment: {msg}")],
            ));
        }
    }
    let mut conns: Vec<ConnInfo> = api
        .shared
        .registry
        .list()
        .into_iter()
        .filter(|c| ctx.key.sees(&c.deployment))
        .filter(|c| deployment.is_none_or(|d| *c.deployment == *d))
        .collect();
    conns.sort_by_key(|c| c.id);
    let results: Vec<Value> = conns.iter().map(to_json).collect();
    Ok(json(
        StatusCode::OK,
        &json!({ "totalCount": results.len(), "results": results }),
    ))
}

pub fn close(api: &Api, ctx: &Ctx, id: &str) -> Result<Response<Body>, ApiError> {
    let gone = || {
        let msg = format!("there is no live connection {id}");
        ApiError::NotFound(msg.clone(), vec![format!("id: {msg}")])
    };
    // Any id that names no live connection is 404, a malformed one included
    // (SPEC 6.2: "404 when gone"); the message says what an id looks like.
    let Ok(n) = id.parse::<u64>() else {
        let msg = format!(
            "there is no live connection {id} (ids are whole numbers, as GET /connections lists them)"
        );
        return Err(ApiError::NotFound(msg.clone(), vec![format!("id: {msg}")]));
    };
    let conn = api.shared.registry.list().into_iter().find(|c| c.id == n);
    let result = match &conn {
        None => Err(gone()),
        Some(c) if !ctx.key.sees(&c.deployment) => {
            Err(forbidden_deployment(&ctx.key, &c.deployment))
        }
        Some(_) if !api.shared.registry.close(n) => Err(gone()),
        Some(_) => Ok(()),
    };
    let deployment = conn.as_ref().map_or("", |c| &*c.deployment);
    let source = conn
        .as_ref()
        .map(|c| c.source.to_string())
        .unwrap_or_default();
    tracing::info!(
        target: "moat::audit",
        key = %ctx.key.name,
        deployment,
        action = "close connection",
        entry = %format!("connection {id} from {source}"),
        result = %match &result { Ok(()) => "ok".to_string(), Err(e) => e.status().as_u16().to_string() },
        "connection close"
    );
    result?;
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}
