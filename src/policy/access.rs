//! Access-list entries in the shape of the Atlas Admin API (`cidrBlock` or
//! `awsSecurityGroup` + `awsAccountId`, `comment`, `deleteAfterDate`): the
//! JSON that the HTTP API, `moat access-list` and the fleet store exchange,
//! validated by the same value parsers as the config file.

use crate::config::values::{check_account, check_group_id, parse_cidr};
use crate::config::{GroupKey, Rule, RuleTarget};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::SystemTime;

/// One entry as written on the wire (API bodies, store values).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Entry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr_block: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_security_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_account_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_after_date: Option<String>,
}

/// What identifies an entry within one deployment's list: its CIDR or its
/// security group (an entry with the same key replaces the old one).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryKey {
    Cidr(IpNet),
    Group(GroupKey),
}

impl fmt::Display for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryKey::Cidr(n) => write!(f, "{n}"),
            EntryKey::Group(g) => f.write_str(&g.id),
        }
    }
}

/// A problem with one field of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn err(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

/// A checked entry: the rule it becomes and its key.
#[derive(Debug, Clone)]
pub struct ValidEntry {
    pub key: EntryKey,
    pub rule: Rule,
}

impl Entry {
    /// Checks every field. `now`: a `deleteAfterDate` at or before it is an
    /// error (writes must not add entries that are already gone); pass None
    /// to accept past dates (reading the store, where they just expire).
    pub fn validate(&self, now: Option<SystemTime>) -> Result<ValidEntry, Vec<FieldError>> {
        let mut errors = Vec::new();
        let target = match (&self.cidr_block, &self.aws_security_group) {
            (Some(_), Some(_)) => {
                errors.push(err(
                    "cidrBlock",
                    "give either cidrBlock or awsSecurityGroup, not both",
                ));
                None
            }
            (None, None) => {
                errors.push(err(
                    "cidrBlock",
                    "an entry needs cidrBlock (like \"10.0.0.0/16\") or awsSecurityGroup with awsAccountId",
                ));
                None
            }
            (Some(c), None) => {
                if self.aws_account_id.is_some() {
                    errors.push(err(
                        "awsAccountId",
                        "awsAccountId goes with awsSecurityGroup, not with cidrBlock",
                    ));
                }
                parse_cidr(c)
                    .map_err(|m| errors.push(err("cidrBlock", m)))
                    .ok()
                    .map(RuleTarget::Cidr)
            }
            (None, Some(sg)) => {
                let id_ok = check_group_id(sg)
                    .map_err(|m| errors.push(err("awsSecurityGroup", m)))
                    .is_ok();
                match &self.aws_account_id {
                    None => {
                        errors.push(err(
                            "awsAccountId",
                            "awsSecurityGroup needs awsAccountId (12 digits)",
                        ));
                        None
                    }
                    Some(acct) => {
                        let acct_ok = check_account(acct)
                            .map_err(|m| errors.push(err("awsAccountId", m)))
                            .is_ok();
                        (id_ok && acct_ok).then(|| {
                            RuleTarget::Group(GroupKey {
                                account: acct.clone(),
                                id: sg.clone(),
                            })
                        })
                    }
                }
            }
        };
        let expires = match &self.delete_after_date {
            None => None,
            Some(text) => match parse_instant(text) {
                Err(m) => {
                    errors.push(err("deleteAfterDate", m));
                    None
                }
                Ok(t) => {
                    if now.is_some_and(|now| t <= now) {
                        errors.push(err(
                            "deleteAfterDate",
                            format!("\"{text}\" is already past; give a future instant"),
                        ));
                    }
                    Some(t)
                }
            },
        };
        if let Some(c) = &self.comment {
            if c.len() > MAX_COMMENT {
                errors.push(err(
                    "comment",
                    format!("is {} bytes long; keep it under {MAX_COMMENT}", c.len()),
                ));
            }
        }
        match target {
            Some(target) if errors.is_empty() => Ok(ValidEntry {
                key: match &target {
                    RuleTarget::Cidr(n) => EntryKey::Cidr(*n),
                    RuleTarget::Group(g) => EntryKey::Group(g.clone()),
                },
                rule: Rule {
                    target,
                    description: self.comment.clone().unwrap_or_default(),
                    expires,
                },
            }),
            _ => Err(errors),
        }
    }

    /// The wire form of a config rule (`cidrBlock` always with its prefix).
    pub fn from_rule(rule: &Rule) -> Entry {
        let mut e = Entry {
            comment: (!rule.description.is_empty()).then(|| rule.description.clone()),
            delete_after_date: rule.expires.map(format_instant),
            ..Entry::default()
        };
        match &rule.target {
            RuleTarget::Cidr(n) => e.cidr_block = Some(n.to_string()),
            RuleTarget::Group(g) => {
                e.aws_security_group = Some(g.id.clone());
                e.aws_account_id = Some(g.account.clone());
            }
        }
        e
    }
}

/// Longest `comment` accepted.
pub const MAX_COMMENT: usize = 1024;

/// Parses an entry's name as it appears in a path (already percent-decoded):
/// a CIDR, a bare address, or an `sg-` id (matched by id in any account).
pub fn parse_key(text: &str) -> Result<KeyRef, String> {
    if text.starts_with("sg-") {
        check_group_id(text)?;
        return Ok(KeyRef::Group {
            id: text.to_string(),
            account: None,
        });
    }
    parse_cidr(text).map(KeyRef::Cidr)
}

/// An entry named in a path: a security group is named by its id, in any
/// account unless `moat access-list remove --aws-account` names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    Cidr(IpNet),
    Group { id: String, account: Option<String> },
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRef::Cidr(n) => write!(f, "{n}"),
            KeyRef::Group { id, account: None } => f.write_str(id),
            KeyRef::Group {
                id,
                account: Some(a),
            } => write!(f, "{id} (account {a})"),
        }
    }
}

impl KeyRef {
    pub fn matches(&self, key: &EntryKey) -> bool {
        match (self, key) {
            (KeyRef::Cidr(a), EntryKey::Cidr(b)) => a == b,
            (KeyRef::Group { id, account }, EntryKey::Group(b)) => {
                *id == b.id && account.as_ref().is_none_or(|a| *a == b.account)
            }
            _ => false,
        }
    }

    /// The same key narrowed to one AWS account (`--aws-account`), which only
    /// a security group has.
    pub fn in_account(self, account: Option<String>) -> Result<KeyRef, String> {
        let Some(a) = account else {
            return Ok(self);
        };
        check_account(&a)?;
        match self {
            KeyRef::Group { id, .. } => Ok(KeyRef::Group {
                id,
                account: Some(a),
            }),
            KeyRef::Cidr(n) => Err(format!(
                "--aws-account names the account of a security group; {n} is a CIDR (leave --aws-account out)"
            )),
        }
    }
}

/// An RFC 3339 instant.
pub fn parse_instant(text: &str) -> Result<SystemTime, String> {
    crate::config::values::parse_expires(&toml::Value::String(text.to_string())).map_err(|_| {
        format!("\"{text}\" is not an RFC 3339 timestamp; write it like \"2026-12-31T00:00:00Z\"")
    })
}

/// RFC 3339 in UTC, whole seconds (`2026-12-31T00:00:00Z`).
pub fn format_instant(t: SystemTime) -> String {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The fields an entry may have, for errors that name them.
pub const FIELDS: [&str; 5] = [
    "cidrBlock",
    "awsSecurityGroup",
    "awsAccountId",
    "comment",
    "deleteAfterDate",
];

/// Why a body of entries was refused: one sentence, and one line per field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError {
    pub error: String,
    pub detail: Vec<String>,
}

fn body_error(error: &str, detail: impl Into<String>) -> BodyError {
    BodyError {
        error: error.into(),
        detail: vec![detail.into()],
    }
}

/// Checks one entry's JSON object field by field, so that every error names its field.
fn entry_from_json(v: serde_json::Value, at: &str, errors: &mut Vec<String>) -> Option<Entry> {
    let serde_json::Value::Object(obj) = v else {
        errors.push(format!(
            "body{at}: an entry must be an object like {{\"cidrBlock\": \"10.0.0.0/16\", \"comment\": \"app servers\"}}"
        ));
        return None;
    };
    let mut ok = true;
    for (k, v) in &obj {
        if !FIELDS.contains(&k.as_str()) {
            errors.push(format!("{k}: unknown field{at}; use {}", FIELDS.join(", ")));
            ok = false;
        } else if !v.is_string() {
            errors.push(format!("{k}: must be a string{at}"));
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    match serde_json::from_value::<Entry>(serde_json::Value::Object(obj)) {
        Ok(e) => Some(e),
        Err(e) => {
            errors.push(format!("body{at}: {e}"));
            None
        }
    }
}

/// Parses and validates a JSON array of entries (the body of an API write);
/// `now`: a `deleteAfterDate` at or before it is refused. Every problem is
/// reported, each naming its field (and the entry, when there are several).
/// Two entries with the same key (CIDR or group): the last one wins.
pub fn parse_entries(body: &[u8], now: SystemTime) -> Result<Vec<(Entry, ValidEntry)>, BodyError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| body_error("the body is not JSON", format!("body: {e}")))?;
    let serde_json::Value::Array(items) = value else {
        return Err(body_error(
            "the body must be a JSON array of entries",
            "body: send an array, like [{\"cidrBlock\": \"10.0.0.0/16\", \"comment\": \"app servers\"}]",
        ));
    };
    if items.is_empty() {
        return Err(body_error(
            "the array holds no entry",
            "body: give at least one entry",
        ));
    }
    let n = items.len();
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let at = if n > 1 {
            format!(" (entry {})", i + 1)
        } else {
            String::new()
        };
        let Some(entry) = entry_from_json(item, &at, &mut errors) else {
            continue;
        };
        match entry.validate(Some(now)) {
            Ok(v) => {
                // Two entries for one CIDR or group: the last one wins.
                out.retain(|(_, o): &(Entry, ValidEntry)| o.key != v.key);
                out.push((entry, v));
            }
            Err(fields) => errors.extend(fields.iter().map(|f| format!("{f}{at}"))),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(BodyError {
            error: "the entries are invalid; nothing was written".into(),
            detail: errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(json: &str) -> Result<Entry, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn a_cidr_entry_becomes_a_rule() {
        let e = entry(r#"{"cidrBlock":"10.0.0.0/16","comment":"app servers"}"#).unwrap();
        let v = e.validate(Some(SystemTime::now())).unwrap();
        assert_eq!(v.key, EntryKey::Cidr("10.0.0.0/16".parse().unwrap()));
        assert_eq!(v.rule.description, "app servers");
        assert_eq!(Entry::from_rule(&v.rule), e);
    }

    #[test]
    fn a_bare_address_is_written_with_its_prefix() {
        let v = entry(r#"{"cidrBlock":"203.0.113.7"}"#)
            .unwrap()
            .validate(None)
            .unwrap();
        let out = Entry::from_rule(&v.rule);
        assert_eq!(out.cidr_block.as_deref(), Some("203.0.113.7/32"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = entry(r#"{"cidrBlock":"10.0.0.1/16"}"#).unwrap();
        let errs = e.validate(None).unwrap_err();
        assert_eq!(errs[0].field, "cidrBlock");
        assert!(errs[0].message.contains("host bits"));
        let e = entry(r#"{"awsSecurityGroup":"sg-0a1b2c3d"}"#).unwrap();
        assert_eq!(e.validate(None).unwrap_err()[0].field, "awsAccountId");
        let e = entry(r#"{"cidrBlock":"10.0.0.0/8","deleteAfterDate":"2000-01-01T00:00:00Z"}"#)
            .unwrap();
        assert!(e.validate(None).is_ok());
        let errs = e.validate(Some(SystemTime::now())).unwrap_err();
        assert_eq!(errs[0].field, "deleteAfterDate");
        assert!(entry(r#"{"cidrBlock":"10.0.0.0/8","bogus":1}"#).is_err());
    }

    #[test]
    fn instants_round_trip() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_798_761_600);
        assert_eq!(format_instant(t), "2027-01-01T00:00:00Z");
        assert_eq!(parse_instant("2027-01-01T00:00:00Z").unwrap(), t);
    }

    #[test]
    fn bodies_name_every_bad_field() {
        let now = SystemTime::now();
        let ok = parse_entries(br#"[{"cidrBlock":"10.0.0.0/8"},{"awsSecurityGroup":"sg-0a1b2c3d","awsAccountId":"123456789012"}]"#, now).unwrap();
        assert_eq!(ok.len(), 2);
        let e = parse_entries(
            br#"[{"cidrBlock":1,"x":"y"},{"cidrBlock":"10.0.0.1/8"}]"#,
            now,
        )
        .unwrap_err();
        assert_eq!(e.detail.len(), 3, "{e:?}");
        assert!(
            e.detail[0].starts_with("cidrBlock: must be a string (entry 1)"),
            "{e:?}"
        );
        assert!(
            e.detail[1].starts_with("x: unknown field (entry 1)"),
            "{e:?}"
        );
        assert!(e.detail[2].starts_with("cidrBlock: ") && e.detail[2].contains("(entry 2)"));
        for bad in [&b"{}"[..], b"[]", b"[1]", b"nope", b"[{}]"] {
            assert!(parse_entries(bad, now).is_err());
        }
    }

    #[test]
    fn the_last_of_two_entries_with_one_key_wins() {
        let now = SystemTime::now();
        let ok = parse_entries(
            br#"[{"cidrBlock":"10.0.0.0/8","comment":"a"},{"cidrBlock":"10.1.0.0/16"},{"cidrBlock":"10.0.0.0/8","comment":"b"}]"#,
            now,
        )
        .unwrap();
        assert_eq!(ok.len(), 2, "{ok:?}");
        let tens: Vec<_> = ok
            .iter()
            .filter(|(e, _)| e.cidr_block.as_deref() == Some("10.0.0.0/8"))
            .collect();
        assert_eq!(tens.len(), 1);
        assert_eq!(tens[0].0.comment.as_deref(), Some("b"));
    }

    #[test]
    fn keys_from_paths() {
        let k = parse_key("10.0.0.0/16").unwrap();
        assert!(k.matches(&EntryKey::Cidr("10.0.0.0/16".parse().unwrap())));
        assert!(parse_key("sg-0a1b2c3d").is_ok());
        assert!(parse_key("10.0.0.1/16").is_err());
    }

    #[test]
    fn a_group_key_narrowed_to_one_account() {
        let group = |account: &str| {
            EntryKey::Group(GroupKey {
                account: account.to_string(),
                id: "sg-0a1b2c3d".to_string(),
            })
        };
        let any = parse_key("sg-0a1b2c3d").unwrap();
        assert!(any.matches(&group("111111111111")) && any.matches(&group("222222222222")));
        let one = any.in_account(Some("111111111111".into())).unwrap();
        assert!(one.matches(&group("111111111111")));
        assert!(!one.matches(&group("222222222222")));
        assert_eq!(one.to_string(), "sg-0a1b2c3d (account 111111111111)");
        let cidr = parse_key("10.0.0.0/16").unwrap();
        assert!(cidr.in_account(Some("111111111111".into())).is_err());
        let bad = parse_key("sg-0a1b2c3d")
            .unwrap()
            .in_account(Some("12".into()));
        assert!(bad.unwrap_err().contains("12 digits"));
    }
}
