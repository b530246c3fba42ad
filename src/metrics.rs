//! Every metric of SPEC §4, in one place, with the per-deployment handles
//! the data path uses (resolved once per deployment, not per connection).
//! No label ever carries a client address.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::LazyLock;

/// How a connection ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    Limited,
    TlsError,
    UpstreamError,
    ProxyProtocolError,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Allowed,
        Outcome::Denied,
        Outcome::Limited,
        Outcome::TlsError,
        Outcome::UpstreamError,
        Outcome::ProxyProtocolError,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Limited => "limited",
            Outcome::TlsError => "tls_error",
            Outcome::UpstreamError => "upstream_error",
            Outcome::ProxyProtocolError => "proxy_protocol_error",
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    /// Every family registered, so that one with no series yet (no API
    /// request, no security group) is still announced by HELP and TYPE.
    families: Vec<Family>,
    connections: IntCounterVec,
    active: IntGaugeVec,
    bytes: IntCounterVec,
    tls_handshake: HistogramVec,
    upstream_connect: HistogramVec,
    revoked: IntCounterVec,
    pub cert_expiry: GaugeVec,
    pub rules: IntGaugeVec,
    pub reloads: IntCounterVec,
    pub group_members: IntGaugeVec,
    pub group_refreshes: IntCounterVec,
    pub last_reload_successful: IntGauge,
    pub last_reload_success_timestamp: Gauge,
    pub store: StoreMetrics,
    /// Access-list API requests by route template, method and status code.
    pub api_requests: IntCounterVec,
}

/// The fleet store's gauges (SPEC 7).
pub struct StoreMetrics {
    pub connected: IntGauge,
    pub revision: IntGauge,
    pub entries: IntGaugeVec,
    pub invalid: IntGaugeVec,
}

/// A metric family's name, help and type, as announced in the exposition.
struct Family {
    name: String,
    help: String,
    kind: &'static str,
}

/// The registry being built, and what it holds.
struct Builder {
    registry: Registry,
    families: std::cell::RefCell<Vec<Family>>,
}

impl Builder {
    fn register<T: prometheus::core::Collector + Clone + 'static>(
        &self,
        kind: &'static str,
        c: T,
    ) -> T {
        for d in c.desc() {
            self.families.borrow_mut().push(Family {
                name: d.fq_name.clone(),
                help: d.help.clone(),
                kind,
            });
        }
        self.registry
            .register(Box::new(c.clone()))
            .expect("metric names are unique");
        c
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Builder {
        registry: Registry::new(),
        families: Default::default(),
    };
    let counter = |name: &str, help: &str, labels: &[&str]| {
        r.register(
            "counter",
            IntCounterVec::new(Opts::new(name, help), labels).unwrap(),
        )
    };
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        r.register(
            "gauge",
            IntGaugeVec::new(Opts::new(name, help), labels).unwrap(),
        )
    };
    let hist = |name: &str, help: &str| {
        r.register(
            "histogram",
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                &["deployment"],
            )
            .unwrap(),
        )
    };
    Metrics {
        connections: counter(
            "moat_connections_total",
            "Connections by deployment and how they ended.",
            &["deployment", "outcome"],
        ),
        active: gauge(
            "moat_connections_active",
            "Connections being proxied now.",
            &["deployment"],
        ),
        bytes: counter(
            "moat_bytes_total",
            "Bytes proxied.",
            &["deployment", "direction"],
        ),
        tls_handshake: hist("moat_tls_handshake_seconds", "TLS handshake duration."),
        upstream_connect: hist(
            "moat_upstream_connect_seconds",
            "Time to connect to the upstream.",
        ),
        revoked: counter(
            "moat_revoked_connections_total",
            "Live connections closed because the rules no longer admit them.",
            &["deployment"],
        ),
        cert_expiry: r.register(
            "gauge",
            GaugeVec::new(
                Opts::new(
                    "moat_tls_certificate_expiry_timestamp_seconds",
                    "notAfter of the served certificate.",
                ),
                &["deployment"],
            )
            .unwrap(),
        ),
        rules: gauge(
            "moat_rules",
            "Effective prefixes, after copies and security groups.",
            &["deployment"],
        ),
        reloads: counter(
            "moat_config_reloads_total",
            "Config reloads by result.",
            &["result"],
        ),
        group_members: gauge(
            "moat_security_group_members",
            "Members of a security group (file and API).",
            &["aws_account", "security_group"],
        ),
        group_refreshes: counter(
            "moat_security_group_refreshes_total",
            "EC2 security-group refreshes by result.",
            &["result"],
        ),
        last_reload_successful: r.register(
            "gauge",
            IntGauge::new(
                "moat_config_last_reload_successful",
                "1 if the last reload succeeded.",
            )
            .unwrap(),
        ),
        last_reload_success_timestamp: r.register(
            "gauge",
            Gauge::new(
                "moat_config_last_reload_success_timestamp_seconds",
                "When the config was last loaded successfully.",
            )
            .unwrap(),
        ),
        store: StoreMetrics {
            connected: r.register(
                "gauge",
                IntGauge::new(
                    "moat_store_connected",
                    "1 while the fleet store's watch is live.",
                )
                .unwrap(),
            ),
            revision: r.register(
                "gauge",
                IntGauge::new(
                    "moat_store_revision",
                    "The etcd revision of the last read or watch event applied.",
                )
                .unwrap(),
            ),
            entries: gauge(
                "moat_store_entries",
                "Valid access-list entries in the fleet store now.",
                &["deployment"],
            ),
            invalid: gauge(
                "moat_store_invalid_entries",
                "Fleet-store keys whose value is not a valid entry.",
                &["deployment"],
            ),
        },
        api_requests: counter(
            "moat_api_requests_total",
            "Access-list API requests by route template, method and status code.",
            &["route", "method", "code"],
        ),
        registry: r.registry,
        families: r.families.into_inner(),
    }
});

pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Creates the label sets that must be visible (at 0) before anything happens.
pub fn init() {
    let m = metrics();
    for result in ["success", "failure"] {
        m.reloads.with_label_values(&[result]);
        m.group_refreshes.with_label_values(&[result]);
    }
}

/// The Prometheus text exposition of every metric.
pub fn render() -> Vec<u8> {
    let m = metrics();
    let mut out = Vec::with_capacity(16 * 1024);
    let gathered = m.registry.gather();
    let _ = TextEncoder::new().encode(&gathered, &mut out);
    // A family with no series yet is left out by the encoder: announce it,
    // so that every metric of SPEC section 4 is in every scrape.
    for f in &m.families {
        if !gathered.iter().any(|g| g.name() == f.name) {
            let text = format!(
                "# HELP {} {}\n# TYPE {} {}\n",
                f.name, f.help, f.name, f.kind
            );
            out.extend_from_slice(text.as_bytes());
        }
    }
    out
}

/// Handles for one deployment, resolved once.
pub struct DeploymentMetrics {
    outcomes: [IntCounter; 6],
    pub active: IntGauge,
    pub to_upstream: IntCounter,
    pub to_client: IntCounter,
    pub tls_handshake: Histogram,
    pub upstream_connect: Histogram,
    pub revoked: IntCounter,
}

impl DeploymentMetrics {
    pub fn new(deployment: &str) -> Self {
        let m = metrics();
        DeploymentMetrics {
            outcomes: Outcome::ALL
                .map(|o| m.connections.with_label_values(&[deployment, o.label()])),
            active: m.active.with_label_values(&[deployment]),
            to_upstream: m.bytes.with_label_values(&[deployment, "to_upstream"]),
            to_client: m.bytes.with_label_values(&[deployment, "to_client"]),
            tls_handshake: m.tls_handshake.with_label_values(&[deployment]),
            upstream_connect: m.upstream_connect.with_label_values(&[deployment]),
            revoked: m.revoked.with_label_values(&[deployment]),
        }
    }

    #[inline]
    pub fn count(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].inc();
    }

    /// Drops the series of a deployment that a reload removed.
    pub fn remove(deployment: &str) {
        let m = metrics();
        for o in Outcome::ALL {
            let _ = m.connections.remove_label_values(&[deployment, o.label()]);
        }
        let _ = m.active.remove_label_values(&[deployment]);
        let _ = m.bytes.remove_label_values(&[deployment, "to_upstream"]);
        let _ = m.bytes.remove_label_values(&[deployment, "to_client"]);
        let _ = m.tls_handshake.remove_label_values(&[deployment]);
        let _ = m.upstream_connect.remove_label_values(&[deployment]);
        let _ = m.revoked.remove_label_values(&[deployment]);
        let _ = m.cert_expiry.remove_label_values(&[deployment]);
        let _ = m.rules.remove_label_values(&[deployment]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_announced_with_or_without_series() {
        let text = String::from_utf8(render()).unwrap();
        let families = &metrics().families;
        assert!(families.len() >= 17, "{} families", families.len());
        for f in families {
            let line = format!("# TYPE {} {}\n", f.name, f.kind);
            assert_eq!(text.matches(&line).count(), 1, "{line:?} in\n{text}");
        }
        // No series without a deployment or a request to label it.
        assert!(text.contains("# TYPE moat_security_group_members gauge\n"));
    }
}
