//! EC2 security-group membership (feature `aws`): `DescribeNetworkInterfaces`
//! filtered by `group-id`, every page, every private IPv4 (primary and
//! secondary) and IPv6 address of every interface. Credentials come from the
//! standard AWS chain; groups of accounts listed in `accounts` are read with
//! the role given there, assumed through STS.

use crate::config::{AwsResolver, GroupKey};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::error::DisplayErrorContext;
use aws_sdk_ec2::types::Filter;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;

/// Interfaces asked for per page (the API's maximum).
const PAGE_SIZE: i32 = 1000;

/// EC2 clients: one with the default credentials, one per assumed role.
pub struct Ec2 {
    default: aws_sdk_ec2::Client,
    by_account: HashMap<String, aws_sdk_ec2::Client>,
}

impl Ec2 {
    pub async fn new(settings: &AwsResolver) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let base = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .http_client(http)
            .load()
            .await;
        let client = |sdk: &SdkConfig| {
            let mut b = aws_sdk_ec2::config::Builder::from(sdk);
            if let Some(endpoint) = &settings.endpoint {
                b = b.endpoint_url(endpoint);
            }
            aws_sdk_ec2::Client::from_conf(b.build())
        };
        let mut by_account = HashMap::new();
        for (account, role) in &settings.accounts {
            let provider = aws_config::sts::AssumeRoleProvider::builder(role)
                .session_name("moat")
                .configure(&base)
                .build()
                .await;
            let sdk = base
                .to_builder()
                .credentials_provider(
                    aws_credential_types::provider::SharedCredentialsProvider::new(provider),
                )
                .build();
            by_account.insert(account.clone(), client(&sdk));
        }
        Ec2 {
            default: client(&base),
            by_account,
        }
    }

    /// The addresses of every interface in the group. Any failed page fails
    /// the whole group: a partial answer must not shrink it.
    pub async fn members(&self, group: &GroupKey) -> Result<Vec<IpNet>, String> {
        let client = self.by_account.get(&group.account).unwrap_or(&self.default);
        let filter = Filter::builder().name("group-id").values(&group.id).build();
        let mut pages = client
            .describe_network_interfaces()
            .filters(filter)
            .max_results(PAGE_SIZE)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        let mut push = |ip: Option<&str>| {
            if let Some(ip) = ip.and_then(|s| s.parse::<IpAddr>().ok()) {
                out.push(IpNet::from(crate::addr::canonical(ip)));
            }
        };
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| DisplayErrorContext(&e).to_string())?;
            for ni in page.network_interfaces() {
                push(ni.private_ip_address());
                for a in ni.private_ip_addresses() {
                    push(a.private_ip_address());
                }
                for a in ni.ipv6_addresses() {
                    push(a.ipv6_address());
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}
