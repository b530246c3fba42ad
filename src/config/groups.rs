//! The security-group parts of the config: the membership file (its own
//! TOML file, with its own places in error messages) and the `aws` table.

use super::diag::Source;
use super::raw::*;
use super::validate::{parse, Validator};
use super::values::*;
use super::*;
use std::path::Path;
use toml::Spanned;

impl Validator<'_> {
    pub(super) fn security_groups(&mut self, raw: Option<&RawSecurityGroups>) -> SecurityGroups {
        let mut sg = SecurityGroups::default();
        let Some(raw) = raw else { return sg };
        if let Some(f) = &raw.file {
            if let Some((path, bytes)) = self.read_named(f, "security-group membership file") {
                sg.members = self.membership(&path, bytes);
                sg.file = Some(path);
            }
        }
        if let Some(aws) = &raw.aws {
            sg.aws = self.aws(aws);
        }
        sg
    }

    fn membership(&mut self, path: &Path, bytes: Vec<u8>) -> BTreeMap<GroupKey, Vec<IpNet>> {
        let src = Source {
            path: path.to_path_buf(),
            text: String::from_utf8_lossy(&bytes).into_owned(),
        };
        let mut out = BTreeMap::new();
        let Some(raw) = parse::<RawMembership>(self.report, &src, &super::schema::MEMBERSHIP)
        else {
            return out;
        };
        for g in &raw.group {
            let g = g.get_ref();
            let mut ok = true;
            if let Err(m) = check_account(g.aws_account.get_ref()) {
                self.report.error(&src, g.aws_account.span(), m);
                ok = false;
            }
            if let Err(m) = check_group_id(g.id.get_ref()) {
                self.report.error(&src, g.id.span(), m);
                ok = false;
            }
            let mut members = Vec::new();
            for m in &g.members {
                match parse_cidr(m.get_ref()) {
                    Ok(net) => {
                        if is_whole_internet(&net) {
                            self.report.warn(&src, m.span(), format!("group {} of account {}: member {} is open to the whole internet: every rule that names this group admits every address; list the group's own addresses instead", g.id.get_ref(), g.aws_account.get_ref(), written(m.get_ref(), &net)));
                        }
                        members.push(net)
                    }
                    Err(msg) => self.report.error(
                        &src,
                        m.span(),
                        format!("group {}: {msg}", g.id.get_ref()),
                    ),
                }
            }
            let key = GroupKey {
                account: g.aws_account.get_ref().clone(),
                id: g.id.get_ref().clone(),
            };
            if ok && out.insert(key, members).is_some() {
                self.report.error(&src, g.id.span(), format!("group {} of account {} is listed twice; merge its members into one [[group]]", g.id.get_ref(), g.aws_account.get_ref()));
            }
        }
        out
    }

    fn aws(&mut self, raw: &Spanned<RawAws>) -> Option<AwsResolver> {
        let a = raw.get_ref();
        let mut ok = true;
        let region = a.region.get_ref().trim().to_string();
        if region.is_empty()
            || !region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            self.err(
                &a.region,
                format!(
                    "region = \"{}\" is not an AWS region; write it like \"us-east-1\"",
                    a.region.get_ref()
                ),
            );
            ok = false;
        }
        let refresh = match &a.refresh {
            Some(r) => match self.nonzero("refresh", r) {
                Some(d) if d < Duration::from_secs(5) => {
                    self.err(r, "refresh must be at least 5s so the EC2 API is not throttled; write it like \"60s\"");
                    ok = false;
                    d
                }
                Some(d) => d,
                None => {
                    ok = false;
                    Duration::ZERO
                }
            },
            None => Duration::from_secs(60),
        };
        if let Some(e) = &a.endpoint {
            if !(e.get_ref().starts_with("http://") || e.get_ref().starts_with("https://")) {
                self.err(e, format!("endpoint = \"{}\" is not a URL; write it like \"https://ec2.us-east-1.amazonaws.com\"", e.get_ref()));
                ok = false;
            }
        }
        let mut accounts = BTreeMap::new();
        for (acct, role) in &a.accounts {
            if let Err(m) = check_account(acct.get_ref()) {
                self.err(acct, m);
                ok = false;
            }
            if !role.role_arn.get_ref().starts_with("arn:") {
                self.err(&role.role_arn, format!("role_arn = \"{}\" is not an IAM role ARN; write it like \"arn:aws:iam::123456789012:role/moat-reader\"", role.role_arn.get_ref()));
                ok = false;
            }
            accounts.insert(acct.get_ref().clone(), role.role_arn.get_ref().clone());
        }
        ok.then(|| AwsResolver {
            region,
            refresh,
            endpoint: a.endpoint.as_ref().map(|e| e.get_ref().clone()),
            accounts,
        })
    }
}

#[cfg(test)]
mod tests {
    /// Membership entries and PROXY-trusted ranges that cover every
    /// address warn like an allow rule does, at their place.
    #[test]
    fn whole_internet_members_and_trusted_ranges_warn() {
        let dir = tempfile::tempdir().unwrap();
        let config = "[security_groups]\nfile = \"sg.toml\"\n\n[[deployment]]\nname = \"orders\"\nlisten = \"127.0.0.1:7000\"\nupstream = \"127.0.0.1:27018\"\nproxy_protocol = { trusted = [\"10.0.0.0/8\", \"::/0\"] }\n\n[[deployment.allow]]\naws_account = \"123456789012\"\nsecurity_group = \"sg-0a1b2c3d\"\n";
        let sg = "[[group]]\naws_account = \"123456789012\"\nid = \"sg-0a1b2c3d\"\nmembers = [\"10.0.0.0/8\",\n  \"::ffff:0.0.0.0/96\", \"0.0.0.0/0\"]\n";
        std::fs::write(dir.path().join("moat.toml"), config).unwrap();
        std::fs::write(dir.path().join("sg.toml"), sg).unwrap();
        let c = crate::config::load(&dir.path().join("moat.toml"), std::time::SystemTime::now())
            .unwrap();
        let w: Vec<String> = c.warnings.iter().map(|d| d.to_string()).collect();
        let at = |needle: &str| {
            w.iter()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no warning at {needle}: {w:?}"))
                .clone()
        };
        let mapped = at("sg.toml:5:3");
        assert!(
            mapped.contains("whole internet")
                && mapped.contains("\"::ffff:0.0.0.0/96\" (0.0.0.0/0)"),
            "{mapped}"
        );
        assert!(at("sg.toml:5:24").contains("whole internet"));
        let trusted = at("moat.toml:8:45");
        assert!(
            trusted.contains("proxy_protocol") && trusted.contains("whole internet"),
            "{trusted}"
        );
        assert_eq!(
            w.iter().filter(|l| l.contains("whole internet")).count(),
            3,
            "{w:?}"
        );
    }
}
