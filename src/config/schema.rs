//! A first pass over the parsed TOML that knows every key of the config and
//! membership files: it reports each unknown key, wrong type and missing
//! required key with its place, all of them in one run, and removes what is
//! wrong so that the typed pass can go on and report the rest.

use super::diag::{Report, Source};
use toml::de::{DeArray, DeTable, DeValue};
use toml::Spanned;

/// What a key holds.
#[derive(Clone, Copy)]
enum Ty {
    Str,
    Int,
    /// A string or a list of strings (`listen`).
    StrOrList,
    StrList,
    /// An RFC 3339 string or a TOML date-time (`expires`).
    Instant,
    Table(&'static Schema),
    Tables(&'static Schema),
    /// A table whose keys are free and whose values are tables (`accounts`).
    MapOf(&'static Schema),
}

/// The keys of one table: name, type, required.
pub struct Schema {
    what: &'static str,
    keys: &'static [(&'static str, Ty, bool)],
}

const LIMITS: Schema = Schema {
    what: "[limits]",
    keys: &[
        ("max_connections", Ty::Int, false),
        ("max_connections_per_ip", Ty::Int, false),
        ("connect_timeout", Ty::Str, false),
        ("handshake_timeout", Ty::Str, false),
        ("idle_timeout", Ty::Str, false),
    ],
};

const DEPLOYMENT_LIMITS: Schema = Schema {
    what: "[deployment.limits]",
    keys: LIMITS.keys,
};

const ACCOUNT: Schema = Schema {
    what: "an entry of `accounts`",
    keys: &[("role_arn", Ty::Str, true)],
};

const AWS: Schema = Schema {
    what: "[security_groups] aws",
    keys: &[
        ("region", Ty::Str, true),
        ("refresh", Ty::Str, false),
        ("endpoint", Ty::Str, false),
        ("accounts", Ty::MapOf(&ACCOUNT), false),
    ],
};

const TLS: Schema = Schema {
    what: "[deployment.tls]",
    keys: &[
        ("mode", Ty::Str, false),
        ("cert", Ty::Str, true),
        ("key", Ty::Str, true),
        ("client_ca", Ty::Str, false),
        ("min_version", Ty::Str, false),
    ],
};

const ALLOW: Schema = Schema {
    what: "[[deployment.allow]]",
    keys: &[
        ("cidr", Ty::Str, false),
        ("aws_account", Ty::Str, false),
        ("security_group", Ty::Str, false),
        ("description", Ty::Str, false),
        ("expires", Ty::Instant, false),
    ],
};

const PROXY_PROTOCOL: Schema = Schema {
    what: "proxy_protocol",
    keys: &[("trusted", Ty::StrList, true)],
};

const DEPLOYMENT: Schema = Schema {
    what: "[[deployment]]",
    keys: &[
        ("name", Ty::Str, true),
        ("plan", Ty::Str, false),
        ("listen", Ty::StrOrList, true),
        ("upstream", Ty::Str, true),
        ("server_names", Ty::StrList, false),
        ("copy_rules_from", Ty::StrList, false),
        ("proxy_protocol", Ty::Table(&PROXY_PROTOCOL), false),
        ("limits", Ty::Table(&DEPLOYMENT_LIMITS), false),
        ("tls", Ty::Table(&TLS), false),
        ("allow", Ty::Tables(&ALLOW), false),
    ],
};

pub const CONFIG: Schema = Schema {
    what: "the top level",
    keys: &[
        (
            "server",
            Ty::Table(&Schema {
                what: "[server]",
                keys: &[
                    ("admin_listen", Ty::Str, false),
                    ("log_format", Ty::Str, false),
                    ("shutdown_grace", Ty::Str, false),
                    ("on_revoke", Ty::Str, false),
                ],
            }),
            false,
        ),
        ("limits", Ty::Table(&LIMITS), false),
        (
            "security_groups",
            Ty::Table(&Schema {
                what: "[security_groups]",
                keys: &[("file", Ty::Str, false), ("aws", Ty::Table(&AWS), false)],
            }),
            false,
        ),
        ("api", Ty::Table(&API), false),
        (
            "store",
            Ty::Table(&Schema {
                what: "[store]",
                keys: &[("etcd", Ty::Table(&ETCD), true)],
            }),
            false,
        ),
        ("deployment", Ty::Tables(&DEPLOYMENT), false),
    ],
};

const ETCD: Schema = Schema {
    what: "[store] etcd",
    keys: &[
        ("endpoints", Ty::StrList, true),
        ("prefix", Ty::Str, false),
        ("cache", Ty::Str, false),
        ("username", Ty::Str, false),
        ("password_file", Ty::Str, false),
        ("ca", Ty::Str, false),
        ("cert", Ty::Str, false),
        ("key", Ty::Str, false),
    ],
};

const API: Schema = Schema {
    what: "[api]",
    keys: &[
        ("listen", Ty::Str, true),
        (
            "tls",
            Ty::Table(&Schema {
                what: "[api] tls",
                keys: &[("cert", Ty::Str, true), ("key", Ty::Str, true)],
            }),
            false,
        ),
        ("keys", Ty::Str, true),
    ],
};

/// The API keys file (SPEC 6.1).
pub const KEYS: Schema = Schema {
    what: "the top level",
    keys: &[(
        "key",
        Ty::Tables(&Schema {
            what: "[[key]]",
            keys: &[
                ("name", Ty::Str, true),
                ("sha256", Ty::Str, true),
                ("role", Ty::Str, true),
                ("deployments", Ty::StrList, false),
            ],
        }),
        false,
    )],
};

pub const MEMBERSHIP: Schema = Schema {
    what: "the top level",
    keys: &[(
        "group",
        Ty::Tables(&Schema {
            what: "[[group]]",
            keys: &[
                ("aws_account", Ty::Str, true),
                ("id", Ty::Str, true),
                ("members", Ty::StrList, false),
            ],
        }),
        false,
    )],
};

/// Checks `table` against `schema`, reporting and removing what is wrong.
pub fn check(report: &mut Report, src: &Source, table: &mut Spanned<DeTable<'_>>, schema: &Schema) {
    let span = table.span();
    walk(report, src, table.get_mut(), span, schema);
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// Returns false when the table lacks a usable required key (the caller
/// then drops the whole table).
fn walk(
    report: &mut Report,
    src: &Source,
    table: &mut DeTable<'_>,
    span: std::ops::Range<usize>,
    schema: &Schema,
) -> bool {
    let mut drop_keys: Vec<String> = Vec::new();
    let mut complete = true;
    for (key, value) in table.iter_mut() {
        let name: &str = key.get_ref();
        match schema.keys.iter().find(|(k, _, _)| *k == name) {
            None => {
                let allowed: Vec<&str> = schema.keys.iter().map(|(k, _, _)| *k).collect();
                report.error(
                    src,
                    key.span(),
                    format!(
                        "unknown key `{name}` in {}; remove it or use one of: {}",
                        schema.what,
                        allowed.join(", ")
                    ),
                );
                drop_keys.push(name.to_string());
            }
            Some((_, ty, required)) => {
                if !value_ok(report, src, name, value, *ty) {
                    drop_keys.push(name.to_string());
                    complete &= !required;
                }
            }
        }
    }
    for k in &drop_keys {
        table.remove(k.as_str());
    }
    for (k, _, required) in schema.keys {
        if *required && !table.contains_key(*k) && !drop_keys.iter().any(|d| d == k) {
            report.error(
                src,
                span.clone(),
                format!("{} is missing `{k}`; add it", schema.what),
            );
            complete = false;
        }
    }
    complete
}

fn value_ok(
    report: &mut Report,
    src: &Source,
    key: &str,
    value: &mut Spanned<DeValue<'_>>,
    ty: Ty,
) -> bool {
    let span = value.span();
    let mut wrong = |expected: &str, found: &DeValue<'_>| {
        report.error(
            src,
            span.clone(),
            format!("`{key}` must be {expected}, not {}", type_name(found)),
        );
        false
    };
    match (ty, value.get_mut()) {
        (Ty::Str, DeValue::String(_)) | (Ty::Int, DeValue::Integer(_)) => true,
        (Ty::Instant, DeValue::String(_) | DeValue::Datetime(_)) => true,
        (Ty::StrOrList, DeValue::String(_)) => true,
        (Ty::StrOrList | Ty::StrList, DeValue::Array(items)) => strings(report, src, key, items),
        (Ty::Table(s), DeValue::Table(t)) => walk(report, src, t, span, s),
        (Ty::Tables(s), DeValue::Array(items)) => {
            keep_tables(report, src, key, items, s);
            true
        }
        (Ty::MapOf(s), DeValue::Table(t)) => {
            let mut bad: Vec<String> = Vec::new();
            for (k, v) in t.iter_mut() {
                let vspan = v.span();
                let ok = match v.get_mut() {
                    DeValue::Table(inner) => walk(report, src, inner, vspan, s),
                    other => wrong_inner(report, src, vspan, k.get_ref(), "a table", other),
                };
                if !ok {
                    bad.push(k.get_ref().to_string());
                }
            }
            for k in &bad {
                t.remove(k.as_str());
            }
            true
        }
        (Ty::Str | Ty::Instant, found) => wrong("a string", found),
        (Ty::Int, found) => wrong("a whole number", found),
        (Ty::StrOrList, found) => wrong("a string or a list of strings", found),
        (Ty::StrList, found) => wrong("a list of strings", found),
        (Ty::Table(_) | Ty::MapOf(_), found) => wrong("a table", found),
        (Ty::Tables(_), found) => wrong("an array of tables", found),
    }
}

fn wrong_inner(
    report: &mut Report,
    src: &Source,
    span: std::ops::Range<usize>,
    key: &str,
    expected: &str,
    found: &DeValue<'_>,
) -> bool {
    report.error(
        src,
        span,
        format!("`{key}` must be {expected}, not {}", type_name(found)),
    );
    false
}

fn strings(report: &mut Report, src: &Source, key: &str, items: &mut DeArray<'_>) -> bool {
    let mut ok = true;
    for item in items.iter() {
        if !matches!(item.get_ref(), DeValue::String(_)) {
            ok = wrong_inner(
                report,
                src,
                item.span(),
                key,
                "a list of strings",
                item.get_ref(),
            );
        }
    }
    ok
}

/// Keeps the elements of an array of tables that can be read.
fn keep_tables(
    report: &mut Report,
    src: &Source,
    key: &str,
    items: &mut DeArray<'_>,
    schema: &Schema,
) {
    let mut kept = DeArray::new();
    for item in items.iter_mut() {
        let span = item.span();
        let ok = match item.get_mut() {
            DeValue::Table(t) => walk(report, src, t, span.clone(), schema),
            other => wrong_inner(report, src, span.clone(), key, "a table", other),
        };
        if ok {
            kept.push(std::mem::replace(
                item,
                Spanned::new(span, DeValue::Boolean(false)),
            ));
        }
    }
    *items = kept;
}
