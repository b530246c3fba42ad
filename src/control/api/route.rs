//! Method + path to one typed request per route (after Garage's admin
//! router), with the authorisation each needs decided in one `match`, so no
//! route can forget it, and the route's template for metrics.

use super::error::ApiError;
use crate::config::Role;
use axum::http::{Method, Uri};
use percent_encoding::percent_decode_str;

/// Every route of SPEC 6.2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    ListDeployments,
    GetAccessList { name: String },
    AddEntries { name: String },
    DeleteEntry { name: String, entry: String },
    EntryStatus { name: String, entry: String },
    CopyAccessList { name: String },
    ListConnections { deployment: Option<String> },
    CloseConnection { id: String },
    Plan,
    OpenApi,
}

pub const PREFIX: &str = "/api/v1";

/// The label of requests that match no route.
pub const UNMATCHED: &str = "unmatched";

impl Route {
    /// The route of a request; 404 for an unknown path or method (naming
    /// the methods a known path takes), 400 for a path that does not decode.
    pub fn parse(method: &Method, uri: &Uri) -> Result<Route, (&'static str, ApiError)> {
        let path = uri.path();
        let unmatched = || {
            (
                UNMATCHED,
                ApiError::NotFound(
                    format!("no route {method} {path}"),
                    vec![format!(
                        "path: the routes are under {PREFIX}; see {PREFIX}/openapi.json"
                    )],
                ),
            )
        };
        let Some(rest) = path.strip_prefix(PREFIX) else {
            return Err(unmatched());
        };
        let mut segs: Vec<String> = Vec::new();
        if !rest.is_empty() {
            let Some(rest) = rest.strip_prefix('/') else {
                return Err(unmatched());
            };
            for raw in rest.split('/') {
                match percent_decode_str(raw).decode_utf8() {
                    Ok(s) => segs.push(s.into_owned()),
                    Err(_) => {
                        return Err((
                            UNMATCHED,
                            ApiError::bad(
                                "the path does not decode",
                                format!("path: \"{raw}\" is not UTF-8 once percent-decoded"),
                            ),
                        ))
                    }
                }
            }
        }
        let s: Vec<&str> = segs.iter().map(String::as_str).collect();
        // HEAD is GET without the body (hyper sends none for HEAD).
        let asked = method;
        let method = if *method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        use Method as M;
        let (template, allow, route) = match s.as_slice() {
            ["deployments"] => (
                "/api/v1/deployments",
                "GET",
                (*method == M::GET).then_some(Route::ListDeployments),
            ),
            ["deployments", name, "accessList"] => (
                "/api/v1/deployments/{name}/accessList",
                "GET, POST",
                match *method {
                    M::GET => Some(Route::GetAccessList {
                        name: name.to_string(),
                    }),
                    M::POST => Some(Route::AddEntries {
                        name: name.to_string(),
                    }),
                    _ => None,
                },
            ),
            ["deployments", name, "accessList", "copy"] if *method == M::POST => (
                "/api/v1/deployments/{name}/accessList/copy",
                "POST",
                Some(Route::CopyAccessList {
                    name: name.to_string(),
                }),
            ),
            // An entry may arrive with its '/' unencoded: 10.0.0.0/16.
            ["deployments", name, "accessList", entry @ .., "status"] if !entry.is_empty() => (
                "/api/v1/deployments/{name}/accessList/{entry}/status",
                "GET",
                (*method == M::GET).then(|| Route::EntryStatus {
                    name: name.to_string(),
                    entry: entry.join("/"),
                }),
            ),
            ["deployments", name, "accessList", entry @ ..] if !entry.is_empty() => (
                "/api/v1/deployments/{name}/accessList/{entry}",
                "DELETE",
                (*method == M::DELETE).then(|| Route::DeleteEntry {
                    name: name.to_string(),
                    entry: entry.join("/"),
                }),
            ),
            ["connections"] => (
                "/api/v1/connections",
                "GET",
                (*method == M::GET).then(|| Route::ListConnections {
                    deployment: query(uri, "deployment"),
                }),
            ),
            ["connections", id] => (
                "/api/v1/connections/{id}",
                "DELETE",
                (*method == M::DELETE).then(|| Route::CloseConnection { id: id.to_string() }),
            ),
            ["plan"] => (
                "/api/v1/plan",
                "POST",
                (*method == M::POST).then_some(Route::Plan),
            ),
            ["openapi.json"] => (
                "/api/v1/openapi.json",
                "GET",
                (*method == M::GET).then_some(Route::OpenApi),
            ),
            _ => return Err(unmatched()),
        };
        route.ok_or((
            template,
            ApiError::WrongMethod(format!("{asked} {path}"), allow),
        ))
    }

    /// The route's template, the `route` label of `moat_api_requests_total`.
    pub fn template(&self) -> &'static str {
        match self {
            Route::ListDeployments => "/api/v1/deployments",
            Route::GetAccessList { .. } | Route::AddEntries { .. } => {
                "/api/v1/deployments/{name}/accessList"
            }
            Route::DeleteEntry { .. } => "/api/v1/deployments/{name}/accessList/{entry}",
            Route::EntryStatus { .. } => "/api/v1/deployments/{name}/accessList/{entry}/status",
            Route::CopyAccessList { .. } => "/api/v1/deployments/{name}/accessList/copy",
            Route::ListConnections { .. } => "/api/v1/connections",
            Route::CloseConnection { .. } => "/api/v1/connections/{id}",
            Route::Plan => "/api/v1/plan",
            Route::OpenApi => "/api/v1/openapi.json",
        }
    }

    /// The role a key needs for this route: reads and `/plan` need `read`.
    pub fn role(&self) -> Role {
        match self {
            Route::ListDeployments
            | Route::GetAccessList { .. }
            | Route::EntryStatus { .. }
            | Route::ListConnections { .. }
            | Route::Plan
            | Route::OpenApi => Role::Read,
            Route::AddEntries { .. }
            | Route::DeleteEntry { .. }
            | Route::CopyAccessList { .. }
            | Route::CloseConnection { .. } => Role::Write,
        }
    }

    /// The deployment the path (or query) names, which the key must see.
    pub fn deployment(&self) -> Option<&str> {
        match self {
            Route::GetAccessList { name }
            | Route::AddEntries { name }
            | Route::DeleteEntry { name, .. }
            | Route::EntryStatus { name, .. }
            | Route::CopyAccessList { name } => Some(name),
            Route::ListConnections { deployment } => deployment.as_deref(),
            Route::ListDeployments
            | Route::CloseConnection { .. }
            | Route::Plan
            | Route::OpenApi => None,
        }
    }

    /// Whether the route changes state (audited, and answered once in force).
    pub fn is_write(&self) -> bool {
        self.role() == Role::Write
    }
}

/// One query parameter, percent-decoded (`+` is a space).
fn query(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(m: Method, p: &str) -> Result<Route, u16> {
        Route::parse(&m, &p.parse().unwrap()).map_err(|(_, e)| e.status().as_u16())
    }

    #[test]
    fn paths_become_typed_requests() {
        assert_eq!(
            parse(Method::GET, "/api/v1/deployments"),
            Ok(Route::ListDeployments)
        );
        assert_eq!(
            parse(
                Method::DELETE,
                "/api/v1/deployments/orders/accessList/10.0.0.0%2F16"
            ),
            Ok(Route::DeleteEntry {
                name: "orders".into(),
                entry: "10.0.0.0/16".into()
            })
        );
        assert_eq!(
            parse(
                Method::GET,
                "/api/v1/deployments/orders/accessList/10.0.0.0/16/status"
            ),
            Ok(Route::EntryStatus {
                name: "orders".into(),
                entry: "10.0.0.0/16".into()
            })
        );
        assert_eq!(
            parse(Method::POST, "/api/v1/deployments/orders/accessList/copy"),
            Ok(Route::CopyAccessList {
                name: "orders".into()
            })
        );
        assert_eq!(
            parse(Method::GET, "/api/v1/connections?deployment=a%20b"),
            Ok(Route::ListConnections {
                deployment: Some("a b".into())
            })
        );
        assert_eq!(parse(Method::GET, "/api/v1/nope"), Err(404));
        assert_eq!(parse(Method::GET, "/api/v10"), Err(404));
        assert_eq!(parse(Method::PUT, "/api/v1/deployments"), Err(404));
        // HEAD is GET without a body; it never reaches a write.
        assert_eq!(
            parse(Method::HEAD, "/api/v1/deployments"),
            Ok(Route::ListDeployments)
        );
        assert_eq!(parse(Method::HEAD, "/api/v1/plan"), Err(404));
        assert_eq!(
            parse(Method::GET, "/api/v1/deployments/%FF/accessList"),
            Err(400)
        );
    }

    #[test]
    fn writes_need_the_write_role() {
        assert_eq!(Route::Plan.role(), Role::Read);
        assert_eq!(
            Route::CloseConnection { id: "1".into() }.role(),
            Role::Write
        );
        assert!(Route::CopyAccessList { name: "x".into() }.is_write());
    }
}
