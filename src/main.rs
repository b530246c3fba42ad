//! The `moat` command line: `run`, `check`, `explain`, `access-list`,
//! `connections`, `plan`, `api-key`, `--version`.

use clap::{Parser, Subcommand};
use moat::config::{self, Config, Plan};
use moat::policy::admission::admit;
use moat::policy::snapshot::Snapshot;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

#[derive(Parser)]
#[command(
    name = "moat",
    version,
    about = "Network-edge firewall and TLS-terminating proxy for MongoDB hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file [default: $MOAT_CONFIG, else /etc/moat/moat.toml]
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    fn path(&self) -> PathBuf {
        self.config
            .clone()
            .or_else(|| {
                std::env::var_os("MOAT_CONFIG")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from("/etc/moat/moat.toml"))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run(ConfigArg),
    /// Load and fully validate the config and every file it names.
    Check(ConfigArg),
    /// Say whether a connection from IP would be admitted, and by which rule.
    Explain {
        #[command(flatten)]
        config: ConfigArg,
        /// The deployment to test against.
        #[arg(long, value_name = "NAME")]
        deployment: String,
        /// The client address.
        ip: String,
    },
    /// List or edit a deployment's access list where it is stored (works with no daemon running).
    AccessList {
        #[command(subcommand)]
        action: AccessAction,
    },
    /// List the running daemon's live connections (through its API).
    Connections {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this deployment's connections.
        #[arg(long, value_name = "NAME")]
        deployment: Option<String>,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running daemon what a new config file would change; applies nothing.
    Plan {
        /// The candidate config file.
        #[arg(short = 'c', long = "config", value_name = "NEW_FILE")]
        config: PathBuf,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Manage API keys.
    ApiKey {
        #[command(subcommand)]
        action: KeyAction,
    },
}

#[derive(clap::Args)]
struct Target {
    #[command(flatten)]
    config: ConfigArg,
    /// The deployment whose access list this is.
    #[arg(long, value_name = "NAME")]
    deployment: String,
}

#[derive(Subcommand)]
enum AccessAction {
    /// Print the deployment's own entries.
    List {
        #[command(flatten)]
        target: Target,
        /// Print JSON, as the API's GET answers.
        #[arg(long)]
        json: bool,
    },
    /// Add an entry (or replace the one with the same CIDR or group).
    Add {
        #[command(flatten)]
        target: Target,
        /// A CIDR, a bare address, or an sg-… id (with --aws-account).
        entry: String,
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
        /// RFC 3339 instant at which the entry stops matching.
        #[arg(long, value_name = "RFC3339")]
        delete_after: Option<String>,
        /// The account of a security group (12 digits).
        #[arg(long, value_name = "ID")]
        aws_account: Option<String>,
    },
    /// Remove the entry with this CIDR or security-group id.
    Remove {
        #[command(flatten)]
        target: Target,
        /// A CIDR, a bare address, or an sg-… id (in any account, or the one
        /// --aws-account names).
        entry: String,
        /// Remove the group's entry in this account only (12 digits).
        #[arg(long, value_name = "ID")]
        aws_account: Option<String>,
    },
    /// Copy another deployment's own entries (those missing here).
    Copy {
        #[command(flatten)]
        target: Target,
        #[arg(long, value_name = "OTHER")]
        from: String,
    },
}

#[derive(Subcommand)]
enum KeyAction {
    /// Print a new random key once, and the [[key]] block for the keys file.
    New {
        /// Shown in audit logs.
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["read", "write"])]
        role: String,
        /// A deployment the key may see (repeat for more); default all.
        #[arg(long, value_name = "NAME")]
        deployment: Vec<String>,
    },
}

/// The config of the running daemon: `$MOAT_CONFIG`, else the one given.
fn running_config(given: &std::path::Path) -> PathBuf {
    std::env::var_os("MOAT_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| given.to_path_buf())
}

fn access_list(action: AccessAction) -> i32 {
    use moat::control::cli;
    match action {
        AccessAction::List { target, json } => {
            cli::list(&target.config.path(), &target.deployment, json)
        }
        AccessAction::Add {
            target,
            entry,
            comment,
            delete_after,
            aws_account,
        } => cli::add(
            &target.config.path(),
            &target.deployment,
            cli::NewEntry {
                entry,
                comment,
                delete_after,
                aws_account,
            },
        ),
        AccessAction::Remove {
            target,
            entry,
            aws_account,
        } => cli::remove(
            &target.config.path(),
            &target.deployment,
            &entry,
            aws_account,
        ),
        AccessAction::Copy { target, from } => {
            cli::copy(&target.config.path(), &target.deployment, &from)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(c) => moat::daemon::run(&c.path()),
        Command::Check(c) => check(&c.path()),
        Command::Explain {
            config,
            deployment,
            ip,
        } => explain(&config.path(), &deployment, &ip),
        Command::AccessList { action } => access_list(action),
        Command::Connections {
            config,
            deployment,
            json,
        } => moat::control::cli::connections(
            &running_config(&config.path()),
            deployment.as_deref(),
            json,
        ),
        Command::Plan { config, json } => {
            moat::control::cli::plan(&running_config(&config), &config, json)
        }
        Command::ApiKey {
            action:
                KeyAction::New {
                    name,
                    role,
                    deployment,
                },
        } => moat::control::cli::new_key(&name, &role, &deployment),
    };
    ExitCode::from(code as u8)
}

fn check(path: &std::path::Path) -> i32 {
    match config::load(path, SystemTime::now()) {
        Ok(c) => {
            print!("{}", summary(&c));
            0
        }
        Err(e) => {
            moat::daemon::print_diagnostics(&e.errors);
            moat::daemon::print_diagnostics(&e.warnings);
            eprintln!(
                "{}: invalid: {} error(s), {} warning(s)",
                path.display(),
                e.errors.len(),
                e.warnings.len()
            );
            1
        }
    }
}

fn summary(c: &Config) -> String {
    use std::fmt::Write;
    let snap = Snapshot::compile(
        Arc::new(clone_for_summary(c)),
        Arc::default(),
        Arc::default(),
        SystemTime::now(),
    );
    let mut out = String::new();
    let _ = writeln!(out, "{}: OK", c.path.display());
    let _ = writeln!(out, "deployments: {}", c.deployments.len());
    for (d, comp) in c.deployments.iter().zip(&snap.compiled) {
        let plan = match d.plan {
            Plan::Dedicated => "dedicated",
            Plan::Shared => "shared",
        };
        let tls = match &d.tls {
            None => "plaintext".to_string(),
            Some(t) => format!("tls {:?}", t.mode).to_lowercase(),
        };
        let listen: Vec<String> = d.listen.iter().map(|a| a.to_string()).collect();
        let rules = match d.plan {
            Plan::Shared => "admits every source".to_string(),
            Plan::Dedicated => format!(
                "{} rules, {} effective prefixes",
                d.rules.len(),
                comp.table.prefixes()
            ),
        };
        let _ = writeln!(
            out,
            "  {} ({plan}, {tls}): {} -> {}; {rules}",
            d.name,
            listen.join(", "),
            d.upstream
        );
    }
    if let Some(s) = &c.store {
        let _ = writeln!(out, "store: etcd {} prefix \"{}\" (entries are read by `moat run`; check does not contact etcd)", s.endpoints.join(", "), s.prefix);
    }
    let _ = writeln!(out, "listeners: {}", c.listeners.len());
    for l in &c.listeners {
        let names: Vec<&str> = l
            .deployments
            .iter()
            .map(|&i| c.deployments[i].name.as_str())
            .collect();
        let v6 = if l.v6_only { " (IPv6 only)" } else { "" };
        let _ = writeln!(out, "  {}{v6}: {}", l.addr, names.join(", "));
    }
    if let Some(api) = &c.api {
        let scheme = if api.tls.is_some() { "https" } else { "http" };
        let _ = writeln!(
            out,
            "api: {scheme}://{}/api/v1, {} key(s) in {}",
            api.listen,
            api.keys.len(),
            api.keys_file.display()
        );
    }
    let _ = writeln!(out, "warnings: {}", c.warnings.len());
    for w in &c.warnings {
        let _ = writeln!(out, "  {w}");
    }
    out
}

/// `Snapshot::compile` takes the config by `Arc`; the summary borrows it.
fn clone_for_summary(c: &Config) -> Config {
    Config {
        path: c.path.clone(),
        server: c.server.clone(),
        limits: c.limits.clone(),
        security_groups: c.security_groups.clone(),
        store: c.store.clone(),
        api: c.api.clone(),
        deployments: c.deployments.clone(),
        listeners: c.listeners.clone(),
        files: c.files.clone(),
        fingerprint: c.fingerprint,
        warnings: Vec::new(),
    }
}

/// With `[security_groups] aws`, one refresh of the referenced groups so
/// that `explain` answers as the daemon would (file members only if the API
/// cannot be reached within a few seconds).
#[cfg(feature = "aws")]
fn resolve_groups(config: &Config) -> moat::policy::snapshot::GroupMembers {
    let Some(settings) = config.security_groups.aws.as_ref() else {
        return Default::default();
    };
    let groups = moat::policy::groups::referenced(config);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Default::default();
    };
    rt.block_on(async {
        let work = async {
            let ec2 = moat::policy::ec2::Ec2::new(settings).await;
            moat::policy::groups::resolve_all(&ec2, &groups, &Default::default()).await.0
        };
        match tokio::time::timeout(std::time::Duration::from_secs(10), work).await {
            Ok(members) => members,
            Err(_) => {
                eprintln!("moat explain: the EC2 API did not answer within 10s; using the membership file only");
                Default::default()
            }
        }
    })
}

#[cfg(not(feature = "aws"))]
fn resolve_groups(_: &Config) -> moat::policy::snapshot::GroupMembers {
    Default::default()
}

fn explain(path: &std::path::Path, deployment: &str, ip: &str) -> i32 {
    let config = match config::load(path, SystemTime::now()) {
        Ok(c) => c,
        Err(e) => {
            moat::daemon::print_diagnostics(&e.errors);
            return 2;
        }
    };
    let Ok(ip) = ip.trim().parse::<IpAddr>() else {
        eprintln!(
            "moat explain: \"{ip}\" is not an IP address; give one like 10.0.3.4 or 2001:db8::1"
        );
        return 2;
    };
    let ip = moat::policy::addr::canonical(ip);
    let resolved = Arc::new(resolve_groups(&config));
    // With a fleet store: the entries the daemon last applied (its cache).
    let store = config
        .store
        .as_ref()
        .and_then(|s| {
            Some(
                moat::policy::fleet::cache::load(s.cache.as_ref()?, &s.prefix)
                    .ok()?
                    .entries(),
            )
        })
        .unwrap_or_default();
    let snap = Snapshot::compile(
        Arc::new(config),
        resolved,
        Arc::new(store),
        SystemTime::now(),
    );
    let Some(index) = snap.deployment_index(deployment) else {
        let names: Vec<&str> = snap
            .config
            .deployments
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        eprintln!(
            "moat explain: there is no deployment named \"{deployment}\"; the config has: {}",
            names.join(", ")
        );
        return 2;
    };
    match admit(&snap, index, ip) {
        Ok(permit) => {
            let compiled = &snap.compiled[index];
            match permit.rule_index().map(|i| compiled.prefixes[i as usize]) {
                None => println!("allow {deployment} {ip}: plan = \"shared\" admits every source"),
                Some((net, src)) => {
                    let source = &compiled.sources[src as usize];
                    // stdout is the one line of SPEC 1; where the rule
                    // came from goes to stderr, indented, for the operator.
                    println!(
                        "allow {deployment} {ip} by \"{}\" ({net})",
                        source.description
                    );
                    if let Some(g) = &source.group {
                        let from_file = snap
                            .config
                            .security_groups
                            .members
                            .get(g)
                            .is_some_and(|m| m.contains(&net));
                        let origin = if from_file {
                            "membership file"
                        } else {
                            "EC2 API"
                        };
                        eprintln!(
                            "  member of security group {} of account {} ({origin})",
                            g.id, g.account
                        );
                    }
                    if source.owner != index {
                        eprintln!(
                            "  copied from deployment \"{}\"",
                            snap.config.deployments[source.owner].name
                        );
                    }
                }
            }
            0
        }
        Err(d) => {
            println!("deny {deployment} {ip}: {d}");
            1
        }
    }
}
