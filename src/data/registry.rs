//! The live-connection registry behind `GET /connections`: one insertion
//! when a connection is dialled, one removal when it closes, nothing per
//! byte (each connection counts its own bytes in its record).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::Notify;

/// One live connection as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub id: u64,
    pub deployment: Arc<str>,
    pub source: IpAddr,
    pub rule: String,
    pub tls: bool,
    pub sni: Option<String>,
    pub since: SystemTime,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
}

/// What a forwarding connection shares with the registry.
#[derive(Debug)]
pub struct Record {
    pub id: u64,
    pub deployment: Arc<str>,
    pub source: IpAddr,
    /// The admitting rule's description ("shared plan" for a shared
    /// deployment) and prefix; `ConnInfo::rule` joins them.
    pub description: String,
    pub cidr: String,
    pub tls: bool,
    pub sni: Option<String>,
    pub since: SystemTime,
    pub to_upstream: AtomicU64,
    pub to_client: AtomicU64,
    closed: AtomicBool,
    close: Notify,
}

impl Record {
    /// Resolves once the connection was closed through the registry.
    pub async fn closed(&self) {
        loop {
            let notified = self.close.notified();
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn info(&self) -> ConnInfo {
        ConnInfo {
            id: self.id,
            deployment: self.deployment.clone(),
            source: self.source,
            rule: if self.cidr.is_empty() {
                self.description.clone()
            } else {
                format!("{} ({})", self.description, self.cidr)
            },
            tls: self.tls,
            sni: self.sni.clone(),
            since: self.since,
            bytes_to_upstream: self.to_upstream.load(Ordering::Relaxed),
            bytes_to_client: self.to_client.load(Ordering::Relaxed),
        }
    }
}

/// The fields of a new registration.
pub struct NewConn {
    pub deployment: Arc<str>,
    pub source: IpAddr,
    pub description: String,
    pub cidr: String,
    pub tls: bool,
    pub sni: Option<String>,
}

/// Live connections by id.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Record>>>,
}

impl Registry {
    /// Registers a connection; it stays listed until the guard drops.
    pub fn register(self: &Arc<Self>, c: NewConn) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let record = Arc::new(Record {
            id,
            deployment: c.deployment,
            source: c.source,
            description: c.description,
            cidr: c.cidr,
            tls: c.tls,
            sni: c.sni,
            since: SystemTime::now(),
            to_upstream: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            close: Notify::new(),
        });
        self.lock().insert(id, record.clone());
        Registration {
            registry: self.clone(),
            record,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Record>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every live connection, oldest first.
    pub fn list(&self) -> Vec<ConnInfo> {
        let mut out: Vec<ConnInfo> = self.lock().values().map(|r| r.info()).collect();
        out.sort_by_key(|c| c.id);
        out
    }

    /// Closes connection `id` (counted as revoked); false when it is gone.
    pub fn close(&self, id: u64) -> bool {
        match self.lock().get(&id) {
            Some(r) => {
                r.closed.store(true, Ordering::Release);
                r.close.notify_waiters();
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection's place in the registry; dropping it removes the entry.
pub struct Registration {
    registry: Arc<Registry>,
    pub record: Arc<Record>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.record.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> NewConn {
        NewConn {
            deployment: "orders".into(),
            source: "192.0.2.1".parse().unwrap(),
            description: "app servers".into(),
            cidr: "10.0.0.0/16".into(),
            tls: false,
            sni: None,
        }
    }

    #[tokio::test]
    async fn registers_lists_closes_and_removes() {
        let r = Arc::new(Registry::default());
        let a = r.register(conn());
        let b = r.register(conn());
        a.record.to_upstream.fetch_add(7, Ordering::Relaxed);
        let list = r.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].bytes_to_upstream, 7);
        assert_eq!(list[0].rule, "app servers (10.0.0.0/16)");
        assert!(r.close(b.record.id));
        b.record.closed().await; // already closed: resolves at once
        drop(b);
        assert!(
            !r.close(list[1].id),
            "a removed connection cannot be closed"
        );
        drop(a);
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn close_wakes_the_waiting_connection() {
        let r = Arc::new(Registry::default());
        let a = r.register(conn());
        let rec = a.record.clone();
        let waiter = tokio::spawn(async move { rec.closed().await });
        tokio::task::yield_now().await;
        assert!(r.close(a.record.id));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
