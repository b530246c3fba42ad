//! The API's one error type: every failure maps to exactly one status code
//! and the JSON body of SPEC 6.1, `{"error": "...", "detail": [...]}`.

use crate::control::StoreError;
use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};

#[derive(Debug, Clone)]
pub enum ApiError {
    /// 400: the request is malformed or the change invalid; `detail` names fields.
    BadRequest(String, Vec<String>),
    /// 401: no key, or not a known one.
    Unauthorized(String),
    /// 403: a known key without the role or the deployment.
    Forbidden(String),
    NotFound(String, Vec<String>),
    /// A known path with another method: 404 (SPEC 6.2: unmatched routes
    /// are 404), naming the methods the path takes (also in `Allow`).
    WrongMethod(String, &'static str),
    /// 408: the request did not arrive in time (the connection is closed).
    Timeout,
    /// 409: the config file cannot be written here.
    Conflict(String, Vec<String>),
    /// 412: `If-Match` names an older list.
    PreconditionFailed(String, String),
    PayloadTooLarge,
    /// 503: the fleet store cannot be reached; `detail` has the transport error.
    Unavailable(String, Vec<String>),
    /// 504: stored, but not in force within the time allowed.
    NotEnforced(String),
    Internal(String),
}

impl ApiError {
    pub fn bad(error: impl Into<String>, detail: impl Into<String>) -> ApiError {
        ApiError::BadRequest(error.into(), vec![detail.into()])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(..) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(..) => StatusCode::NOT_FOUND,
            ApiError::WrongMethod(..) => StatusCode::NOT_FOUND,
            ApiError::Timeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Conflict(..) => StatusCode::CONFLICT,
            ApiError::PreconditionFailed(..) => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotEnforced(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn parts(&self) -> (String, Vec<String>) {
        match self {
            ApiError::BadRequest(e, d)
            | ApiError::NotFound(e, d)
            | ApiError::Conflict(e, d)
            | ApiError::Unavailable(e, d) => (e.clone(), d.clone()),
            ApiError::Unauthorized(e) | ApiError::Forbidden(e) | ApiError::Internal(e) => {
                (e.clone(), Vec::new())
            }
            ApiError::NotEnforced(e) => (e.clone(), Vec::new()),
            ApiError::PreconditionFailed(e, tag) => (e.clone(), vec![format!("ETag: {tag}")]),
            ApiError::WrongMethod(route, allow) => (
                format!("no route {route}"),
                vec![format!("method: this path takes {allow}")],
            ),
            ApiError::Timeout => (
                "the request did not arrive within 10 s; the connection is closed".into(),
                Vec::new(),
            ),
            ApiError::PayloadTooLarge => (
                "the request body is larger than 1 MiB".into(),
                vec!["body: send at most 1048576 bytes".into()],
            ),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let (error, detail) = self.parts();
        let mut resp = json(
            self.status(),
            &serde_json::json!({ "error": error, "detail": detail }),
        );
        let h = resp.headers_mut();
        match &self {
            ApiError::Unauthorized(_) => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::WrongMethod(_, allow) => {
                h.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::PreconditionFailed(_, tag) => {
                if let Ok(v) = HeaderValue::from_str(tag) {
                    h.insert(header::ETAG, v);
                }
            }
            ApiError::Timeout | ApiError::PayloadTooLarge => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let msg = e.to_string();
        match e {
            StoreError::UnknownDeployment(_) => {
                ApiError::NotFound(msg.clone(), vec![format!("name: {msg}")])
            }
            StoreError::UnknownSource(_) => {
                ApiError::NotFound(msg.clone(), vec![format!("from: {msg}")])
            }
            StoreError::NoEntry { .. } => {
                ApiError::NotFound(msg.clone(), vec![format!("entry: {msg}")])
            }
            StoreError::SharedPlan(_) => {
                ApiError::BadRequest(msg.clone(), vec![format!("plan: {msg}")])
            }
            StoreError::Changed(tag) => ApiError::PreconditionFailed(msg, tag),
            StoreError::Rejected(detail) => ApiError::BadRequest(msg, detail),
            StoreError::ReadOnly(why) => ApiError::Conflict(
                "the config file is not writable here; change it at its source".into(),
                vec![why],
            ),
            StoreError::Unsupported(why) => ApiError::Conflict(why, Vec::new()),
            StoreError::TooLarge(why) => {
                ApiError::BadRequest(why.clone(), vec![format!("body: {why}")])
            }
            StoreError::Io(why) => ApiError::Internal(why),
            StoreError::Unavailable(why) | StoreError::Unconfirmed(why) => {
                ApiError::Unavailable(msg, vec![format!("etcd: {why}")])
            }
        }
    }
}
