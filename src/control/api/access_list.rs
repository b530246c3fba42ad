//! `/deployments/{name}/accessList…`: read, add, remove, status and copy of
//! a deployment's own entries, through the store; writes answer once this
//! host enforces them, and each is audited.

use super::error::{json, ApiError};
use super::{Api, Ctx};
use crate::control::{self, Listing};
use crate::policy::access::{parse_key, Entry, KeyRef, ValidEntry};
use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Map, Value};
use std::time::SystemTime;

fn listing_response(status: StatusCode, l: &Listing) -> Response<Body> {
    let mut resp = json(
        status,
        &json!({ "results": l.entries, "totalCount": l.entries.len() }),
    );
    if let Ok(v) = HeaderValue::from_str(&l.etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// One audit line per write: key name (never the key), deployment, action,
/// entry, result.
fn audit(ctx: &Ctx, deployment: &str, action: &str, entry: &str, result: &Result<(), ApiError>) {
    let result = match result {
        Ok(()) => "ok".to_string(),
        Err(e) => format!(
            "{} {}",
            e.status().as_u16(),
            e.status().canonical_reason().unwrap_or("")
        ),
    };
    tracing::info!(
        target: "moat::audit",
        key = %ctx.key.name,
        deployment,
        action,
        entry,
        result = %result,
        "access-list write"
    );
}

pub async fn get(api: &Api, name: &str) -> Result<Response<Body>, ApiError> {
    let listing = api.store.list(name).await?;
    Ok(listing_response(StatusCode::OK, &listing))
}

/// Parses and validates the body of a POST: a JSON array of entries.
fn parse_entries(body: &[u8]) -> Result<Vec<(Entry, ValidEntry)>, ApiError> {
    crate::policy::access::parse_entries(body, SystemTime::now())
        .map_err(|e| ApiError::BadRequest(e.error, e.detail))
}

/// The stored entries with these keys, as the listing has them.
fn stored<'l>(l: &'l Listing, keys: &[&crate::policy::access::EntryKey]) -> Vec<&'l Entry> {
    l.entries
        .iter()
        .filter(|e| e.validate(None).is_ok_and(|v| keys.contains(&&v.key)))
        .collect()
}

pub async fn add(api: &Api, ctx: &Ctx, name: &str) -> Result<Response<Body>, ApiError> {
    let entries = match parse_entries(&ctx.body) {
        Ok(e) => e,
        Err(e) => {
            audit(ctx, name, "add", "(invalid body)", &Err(e.clone()));
            return Err(e);
        }
    };
    let valid: Vec<ValidEntry> = entries.iter().map(|(_, v)| v.clone()).collect();
    let names: Vec<String> = valid.iter().map(|v| v.key.to_string()).collect();
    let result = async {
        let edited = api
            .store
            .add(name, valid.clone(), ctx.if_match.clone())
            .await?;
        let keys: Vec<_> = valid.iter().map(|v| &v.key).collect();
        let want: Vec<Entry> = stored(&edited.listing, &keys)
            .into_iter()
            .cloned()
            .collect();
        api.enforced(ctx.arrival, |c| {
            want.iter().all(|e| control::in_force(c, name, e))
        })
        .await?;
        Ok::<_, ApiError>(edited.listing)
    }
    .await;
    for n in &names {
        audit(
            ctx,
            name,
            "add",
            n,
            &result.as_ref().map(|_| ()).map_err(Clone::clone),
        );
    }
    Ok(listing_response(StatusCode::CREATED, &result?))
}

fn entry_key(entry: &str) -> Result<KeyRef, ApiError> {
    parse_key(entry).map_err(|m| {
        ApiError::bad(
            "the path does not name an entry",
            format!("entry: {m} (name an entry by its cidrBlock, URL-encoded like 10.0.0.0%2F16, or its awsSecurityGroup)"),
        )
    })
}

pub async fn remove(
    api: &Api,
    ctx: &Ctx,
    name: &str,
    entry: &str,
) -> Result<Response<Body>, ApiError> {
    let result = async {
        let key = entry_key(entry)?;
        let (edited, _) = api
            .store
            .remove(name, key.clone(), ctx.if_match.clone())
            .await?;
        api.enforced(ctx.arrival, |c| control::gone(c, name, &key))
            .await?;
        Ok::<_, ApiError>(edited.listing)
    }
    .await;
    audit(
        ctx,
        name,
        "remove",
        entry,
        &result.as_ref().map(|_| ()).map_err(Clone::clone),
    );
    let listing = result?;
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    if let Ok(v) = HeaderValue::from_str(&listing.etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    Ok(resp)
}

pub async fn status(api: &Api, name: &str, entry: &str) -> Result<Response<Body>, ApiError> {
    let key = entry_key(entry)?;
    let listing = api.store.list(name).await?;
    let found = listing
        .entries
        .iter()
        .find(|e| e.validate(None).is_ok_and(|v| key.matches(&v.key)))
        .ok_or_else(|| {
            let msg = format!("deployment \"{name}\" has no access-list entry {key}");
            ApiError::NotFound(msg.clone(), vec![format!("entry: {msg}")])
        })?;
    let active = control::in_force(&api.shared.live.load().snap, name, found);
    Ok(json(
        StatusCode::OK,
        &json!({ "status": if active { "ACTIVE" } else { "PENDING" } }),
    ))
}

/// The body of a copy: `{"from": "other"}`.
fn copy_source(body: &[u8]) -> Result<String, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("the body is not JSON", format!("body: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::bad(
            "the body must be an object",
            "body: send {\"from\": \"other-deployment\"}",
        ));
    };
    let mut errors = Vec::new();
    let mut from = None;
    for (k, v) in Map::clone(&obj) {
        match (k.as_str(), v) {
            ("from", Value::String(s)) => from = Some(s),
            ("from", _) => errors.push("from: must be a string, the name of a deployment".into()),
            (other, _) => errors.push(format!(
                "{other}: unknown field; the body takes only \"from\""
            )),
        }
    }
    if from.is_none() && errors.is_empty() {
        errors.push("from: missing; name the deployment to copy from".into());
    }
    match from {
        Some(f) if errors.is_empty() => Ok(f),
        _ => Err(ApiError::BadRequest("the body is invalid".into(), errors)),
    }
}

pub async fn copy(api: &Api, ctx: &Ctx, name: &str) -> Result<Response<Body>, ApiError> {
    let result = async {
        let from = copy_source(&ctx.body)?;
        if !ctx.key.sees(&from) {
            return Err(super::auth::forbidden_deployment(&ctx.key, &from));
        }
        let edited = api.store.copy(name, &from, ctx.if_match.clone()).await?;
        let want = edited.listing.entries.clone();
        api.enforced(ctx.arrival, |c| {
            want.iter().all(|e| control::in_force(c, name, e))
        })
        .await?;
        Ok::<_, ApiError>((from, edited.listing))
    }
    .await;
    let from = match &result {
        Ok((f, _)) => format!("from {f}"),
        Err(_) => "(copy)".to_string(),
    };
    audit(
        ctx,
        name,
        "copy",
        &from,
        &result.as_ref().map(|_| ()).map_err(Clone::clone),
    );
    Ok(listing_response(StatusCode::CREATED, &result?.1))
}
