//! Which listen addresses of one file `moat run` can bind side by side.
//! With the socket options of `listener::bind` (SO_REUSEADDR, and
//! IPV6_V6ONLY only for a `[::]:P` listed beside `0.0.0.0:P`, SPEC 3.1),
//! Linux refuses a second listening socket on a port when the addresses
//! overlap: a wildcard takes every address of the family it covers, a
//! dual-stack `[::]` covers IPv4 as well, and `[::ffff:a.b.c.d]` is
//! `a.b.c.d`. (Checked against the kernel: see the test at the bottom.)

use super::raw::RawDeployment;
use super::validate::Validator;
use super::{Deployment, ListenerSpec};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use toml::Spanned;

/// The addresses of one family that a socket takes on its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cover<T> {
    Nothing,
    Every,
    One(T),
}

impl<T: PartialEq> Cover<T> {
    fn overlaps(&self, other: &Cover<T>) -> bool {
        match (self, other) {
            (Cover::Nothing, _) | (_, Cover::Nothing) => false,
            (Cover::Every, _) | (_, Cover::Every) => true,
            (Cover::One(a), Cover::One(b)) => a == b,
        }
    }
}

fn cover(addr: IpAddr, v6_only: bool) -> (Cover<Ipv4Addr>, Cover<Ipv6Addr>) {
    let v4 = |a: Ipv4Addr| {
        if a.is_unspecified() {
            Cover::Every
        } else {
            Cover::One(a)
        }
    };
    match addr {
        IpAddr::V4(a) => (v4(a), Cover::Nothing),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(m) => (v4(m), Cover::Nothing),
            None if a.is_unspecified() && v6_only => (Cover::Nothing, Cover::Every),
            None if a.is_unspecified() => (Cover::Every, Cover::Every),
            None => (Cover::Nothing, Cover::One(a)),
        },
    }
}

/// Whether Linux refuses to have both sockets listening at once (each
/// bound as `listener::bind(addr, v6_only)` binds it).
pub fn bind_conflict(a: SocketAddr, a_v6_only: bool, b: SocketAddr, b_v6_only: bool) -> bool {
    if a.port() != b.port() {
        return false;
    }
    let (a4, a6) = cover(a.ip(), a_v6_only);
    let (b4, b6) = cover(b.ip(), b_v6_only);
    a4.overlaps(&b4) || a6.overlaps(&b6)
}

/// How widely one socket listens, widest first: the one that explains
/// an overlap.
fn width(a: SocketAddr, v6_only: bool) -> u8 {
    match a.ip() {
        IpAddr::V6(ip) if ip.is_unspecified() && !v6_only => 0,
        IpAddr::V4(ip) if ip.is_unspecified() => 1,
        IpAddr::V6(ip) if ip.is_unspecified() => 2,
        IpAddr::V6(ip) if ip.to_ipv4_mapped().is_some() => 3,
        _ => 4,
    }
}

/// Why two sockets overlap, in words.
fn reason(a: SocketAddr, a_v6_only: bool, b: SocketAddr, b_v6_only: bool) -> String {
    let (w, v6) = if width(a, a_v6_only) <= width(b, b_v6_only) {
        (a, a_v6_only)
    } else {
        (b, b_v6_only)
    };
    let p = w.port();
    match width(w, v6) {
        0 => format!("{w} is dual-stack: it listens on every IPv6 and every IPv4 address of port {p} (it is IPv6-only only when 0.0.0.0:{p} is listed as well)"),
        1 => format!("{w} already listens on every IPv4 address of port {p}"),
        2 => format!("{w} already listens on every IPv6 address of port {p}"),
        3 => format!("{w} is the IPv4 address {}", w.ip().to_canonical()),
        _ => format!("both are {w}"),
    }
}

/// The message for two listening sockets that cannot coexist.
fn conflict_message(
    what: &str,
    addr: SocketAddr,
    v6: bool,
    other: &str,
    o: SocketAddr,
    ov6: bool,
) -> String {
    let why = reason(addr, v6, o, ov6);
    format!("{what} {addr} cannot be bound beside {o} ({other}): {why}, so Linux refuses the second socket (\"address in use\") and moat run would not start; use another port for one of them, or listen only on the wider address")
}

impl Validator<'_> {
    /// Errors for listen addresses (and the other sockets of the file:
    /// `admin_listen`, `[api] listen`) that cannot all be bound at once.
    /// Each pair is reported once, at the later address.
    pub(super) fn listen_conflicts(
        &mut self,
        raw: &[Spanned<RawDeployment>],
        deps: &[Deployment],
        specs: &[ListenerSpec],
        others: &[(&str, SocketAddr, &Spanned<String>)],
    ) {
        for (j, b) in specs.iter().enumerate() {
            let Some(&bd) = b.deployments.first() else {
                continue;
            };
            for a in &specs[..j] {
                let Some(&ad) = a.deployments.first() else {
                    continue;
                };
                if bind_conflict(a.addr, a.v6_only, b.addr, b.v6_only) {
                    let what = format!("deployment \"{}\": listen address", deps[bd].name);
                    let other = format!("deployment \"{}\"", deps[ad].name);
                    let msg = conflict_message(&what, b.addr, b.v6_only, &other, a.addr, a.v6_only);
                    self.err(&raw[bd].get_ref().listen, msg);
                }
            }
        }
        // Those sockets are bound like a listener, dual-stack.
        for (i, &(what, addr, at)) in others.iter().enumerate() {
            for s in specs {
                let Some(&d) = s.deployments.first() else {
                    continue;
                };
                if bind_conflict(s.addr, s.v6_only, addr, false) {
                    let other = format!("listen address of deployment \"{}\"", deps[d].name);
                    let msg = conflict_message(what, addr, false, &other, s.addr, s.v6_only);
                    self.err(at, msg);
                }
            }
            for &(other, o, _) in &others[..i] {
                if bind_conflict(o, false, addr, false) {
                    let msg = conflict_message(what, addr, false, other, o, false);
                    self.err(at, msg);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The cases of the brief, and what Linux answered for them.
    #[test]
    fn overlaps_as_linux_does() {
        let p = |s: &str| sa(s);
        // refused by Linux
        assert!(bind_conflict(p("[::]:7"), false, p("127.0.0.1:7"), false));
        assert!(bind_conflict(p("127.0.0.1:7"), false, p("[::]:7"), false));
        assert!(bind_conflict(
            p("0.0.0.0:7"),
            false,
            p("127.0.0.1:7"),
            false
        ));
        assert!(bind_conflict(
            p("127.0.0.1:7"),
            false,
            p("0.0.0.0:7"),
            false
        ));
        assert!(bind_conflict(p("[::]:7"), false, p("[::1]:7"), false));
        assert!(bind_conflict(p("[::]:7"), true, p("[::1]:7"), false));
        assert!(bind_conflict(
            p("[::ffff:127.0.0.1]:7"),
            false,
            p("127.0.0.1:7"),
            false
        ));
        assert!(bind_conflict(
            p("[::ffff:0.0.0.0]:7"),
            false,
            p("127.0.0.2:7"),
            false
        ));
        assert!(bind_conflict(p("[::]:7"), false, p("0.0.0.0:7"), false));
        // accepted by Linux
        assert!(!bind_conflict(p("[::]:7"), true, p("0.0.0.0:7"), false));
        assert!(!bind_conflict(p("[::]:7"), true, p("127.0.0.1:7"), false));
        assert!(!bind_conflict(p("[::1]:7"), false, p("127.0.0.1:7"), false));
        assert!(!bind_conflict(
            p("127.0.0.2:7"),
            false,
            p("127.0.0.1:7"),
            false
        ));
        assert!(!bind_conflict(
            p("[::]:7"),
            true,
            p("[::ffff:127.0.0.1]:7"),
            false
        ));
        assert!(!bind_conflict(p("0.0.0.0:7"), false, p("0.0.0.0:8"), false));
        assert!(!bind_conflict(p("[::]:7"), false, p("127.0.0.1:8"), false));
    }

    /// The model agrees with the kernel: every pair is bound for real on
    /// loopback (ports picked by the kernel), both orders.
    #[test]
    fn model_matches_the_kernel() {
        let v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
        let hosts: Vec<(&str, bool)> = [
            ("0.0.0.0", false),
            ("127.0.0.1", false),
            ("127.0.0.2", false),
            ("::", false),
            ("::", true),
            ("::1", false),
            ("::ffff:127.0.0.1", false),
            ("::ffff:0.0.0.0", false),
        ]
        .into_iter()
        .filter(|(h, _)| v6 || !h.contains(':'))
        .collect();
        for &(a, av6) in &hosts {
            for &(b, bv6) in &hosts {
                if (a, av6) == (b, bv6) {
                    continue;
                }
                // A free port: bind the first socket on port 0, reuse its
                // port. Another test's socket may hold that port for the
                // second address: a refusal the model does not predict is
                // retried on fresh ports before it counts.
                let mut outcome = None;
                for _ in 0..10 {
                    let any = SocketAddr::new(a.parse().unwrap(), 0);
                    let Ok(first) = crate::data::listener::bind(any, av6) else {
                        continue;
                    };
                    let port = first.local_addr().unwrap().port();
                    let aa = SocketAddr::new(a.parse().unwrap(), port);
                    let bb = SocketAddr::new(b.parse().unwrap(), port);
                    let refused = crate::data::listener::bind(bb, bv6).is_err();
                    outcome = Some((aa, bb, refused));
                    if refused == bind_conflict(aa, av6, bb, bv6) {
                        break;
                    }
                }
                let Some((aa, bb, refused)) = outcome else {
                    continue;
                };
                assert_eq!(
                    bind_conflict(aa, av6, bb, bv6),
                    refused,
                    "{aa} (v6only {av6}) then {bb} (v6only {bv6})"
                );
            }
        }
    }

    #[test]
    fn messages_say_why_and_what_to_do() {
        let m = conflict_message(
            "listen address",
            sa("127.0.0.1:7"),
            false,
            "listen address",
            sa("[::]:7"),
            false,
        );
        assert!(
            m.contains("dual-stack") && m.contains("0.0.0.0:7") && m.contains("another port"),
            "{m}"
        );
        let m = conflict_message(
            "listen address",
            sa("[::]:7"),
            false,
            "listen address",
            sa("127.0.0.1:7"),
            false,
        );
        assert!(m.contains("[::]:7 is dual-stack"), "{m}");
        let m = conflict_message(
            "listen address",
            sa("127.0.0.1:7"),
            false,
            "listen address",
            sa("0.0.0.0:7"),
            false,
        );
        assert!(m.contains("every IPv4 address"), "{m}");
        let m = conflict_message(
            "listen address",
            sa("[::1]:7"),
            false,
            "listen address",
            sa("[::]:7"),
            true,
        );
        assert!(m.contains("every IPv6 address"), "{m}");
        let m = conflict_message(
            "listen address",
            sa("127.0.0.1:7"),
            false,
            "listen address",
            sa("[::ffff:127.0.0.1]:7"),
            false,
        );
        assert!(m.contains("is the IPv4 address 127.0.0.1"), "{m}");
    }

    /// What `check`, `run` and reloads all see: `config::load`.
    fn load_errors(listens: &[&str], admin: Option<&str>) -> Vec<String> {
        load_errors_with(listens, admin, "")
    }

    fn load_errors_with(listens: &[&str], admin: Option<&str>, head: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keys.toml"), "").unwrap();
        let mut text = String::new();
        if let Some(a) = admin {
            text += &format!("[server]\nadmin_listen = \"{a}\"\n\n");
        }
        text += head;
        for (i, l) in listens.iter().enumerate() {
            text += &format!("[[deployment]]\nname = \"d{i}\"\nlisten = {l}\nupstream = \"127.0.0.1:27018\"\n[[deployment.allow]]\ncidr = \"10.0.0.0/8\"\n\n");
        }
        let path = dir.path().join("moat.toml");
        std::fs::write(&path, &text).unwrap();
        match crate::config::load(&path, std::time::SystemTime::now()) {
            Ok(_) => Vec::new(),
            Err(e) => e.errors.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn conflicts_are_load_errors_with_places() {
        let e = load_errors(&["\"[::]:7000\"", "\"127.0.0.1:7000\""], None);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("moat.toml:10:10"), "{e:?}");
        assert!(
            e[0].contains("deployment \"d1\"") && e[0].contains("dual-stack"),
            "{e:?}"
        );
        // Within one deployment, and the v6-only rule of SPEC 3.1.
        let e = load_errors(&["[\"0.0.0.0:7000\", \"127.0.0.1:7000\"]"], None);
        assert!(e.len() == 1 && e[0].contains("every IPv4 address"), "{e:?}");
        let e = load_errors(&["[\"[::]:7000\", \"[::1]:7000\"]"], None);
        assert!(e.len() == 1 && e[0].contains("dual-stack"), "{e:?}");
        assert!(load_errors(&["[\"[::]:7000\", \"0.0.0.0:7000\"]"], None).is_empty());
        assert!(load_errors(&["[\"[::1]:7000\", \"127.0.0.1:7000\"]"], None).is_empty());
        assert!(load_errors(&["\"127.0.0.1:7000\"", "\"127.0.0.1:7001\""], None).is_empty());
        // [::]:P made IPv6-only by 0.0.0.0:P still takes [::1]:P.
        let e = load_errors(&["[\"[::]:7000\", \"0.0.0.0:7000\", \"[::1]:7000\"]"], None);
        assert!(e.len() == 1 && e[0].contains("every IPv6 address"), "{e:?}");
        // admin_listen is a socket of the same file.
        let e = load_errors(&["\"0.0.0.0:7000\""], Some("127.0.0.1:7000"));
        assert!(
            e.len() == 1 && e[0].contains("admin_listen") && e[0].contains(":2:16"),
            "{e:?}"
        );
        assert!(load_errors(&["\"0.0.0.0:7000\""], Some("127.0.0.1:7001")).is_empty());
    }

    #[test]
    fn api_listen_is_a_socket_of_the_file() {
        let api = "[api]\nlisten = \"127.0.0.1:7000\"\nkeys = \"keys.toml\"\n\n";
        let e = load_errors_with(&["\"0.0.0.0:7000\""], None, api);
        assert!(
            e.len() == 1 && e[0].contains("[api] listen 127.0.0.1:7000") && e[0].contains(":2:10"),
            "{e:?}"
        );
        let e = load_errors_with(&["\"127.0.0.1:7001\""], Some("[::]:7000"), api);
        assert!(
            e.len() == 1
                && e[0].contains("[api] listen")
                && e[0].contains("admin_listen")
                && e[0].contains("dual-stack"),
            "{e:?}"
        );
        assert!(load_errors_with(&["\"127.0.0.1:7001\""], Some("127.0.0.1:7002"), api).is_empty());
    }

    #[test]
    fn port_zero_is_a_load_error() {
        let e = load_errors(&["\"127.0.0.1:0\""], None);
        assert!(
            e.len() == 1 && e[0].contains("port 0") && e[0].contains("127.0.0.1:27017"),
            "{e:?}"
        );
        let e = load_errors(&["[\"127.0.0.1:7000\", \"[::]:0\"]"], None);
        assert!(e.len() == 1 && e[0].contains("[::]:27017"), "{e:?}");
    }
}
